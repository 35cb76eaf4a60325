"""PLACEHOLDER: replaced by the real plugin in this session."""

from __future__ import annotations

from typing import Any

from llmgw.kernel import PluginError


class OpenAICompatiblePlugin:
    def __init__(self, ctx: Any) -> None:
        raise PluginError(ctx.name, "not built yet")
