"""The ``deepseek`` plugin: DeepSeek's OpenAI-compatible Chat Completions.

It shares :mod:`.chat_completions` with ``openai``; the DeepSeek dialect keeps
``reasoning_content`` (deepseek-reasoner's chain of thought) out of the answer text while
its tokens are counted (``usage.reasoning_tokens``, included in the output tokens that are
billed), reads a 402 as ``quota_exhausted`` (insufficient balance) and the finish reason
``insufficient_system_resource`` as ``overloaded``.

Key from ``DEEPSEEK_API_KEY``; base URL from ``providers.deepseek.base_url``, else
``DEEPSEEK_BASE_URL``, else https://api.deepseek.com (DeepSeek's documented form; it also
accepts ``/v1``). DeepSeek prices vary with the time of day: see :mod:`.pricing`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmgw.kernel import PluginContext, Provider, hookimpl

from .base import resolve_connection
from .chat_completions import DEEPSEEK, ChatCompletionsProvider
from .pricing import PriceBook

NAME = "deepseek"


class DeepSeekPlugin:
    """Registers the ``deepseek`` provider."""

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        conn = resolve_connection(
            NAME,
            ctx,
            default_key_env="DEEPSEEK_API_KEY",
            default_base_url="https://api.deepseek.com",
            base_url_env="DEEPSEEK_BASE_URL",
        )
        spec = ctx.settings.providers.get(NAME)
        self.provider = ChatCompletionsProvider(
            conn,
            PriceBook(NAME, ctx.settings, ctx.clock, genai_provider="deepseek"),
            list(spec.models) if spec else [],
            dialect=DEEPSEEK,
        )

    @hookimpl
    def register_providers(self, register: Callable[[Provider], None]) -> None:
        register(self.provider)

    @hookimpl
    def report_info(self) -> dict[str, Any]:
        return self.provider.report()
