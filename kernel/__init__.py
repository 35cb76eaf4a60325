"""llm-gateway-mcp kernel: the public API for plugins and embedders.

Import it as ``llmgw.kernel``. The repository keeps it in ``kernel/``; importing that
directory directly would create a second, incompatible copy of every type.
"""

from __future__ import annotations

if __name__ != "llmgw.kernel":  # pragma: no cover - guard against a bare `import kernel`
    raise ImportError(
        "import this package as `llmgw.kernel` (install the project with `pip install -e .`), "
        "not as a bare `kernel`"
    )

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
