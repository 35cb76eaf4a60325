"""MCP tools contributed by plugins through ``register_tools``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The MCP server's own tools (kernel/server.py); no plugin may register these names.
ROUTE_TOOL = "llm_route"
INFO_TOOL = "llm_routing_info"
BUILTIN_TOOLS = frozenset({ROUTE_TOOL, INFO_TOOL})


@dataclass(frozen=True)
class ToolSpec:
    """An MCP tool: its name, description and ``async`` implementation.

    The function's typed parameters become the tool's input schema. It may take a
    ``progress`` keyword: an ``async (done, total, message)`` callable that sends MCP
    progress notifications. It returns an :class:`~llmgw.kernel.Envelope`.
    ``choices`` maps a parameter name to its allowed values, shown as an enum.
    """

    name: str
    description: str
    fn: Callable[..., Awaitable[Any]]
    choices: Mapping[str, Sequence[str]] = field(default_factory=dict)
