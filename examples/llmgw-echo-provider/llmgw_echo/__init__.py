"""An example provider plugin for llm-gateway-mcp: echoes prompts, offline.

Entry point ``echo`` in group ``llmgw``. Enable it by naming it in ``plugins:``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from pydantic import Field

from llmgw.kernel import (
    ErrorClass,
    Outcome,
    PluginContext,
    Price,
    Provider,
    ProviderRequest,
    ProviderStatus,
    Usage,
    hookimpl,
)
from llmgw.kernel.config import Model

# Prices in USD per million tokens, as a real provider would declare them.
MODELS: dict[str, Price] = {
    "echo-1": Price(Decimal("0.50"), Decimal("1.50"), source="llmgw-echo price list"),
    "echo-mini": Price(Decimal("0.05"), Decimal("0.10"), source="llmgw-echo price list"),
}

# The echo service's own error codes, mapped into the gateway's taxonomy.
ERROR_CODES: dict[str, tuple[ErrorClass, bool]] = {
    "rate_limited": (ErrorClass.RATE_LIMITED, True),
    "overloaded": (ErrorClass.OVERLOADED, True),
    "server_error": (ErrorClass.SERVER_ERROR, True),
    "timeout": (ErrorClass.TIMEOUT, True),
    "quota_exhausted": (ErrorClass.QUOTA_EXHAUSTED, True),
    "auth_error": (ErrorClass.AUTH_ERROR, True),
    "content_refused": (ErrorClass.CONTENT_REFUSED, True),
    "connection_error": (ErrorClass.CONNECTION_ERROR, False),
}
_FAULT = re.compile(r"\[\[echo:([a-z_]+)\]\]")


class EchoProvider:
    """Answers ``<prefix>[<model>]: <last user message>``, cut to max_tokens words."""

    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.prefix = prefix
        self.calls = 0

    def status(self) -> ProviderStatus:
        return ProviderStatus(True)

    def price(self, model: str) -> Price | None:
        return MODELS.get(model)

    async def complete(self, request: ProviderRequest) -> Outcome:
        if request.model not in MODELS:
            return Outcome.failure(
                ErrorClass.MODEL_NOT_FOUND,
                f"echo has no model {request.model!r}; models: {', '.join(MODELS)}",
                sent=False,
            )
        self.calls += 1
        prompt = request.messages[-1].content
        fault = _FAULT.search(prompt)
        if fault:
            error_class, sent = ERROR_CODES.get(fault.group(1), (ErrorClass.SERVER_ERROR, True))
            return Outcome.failure(
                error_class,
                f"echo upstream reported {error_class.value}",
                sent=sent,
                retry_after_s=0.0 if error_class is ErrorClass.RATE_LIMITED else None,
            )
        words = prompt.split()
        truncated = len(words) > request.max_tokens
        text = f"{self.prefix}[{request.model}]: {' '.join(words[: request.max_tokens])}"
        usage = Usage(
            input_tokens=len(words) + 4, output_tokens=min(len(words), request.max_tokens)
        )
        return Outcome.success(
            text,
            usage,
            finish_reason="length" if truncated else "stop",
            details={"truncated": truncated},
        )

    async def aclose(self) -> None:
        return None


class EchoPlugin:
    """Registers the ``echo`` provider."""

    class Config(Model):
        """The ``echo:`` section of routing.yaml."""

        prefix: str = Field(default="echo", min_length=1, max_length=40)

    def __init__(self, ctx: PluginContext) -> None:
        config: EchoPlugin.Config = ctx.config
        self.provider = EchoProvider("echo", config.prefix)

    @hookimpl
    def register_providers(self, register: Callable[[Provider], None]) -> None:
        register(self.provider)

    @hookimpl
    def report_info(self) -> dict[str, Any]:
        return {
            "models": {
                m: {
                    "input_per_mtok": str(p.input_per_mtok),
                    "output_per_mtok": str(p.output_per_mtok),
                    "source": p.source,
                }
                for m, p in MODELS.items()
            },
            "calls": self.provider.calls,
        }
