"""The ``openai`` plugin: OpenAI Chat Completions over our own HTTP client.

Key from ``OPENAI_API_KEY`` (or ``providers.openai.key_env``); base URL from
``providers.openai.base_url``, else ``OPENAI_BASE_URL``, else https://api.openai.com/v1
(the form the OpenAI SDK documents, with ``/v1``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmgw.kernel import PluginContext, Provider, hookimpl

from .base import resolve_connection
from .chat_completions import OPENAI, ChatCompletionsProvider
from .pricing import PriceBook

NAME = "openai"


class OpenAIPlugin:
    """Registers the ``openai`` provider."""

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        conn = resolve_connection(
            NAME,
            ctx,
            default_key_env="OPENAI_API_KEY",
            default_base_url="https://api.openai.com/v1",
            base_url_env="OPENAI_BASE_URL",
        )
        spec = ctx.settings.providers.get(NAME)
        self.provider = ChatCompletionsProvider(
            conn,
            PriceBook(NAME, ctx.settings, ctx.clock, genai_provider="openai"),
            list(spec.models) if spec else [],
            dialect=OPENAI,
        )

    @hookimpl
    def register_providers(self, register: Callable[[Provider], None]) -> None:
        register(self.provider)

    @hookimpl
    def report_info(self) -> dict[str, Any]:
        return self.provider.report()
