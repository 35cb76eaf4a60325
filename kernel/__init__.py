"""llm-gateway-mcp kernel: the public API for plugins and embedders.

Import it as ``llmgw.kernel``. The repository keeps it in ``kernel/``; importing that
directory directly would create a second, incompatible copy of every type.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if __name__ != "llmgw.kernel":  # pragma: no cover - guard against a bare `import kernel`
    raise ImportError(
        "import this package as `llmgw.kernel` (install the project with `pip install -e .`), "
        "not as a bare `kernel`"
    )

if TYPE_CHECKING:
    from . import wire
    from .build import build_gateway
    from .config import Settings, load_settings
    from .envelope import Envelope
    from .errors import (
        FALLBACK_OK,
        HEALTH_FAILURES,
        TRANSIENT,
        CallRefused,
        ConfigError,
        ErrorClass,
        GatewayError,
        PluginError,
        RouteError,
    )
    from .gateway import Gateway
    from .hookspecs import hookimpl
    from .loader import PluginContext
    from .tools import ToolSpec
    from .types import (
        Call,
        Clock,
        Disposition,
        Message,
        Outcome,
        Price,
        Provider,
        ProviderRequest,
        ProviderStatus,
        Rejection,
        Request,
        Route,
        SystemClock,
        Target,
        Usage,
        Verdict,
    )

__version__ = "0.1.0"

__all__ = [
    "FALLBACK_OK",
    "HEALTH_FAILURES",
    "TRANSIENT",
    "Call",
    "CallRefused",
    "Clock",
    "ConfigError",
    "Disposition",
    "Envelope",
    "ErrorClass",
    "Gateway",
    "GatewayError",
    "Message",
    "Outcome",
    "PluginContext",
    "PluginError",
    "Price",
    "Provider",
    "ProviderRequest",
    "ProviderStatus",
    "Rejection",
    "Request",
    "Route",
    "RouteError",
    "Settings",
    "SystemClock",
    "Target",
    "ToolSpec",
    "Usage",
    "Verdict",
    "__version__",
    "build_gateway",
    "hookimpl",
    "load_settings",
    "wire",
]

#: Where each public name lives; it is imported from there on first use (PEP 562), so
#: ``import llmgw.kernel.cli`` loads no more than the command it runs needs.
_EXPORTS: dict[str, str] = {
    "build_gateway": "build",
    "Settings": "config",
    "load_settings": "config",
    "Envelope": "envelope",
    "FALLBACK_OK": "errors",
    "HEALTH_FAILURES": "errors",
    "TRANSIENT": "errors",
    "CallRefused": "errors",
    "ConfigError": "errors",
    "ErrorClass": "errors",
    "GatewayError": "errors",
    "PluginError": "errors",
    "RouteError": "errors",
    "Gateway": "gateway",
    "hookimpl": "hookspecs",
    "PluginContext": "loader",
    "ToolSpec": "tools",
    "Call": "types",
    "Clock": "types",
    "Disposition": "types",
    "Message": "types",
    "Outcome": "types",
    "Price": "types",
    "Provider": "types",
    "ProviderRequest": "types",
    "ProviderStatus": "types",
    "Rejection": "types",
    "Request": "types",
    "Route": "types",
    "SystemClock": "types",
    "Target": "types",
    "Usage": "types",
    "Verdict": "types",
}


if not TYPE_CHECKING:  # type checkers see the imports above, and flag a misspelt name

    def __getattr__(name: str) -> Any:
        module = _EXPORTS.get(name)
        if module is not None:
            value = getattr(importlib.import_module(f".{module}", __name__), name)
            globals()[name] = value  # the next lookup is an ordinary module attribute
            return value
        # A submodule (`llmgw.kernel.wire`, `.errors`...), as attribute access found it
        # when this package imported them all at once.
        if name.isidentifier() and not name.startswith("__"):
            try:
                return importlib.import_module(f".{name}", __name__)
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{name}":
                    raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
