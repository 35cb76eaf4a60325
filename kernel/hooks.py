"""The typed async facade over pluggy: the only module that touches ``pm.hook``.

pluggy is synchronous: it would hand back un-awaited coroutines from ``async def``
implementations and stop a first-result hook at the first coroutine. So for the async
hooks this facade walks the implementations itself, in call order, awaits each result,
emulates first-result for ``preflight`` and unwinds ``after_call`` in reverse, inside a
shielded ``finally``, for exactly the plugins whose ``before_call`` completed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

import anyio
import pluggy
import structlog

from .errors import CallRefused, ErrorClass, RouteError
from .types import (
    DISPOSITION_ACTIONS,
    Call,
    Disposition,
    Outcome,
    Provider,
    Rejection,
    Request,
    Route,
    Verdict,
)

if TYPE_CHECKING:
    from .config import Settings
    from .envelope import Envelope
    from .tools import ToolSpec

log = structlog.get_logger("llmgw.hooks")


@dataclass
class AttemptResult:
    """How one attempt ended, with the advice of every ``after_call`` that ran."""

    outcome: Outcome
    dispositions: list[Disposition] = field(default_factory=list)
    refusal: CallRefused | None = None
    refused_by: str | None = None


def _sound(d: Disposition) -> bool:
    """A Disposition the kernel can act on (checked without raising: a bad one from one
    plugin must not cut the after_call of the layers inside it short)."""
    delay = d.delay_s
    return (
        type(d.action) is str
        and d.action in DISPOSITION_ACTIONS
        and type(delay) in (int, float)
        and math.isfinite(delay)
        and delay >= 0
    )


def call_order(pm: pluggy.PluginManager, hook: str) -> list[pluggy.HookImpl]:
    """Implementations of ``hook`` in the order pluggy would call them."""
    caller: pluggy.HookCaller = getattr(pm.hook, hook)
    return list(reversed(caller.get_hookimpls()))


def _bind(impl: pluggy.HookImpl, **kwargs: Any) -> dict[str, Any]:
    return {name: kwargs[name] for name in impl.argnames}


def _is_awaitable(value: Any) -> TypeGuard[Awaitable[Any]]:
    # Most implementations return None: answer that without inspect (hot path).
    return value is not None and inspect.isawaitable(value)


class HookFacade:
    """Typed entry points for every hook, bound to one plugin manager."""

    def __init__(self, pm: pluggy.PluginManager, order: list[str] | None = None) -> None:
        self.pm = pm
        self._order: dict[str, list[pluggy.HookImpl]] = {}
        # Config order of every plugin: the layers an attempt passes through.
        self.plugin_order = (
            order if order is not None else [name for name, _ in reversed(pm.list_name_plugin())]
        )

    def impls(self, hook: str) -> list[pluggy.HookImpl]:
        """Implementations in call order (cached; the manager is frozen after loading)."""
        cached = self._order.get(hook)
        if cached is None:
            cached = call_order(self.pm, hook)
            self._order[hook] = cached
        return cached

    # --- startup hooks (sync, all) -------------------------------------------------

    def register_providers(self, register: Callable[[Provider], None]) -> None:
        self.pm.hook.register_providers(register=register)

    def register_tools(self, register: Callable[[ToolSpec], None]) -> None:
        self.pm.hook.register_tools(register=register)

    def report_info(self) -> dict[str, Mapping[str, Any]]:
        sections: dict[str, Mapping[str, Any]] = {}
        for impl in self.impls("report_info"):
            # One plugin's broken report must not hide every other section (breakers,
            # spend) from llm_routing_info and check-config.
            try:
                value = impl.function()
            except Exception as exc:
                log.exception("hook.failed", hook="report_info", plugin=impl.plugin_name)
                value = {"error": f"report_info failed ({type(exc).__name__}); see the log"}
            if isinstance(value, Mapping):
                sections[impl.plugin_name] = value
            elif value is not None:
                log.error("hook.bad_result", hook="report_info", plugin=impl.plugin_name)
        return sections

    # --- routing (sync, first result) ---------------------------------------------

    def resolve_route(self, request: Request, settings: Settings) -> Route | None:
        try:
            result = self.pm.hook.resolve_route(request=request, settings=settings)
        except RouteError:
            raise
        except Exception as exc:
            log.exception("hook.failed", hook="resolve_route")
            raise RouteError(
                f"a resolve_route implementation failed ({type(exc).__name__}); see the "
                "gateway log",
                error_class=ErrorClass.INTERNAL_ERROR,
            ) from None
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            raise RouteError(
                "a resolve_route implementation is async; it must be a plain function",
                error_class=ErrorClass.INTERNAL_ERROR,
            )
        if result is not None and not isinstance(result, Route):
            raise RouteError(
                f"resolve_route returned {type(result).__name__}, not a Route",
                error_class=ErrorClass.INTERNAL_ERROR,
            )
        return result

    # --- per call (async) ------------------------------------------------------------

    async def preflight(self, call: Call) -> Rejection | None:
        """First rejection wins; a plugin that crashes refuses (fail closed)."""
        for impl in self.impls("preflight"):
            try:
                result = impl.function(**_bind(impl, call=call))
                if _is_awaitable(result):
                    result = await result
            except Exception:
                log.exception("hook.failed", hook="preflight", plugin=impl.plugin_name)
                return Rejection(
                    ErrorClass.INTERNAL_ERROR,
                    f"plugin {impl.plugin_name!r} failed in preflight; see the gateway log",
                    plugin=impl.plugin_name,
                )
            if result is not None:
                if not isinstance(result, Rejection):
                    log.error("hook.bad_result", hook="preflight", plugin=impl.plugin_name)
                    return Rejection(
                        ErrorClass.INTERNAL_ERROR,
                        f"plugin {impl.plugin_name!r} returned a non-Rejection from preflight",
                        plugin=impl.plugin_name,
                    )
                if not result.plugin:
                    result = Rejection(
                        result.error_class,
                        result.message,
                        result.fallback,
                        impl.plugin_name,
                        result.details,
                    )
                return result
        return None

    async def run_attempt(
        self, call: Call, send: Callable[[], Awaitable[Outcome]]
    ) -> AttemptResult:
        """``before_call`` (config order) → ``send`` → ``after_call`` (reverse, always).

        Plugins are layers in config order. ``after_call`` runs for every layer the attempt
        passed: those whose ``before_call`` completed and those without one that come
        before the point where the attempt stopped.

        A ``CallRefused`` from a ``before_call`` stops the attempt before ``send``; any
        other exception there refuses too (fail closed). Cancellation is re-raised
        after ``after_call`` has run for everyone whose ``before_call`` completed.
        """
        ran: list[str] = []
        result = AttemptResult(outcome=_PENDING)
        started_send = False
        befores = {impl.plugin_name: impl for impl in self.impls("before_call")}
        try:
            for name in self.plugin_order:
                impl = befores.get(name)
                if impl is None:
                    # No before_call: the layer is passed through, so it sees after_call.
                    ran.append(name)
                    continue
                try:
                    pending = impl.function(**_bind(impl, call=call))
                    if _is_awaitable(pending):
                        await pending
                except CallRefused as refused:
                    result.refusal = refused
                    result.refused_by = impl.plugin_name
                    result.outcome = Outcome.failure(
                        refused.error_class,
                        refused.message,
                        sent=False,
                        details={"refused_by": impl.plugin_name, **refused.details},
                    )
                    return result
                except Exception:
                    log.exception("hook.failed", hook="before_call", plugin=impl.plugin_name)
                    result.refusal = CallRefused(
                        ErrorClass.INTERNAL_ERROR,
                        f"plugin {impl.plugin_name!r} failed before the call; see the log",
                    )
                    result.refused_by = impl.plugin_name
                    result.outcome = Outcome.failure(
                        ErrorClass.INTERNAL_ERROR, result.refusal.message, sent=False
                    )
                    return result
                ran.append(impl.plugin_name)
            started_send = True
            result.outcome = await send()
            return result
        except BaseException as exc:
            if result.outcome is _PENDING:
                cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
                result.outcome = Outcome.failure(
                    ErrorClass.CANCELLED if cancelled else ErrorClass.INTERNAL_ERROR,
                    "the call was cancelled" if cancelled else "the gateway failed internally",
                    sent=started_send,
                )
            raise
        finally:
            if ran:
                with anyio.CancelScope(shield=True):
                    result.dispositions = await self._after_call(call, result.outcome, ran)

    async def _after_call(self, call: Call, outcome: Outcome, ran: list[str]) -> list[Disposition]:
        """Every layer's after_call, innermost last, whatever one of them does.

        The caller shields this from anyio's cancellation, but a native ``Task.cancel()``
        (``asyncio.wait_for`` around a route) still lands in whichever after_call is
        awaiting. It ends that one only: the layers inside it (the ledger's settle or
        release among them) still run, and the cancellation is raised once all have.
        """
        done = set(ran)
        advice: list[Disposition] = []
        cancelled: BaseException | None = None
        for impl in reversed(self.impls("after_call")):
            if impl.plugin_name not in done:
                continue
            try:
                value = impl.function(**_bind(impl, call=call, outcome=outcome))
                if _is_awaitable(value):
                    value = await value
            except anyio.get_cancelled_exc_class() as exc:
                log.warning("hook.cancelled", hook="after_call", plugin=impl.plugin_name)
                cancelled = cancelled or exc
                continue
            except Exception:
                log.exception("hook.failed", hook="after_call", plugin=impl.plugin_name)
                continue
            if isinstance(value, Disposition) and _sound(value):
                advice.append(value)
            elif value is not None:
                log.error("hook.bad_result", hook="after_call", plugin=impl.plugin_name)
        if cancelled is not None:
            raise cancelled
        return advice

    async def verify(self, request: Request, result: Envelope) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for impl in self.impls("verify"):
            try:
                value = impl.function(**_bind(impl, request=request, result=result))
                if _is_awaitable(value):
                    value = await value
            except Exception:
                log.exception("hook.failed", hook="verify", plugin=impl.plugin_name)
                verdicts.append(
                    Verdict("REVISE", (f"verifier {impl.plugin_name!r} failed",), impl.plugin_name)
                )
                continue
            if isinstance(value, Verdict) and value.verdict in ("ACCEPT", "REVISE"):
                if not value.source:
                    value = Verdict(
                        value.verdict, value.reasons, impl.plugin_name, value.parse_error
                    )
                verdicts.append(value)
            elif value is not None:
                # Fail closed, as a verifier that raised: an answer it did not clearly
                # accept is never presented as verified.
                log.error("hook.bad_result", hook="verify", plugin=impl.plugin_name)
                what = (
                    f"a Verdict of {str(value.verdict)[:20]!r}, not ACCEPT or REVISE"
                    if isinstance(value, Verdict)
                    else f"{type(value).__name__}, not a Verdict"
                )
                verdicts.append(
                    Verdict(
                        "REVISE",
                        (f"verifier {impl.plugin_name!r} returned {what}",),
                        impl.plugin_name,
                    )
                )
        return verdicts

    async def shutdown(self) -> None:
        for impl in reversed(self.impls("shutdown")):
            try:
                pending = impl.function()
                if _is_awaitable(pending):
                    await pending
            except Exception:
                log.exception("hook.failed", hook="shutdown", plugin=impl.plugin_name)


_PENDING = Outcome.failure(ErrorClass.INTERNAL_ERROR, "no outcome", sent=False)
