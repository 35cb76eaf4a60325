"""The ``openai`` plugin: OpenAI Chat Completions over our own HTTP client.

Key from ``OPENAI_API_KEY`` (or ``providers.openai.key_env``); base URL from
``providers.openai.base_url``, else ``OPENAI_BASE_URL``, else https://api.openai.com/v1
(the form the OpenAI SDK documents, with ``/v1``).
"""

from __future__ import annotations

from .base import BaseProvider, Connection, ProviderPlugin
from .chat_completions import OPENAI, ChatCompletionsProvider
from .pricing import PriceBook

NAME = "openai"


class OpenAIPlugin(ProviderPlugin):
    """Registers the ``openai`` provider."""

    NAME = NAME
    KEY_ENV = "OPENAI_API_KEY"
    DEFAULT_BASE_URL = "https://api.openai.com/v1"
    BASE_URL_ENV = "OPENAI_BASE_URL"
    GENAI_PROVIDER = "openai"

    def build(self, conn: Connection, prices: PriceBook, models: list[str]) -> BaseProvider:
        return ChatCompletionsProvider(conn, prices, models, dialect=OPENAI)
