"""The ``openai_compatible`` plugin: any Chat Completions endpoint, configured, no code.

Ollama, vLLM, LM Studio, OpenRouter and others speak OpenAI's wire format. Each
endpoint in this plugin's section registers a provider with the endpoint's name::

    openai_compatible:
      endpoints:
        - name: ollama
          base_url: http://127.0.0.1:11434/v1
          models: [llama3.2]
        - name: openrouter
          base_url: https://openrouter.ai/api/v1
          key_env: OPENROUTER_API_KEY
          price_provider: openrouter     # genai-prices provider id (optional)
          models: [anthropic/claude-sonnet-4.6]

An endpoint without ``key_env`` sends no Authorization header (local servers). Timeouts
come from ``providers.<name>`` when that section exists; prices from ``prices:``
(``<name>/<model>``), else from genai-prices when ``price_provider`` is given, else
unknown (a cap then refuses the call: fail closed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field, model_validator

from llmgw.kernel import PluginContext, Provider, hookimpl
from llmgw.kernel.config import Model

from .base import resolve_connection
from .chat_completions import GENERIC, ChatCompletionsProvider
from .pricing import PriceBook


class Endpoint(Model):
    """One OpenAI-compatible server."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    """The provider name this endpoint registers (used in task_classes and prices)."""
    base_url: str = Field(pattern=r"^https?://")
    """The server's OpenAI-style base URL, with /v1 (e.g. http://127.0.0.1:11434/v1)."""
    key_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    """The variable holding its API key; without it no Authorization header is sent."""
    models: list[str] = Field(default_factory=list)
    """Models it serves (allowed as override_model and listed in routing info)."""
    price_provider: str | None = None
    """A genai-prices provider id (e.g. openrouter) to price its models; else unknown."""


class OpenAICompatiblePlugin:
    """Registers one provider per configured endpoint."""

    class Config(Model):
        """The ``openai_compatible:`` section."""

        endpoints: list[Endpoint] = Field(default_factory=list)
        """The servers, each registered as a provider named after it."""

        @model_validator(mode="after")
        def _unique(self) -> OpenAICompatiblePlugin.Config:
            names = [e.name for e in self.endpoints]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"endpoint name(s) {', '.join(dupes)} appear more than once")
            return self

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        config: OpenAICompatiblePlugin.Config = ctx.config
        self.providers: list[ChatCompletionsProvider] = []
        for ep in config.endpoints:
            spec = ctx.settings.providers.get(ep.name)
            conn = resolve_connection(
                ep.name,
                ctx,
                default_key_env=ep.key_env,
                default_base_url=ep.base_url,
                base_url_env=None,
                spec=spec,
                base_url=ep.base_url,
            )
            models = sorted({*ep.models, *(spec.models if spec else [])})
            self.providers.append(
                ChatCompletionsProvider(
                    conn,
                    PriceBook(ep.name, ctx.settings, ctx.clock, genai_provider=ep.price_provider),
                    models,
                    dialect=GENERIC,
                    key_required=conn.key_env is not None,
                )
            )

    @hookimpl
    def register_providers(self, register: Callable[[Provider], None]) -> None:
        for provider in self.providers:
            register(provider)

    @hookimpl
    def report_info(self) -> dict[str, Any]:
        return {"endpoints": {p.name: p.report() for p in self.providers}}
