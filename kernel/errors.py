"""The error taxonomy and the small exception hierarchy of the kernel.

One taxonomy drives retry, breaker, fallback and the message a user sees. Providers map
whatever their upstream says into an :class:`ErrorClass`; policies decide on the class,
never on upstream text.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorClass(StrEnum):
    """Why a call failed. The value is what ``meta.error_class`` shows."""

    # upstream, transient
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    MALFORMED_RESPONSE = "malformed_response"
    # upstream, not transient
    QUOTA_EXHAUSTED = "quota_exhausted"
    AUTH_ERROR = "auth_error"
    MODEL_NOT_FOUND = "model_not_found"
    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    REQUEST_TOO_LARGE = "request_too_large"
    CONTENT_REFUSED = "content_refused"
    TRUNCATED_OUTPUT = "truncated_output"
    # local
    BUDGET_EXCEEDED = "budget_exceeded"
    KILL_SWITCH = "kill_switch"
    CIRCUIT_OPEN = "circuit_open"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    POLICY_REFUSED = "policy_refused"
    INDEPENDENCE_VIOLATION = "independence_violation"
    UNKNOWN_TASK_CLASS = "unknown_task_class"
    BAD_ARGUMENT = "bad_argument"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    PANEL_FAILED = "panel_failed"
    INTERNAL_ERROR = "internal_error"


#: Classes that say something about the health of an upstream (provider, model).
HEALTH_FAILURES: frozenset[ErrorClass] = frozenset(
    {
        ErrorClass.OVERLOADED,
        ErrorClass.SERVER_ERROR,
        ErrorClass.TIMEOUT,
        ErrorClass.CONNECTION_ERROR,
        ErrorClass.MALFORMED_RESPONSE,
    }
)

#: Classes worth another attempt on the same target.
TRANSIENT: frozenset[ErrorClass] = HEALTH_FAILURES | {ErrorClass.RATE_LIMITED}

#: Classes after which another target may be tried (a fallback plugin decides).
FALLBACK_OK: frozenset[ErrorClass] = TRANSIENT | {
    ErrorClass.QUOTA_EXHAUSTED,
    ErrorClass.AUTH_ERROR,
    ErrorClass.CIRCUIT_OPEN,
    ErrorClass.PROVIDER_UNAVAILABLE,
}

_HINTS: dict[ErrorClass, str] = {
    ErrorClass.RATE_LIMITED: "the provider is rate limiting this key; retry later",
    ErrorClass.OVERLOADED: "the provider is overloaded; retry later",
    ErrorClass.SERVER_ERROR: "the provider returned a server error; retry later",
    ErrorClass.TIMEOUT: "the provider did not answer in time",
    ErrorClass.CONNECTION_ERROR: "could not reach the provider; check its base_url and network",
    ErrorClass.MALFORMED_RESPONSE: "the provider sent a response that could not be read",
    ErrorClass.QUOTA_EXHAUSTED: "the provider account has no quota or credit left",
    ErrorClass.AUTH_ERROR: "the provider rejected the API key; check the key variable",
    ErrorClass.MODEL_NOT_FOUND: "the provider does not know this model; fix routing.yaml",
    ErrorClass.INVALID_REQUEST: "the provider rejected the request as invalid",
    ErrorClass.CONTEXT_LENGTH_EXCEEDED: "the prompt is too long for this model",
    ErrorClass.REQUEST_TOO_LARGE: "the request is too large for the provider",
    ErrorClass.CONTENT_REFUSED: "the model refused or the provider filtered the content",
    ErrorClass.TRUNCATED_OUTPUT: "the answer was cut off at max_tokens",
    ErrorClass.BUDGET_EXCEEDED: "the spend cap would be exceeded",
    ErrorClass.KILL_SWITCH: "the gateway is disabled by a kill switch",
    ErrorClass.CIRCUIT_OPEN: "the circuit breaker for this model is open",
    ErrorClass.CANCELLED: "the call was cancelled",
    ErrorClass.DEADLINE_EXCEEDED: "the call ran out of time",
    ErrorClass.INTERNAL_ERROR: "the gateway failed internally; see its log",
}


def default_message(error_class: ErrorClass) -> str:
    """A short, safe sentence for a class, used when a plugin gives none."""
    return _HINTS.get(error_class, error_class.value.replace("_", " "))


class GatewayError(Exception):
    """Base of every error the kernel raises on purpose."""


class ConfigError(GatewayError):
    """A configuration problem, reported as: file, path inside it, what is wrong, the fix."""

    def __init__(
        self, message: str, *, file: str | None = None, path: str = "", fix: str = ""
    ) -> None:
        self.file = file
        self.path = path
        self.problem = message
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        where = self.file or "<config>"
        if self.path:
            where = f"{where}: {self.path}"
        text = f"{where}: {self.problem}"
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class ConfigErrors(ConfigError):
    """Several configuration problems found in one pass."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        first = errors[0]
        super().__init__(first.problem, file=first.file, path=first.path, fix=first.fix)

    def render(self) -> str:
        errors: list[ConfigError] = getattr(self, "errors", [])
        if not errors:
            return super().render()
        return "\n".join(ConfigError.render(e) for e in errors)


class PluginError(GatewayError):
    """A plugin could not be found, loaded, configured or ordered."""

    def __init__(self, plugin: str, message: str, *, fix: str = "") -> None:
        self.plugin = plugin
        self.problem = message
        self.fix = fix
        text = f"plugin {plugin!r}: {message}"
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


class CallRefused(GatewayError):
    """Raised by a ``before_call`` hook to stop an attempt before anything is sent.

    The attempt becomes a local failure with ``error_class``; ``fallback`` says whether
    the kernel may try the route's next target (a provider cap may leave another
    provider headroom; a total cap or a kill switch does not).
    """

    def __init__(
        self,
        error_class: ErrorClass,
        message: str,
        *,
        fallback: bool = False,
        details: dict[str, object] | None = None,
    ) -> None:
        self.error_class = error_class
        self.message = message
        self.fallback = fallback
        self.details = details or {}
        super().__init__(f"{error_class.value}: {message}")


class RouteError(GatewayError):
    """Raised by ``resolve_route`` when a request cannot be routed; the caller sees it."""

    def __init__(self, message: str, *, error_class: ErrorClass = ErrorClass.BAD_ARGUMENT) -> None:
        self.error_class = error_class
        self.message = message
        super().__init__(message)
