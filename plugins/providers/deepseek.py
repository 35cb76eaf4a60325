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

from .base import BaseProvider, Connection, ProviderPlugin
from .chat_completions import DEEPSEEK, ChatCompletionsProvider
from .pricing import PriceBook

NAME = "deepseek"


class DeepSeekPlugin(ProviderPlugin):
    """Registers the ``deepseek`` provider."""

    NAME = NAME
    KEY_ENV = "DEEPSEEK_API_KEY"
    DEFAULT_BASE_URL = "https://api.deepseek.com"
    BASE_URL_ENV = "DEEPSEEK_BASE_URL"
    GENAI_PROVIDER = "deepseek"

    def build(self, conn: Connection, prices: PriceBook, models: list[str]) -> BaseProvider:
        return ChatCompletionsProvider(conn, prices, models, dialect=DEEPSEEK)
