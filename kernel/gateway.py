"""The gateway: the loop structure every request goes through; plugins fill its phases.

::

    route = resolve_route(request)
    for target in route.targets:                 # primary, then fallbacks
        preflight(call) rejects -> record why, next target if the rejection allows
        attempt loop under one deadline:         # dispositions decide retry / fallback
            before_call -> provider.complete -> after_call
    panel: preflight and before_call see the whole panel first, then members run
           concurrently, each through the loop above
    verify(request, envelope)
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import anyio
import pluggy
import structlog

from .config import Settings
from .envelope import Envelope
from .errors import ErrorClass, RouteError, default_message
from .hooks import HookFacade
from .loader import LoadedPlugin
from .results import Attempt, ChainResult, attempt_cost, chain_envelope, checked_outcome
from .tools import ToolSpec
from .types import (
    Call,
    Clock,
    Disposition,
    Message,
    Outcome,
    Provider,
    Rejection,
    Request,
    Route,
    Status,
    Target,
    Verdict,
    micro_to_usd,
)
from .wire import Pacing

if TYPE_CHECKING:
    from .panel import Claims

ProgressFn = Callable[[float, float, str], Awaitable[None]]

log = structlog.get_logger("llmgw.gateway")

#: Longest task class or model name taken: a longer one is refused, not echoed back.
_NAME_MAX = 200
#: Characters that show nothing, beyond what str.strip() removes.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"


def _blank(text: str) -> bool:
    """Empty, or only whitespace and zero-width characters: nothing to send. Strips from
    the ends only, so a prompt with text costs a few characters of work, not its length."""
    while True:
        stripped = text.strip().strip(_INVISIBLE)
        if stripped == text:
            return not stripped
        text = stripped


class Gateway:
    """One configured gateway: settings, plugins, providers and the request loop.

    Build it with :func:`build_gateway`; close it with :meth:`aclose` (or ``async
    with``). There is no global instance.
    """

    def __init__(
        self,
        settings: Settings,
        pm: pluggy.PluginManager,
        plugins: list[LoadedPlugin],
        *,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.pm = pm
        self.hooks = HookFacade(pm, [p.name for p in plugins])
        self.plugins = plugins
        self.clock = clock
        self.providers: dict[str, Provider] = {}
        self.provider_origin: dict[str, str] = {}
        self.tools: list[ToolSpec] = []
        self.panel_pacing = Pacing()
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close providers (their HTTP clients) and let plugins release what they hold."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            for provider in self.providers.values():
                try:
                    await provider.aclose()
                except Exception:
                    log.exception("provider.close_failed", provider=provider.name)
            await self.hooks.shutdown()

    # --- the main job ----------------------------------------------------------------

    async def route(self, request: Request, *, progress: ProgressFn | None = None) -> Envelope:
        """Route one request and return its envelope. Never raises for bad input."""
        started = self.clock.monotonic()
        problem = self._check_request(request)
        if problem is not None:
            # The caller's own value, cut short: a bad argument is not echoed back whole.
            named = request.task_class
            if isinstance(named, str) and len(named) > _NAME_MAX:
                named = named[:_NAME_MAX] + "..."
            return Envelope.failure(ErrorClass.BAD_ARGUMENT, problem, {"task_class": named})
        try:
            route = self.hooks.resolve_route(request, self.settings)
        except RouteError as exc:
            return Envelope.failure(
                exc.error_class, exc.message, {"task_class": request.task_class}
            )
        if route is None:
            return Envelope.failure(
                ErrorClass.INTERNAL_ERROR,
                "no plugin resolved a route; add `router` to plugins: in routing.yaml",
                {"task_class": request.task_class},
            )
        return await self.run_route(request, route, progress=progress, started=started)

    async def run_route(
        self,
        request: Request,
        route: Route,
        *,
        progress: ProgressFn | None = None,
        started: float | None = None,
    ) -> Envelope:
        """Run a given route through every policy (for plugins that pick targets, such as
        roles). The deadline starts now unless ``started`` is given."""
        if started is None:
            started = self.clock.monotonic()
        missing = self._unknown_providers(route)
        if missing:
            return Envelope.failure(
                ErrorClass.PROVIDER_UNAVAILABLE,
                f"provider(s) {', '.join(missing)} are not registered; enable their plugin in "
                "plugins:",
                {"task_class": request.task_class},
            )
        deadline = started + self.settings.gateway.deadline_s
        if route.is_panel:
            envelope = await self._run_panel(request, route, deadline, progress)
        else:
            result = await self._run_chain(request, route, deadline)
            envelope = chain_envelope(request, route, result)
        if envelope.ok:
            envelope = await self._verify(request, envelope)
        return envelope

    def _check_request(self, request: Request) -> str | None:
        g = self.settings.gateway
        if not isinstance(request.task_class, str) or len(request.task_class) > _NAME_MAX:
            return (
                "task_class must be the name of a task class in routing.yaml "
                f"(at most {_NAME_MAX} characters; llm_routing_info lists them)"
            )
        override = request.override_model
        if override is not None:
            if not isinstance(override, str) or not override.strip():
                return (
                    "override_model is empty; omit it to use the task class's model, or name "
                    "a model declared in routing.yaml ('model' or 'provider/model')"
                )
            if len(override) > _NAME_MAX:
                return (
                    f"override_model is longer than {_NAME_MAX} characters; name a model "
                    "declared in routing.yaml ('model' or 'provider/model')"
                )
        if not isinstance(request.prompt, str) or _blank(request.prompt):
            return "prompt is empty; pass the text to send"
        if len(request.prompt.encode("utf-8", "surrogatepass")) > g.max_prompt_bytes:
            return f"prompt is larger than {g.max_prompt_bytes} bytes (gateway.max_prompt_bytes)"
        if (
            request.system is not None
            and len(request.system.encode("utf-8", "surrogatepass")) > g.max_prompt_bytes
        ):
            return f"system is larger than {g.max_prompt_bytes} bytes (gateway.max_prompt_bytes)"
        if request.max_tokens is not None and not (1 <= request.max_tokens <= g.max_output_tokens):
            return f"max_tokens must be between 1 and {g.max_output_tokens}"
        try:
            request.prompt.encode("utf-8")
            if request.system:
                request.system.encode("utf-8")
        except UnicodeEncodeError:
            return "prompt or system contains invalid unicode (lone surrogates)"
        return None

    def _unknown_providers(self, route: Route) -> list[str]:
        names: set[str] = set()
        for r in (route, *route.members):
            names.update(t.provider for t in r.targets)
        return sorted(n for n in names if n not in self.providers)

    # --- one chain of targets --------------------------------------------------------

    def _new_call(
        self,
        request: Request,
        route: Route,
        target: Target,
        *,
        deadline: float,
        index: int,
        attempt: int,
        meta: dict[str, Any],
        history: tuple[tuple[Target, Outcome], ...],
        member_index: int | None = None,
        panel: Call | None = None,
    ) -> Call:
        provider = self.providers[target.provider]
        timeout = self._timeout_of(target.provider)
        messages = [Message("user", request.prompt)]
        return Call(
            request=request,
            route=route,
            settings=self.settings,
            target=target,
            system=effective_system(request, route),
            messages=messages,
            max_tokens=target.max_tokens,
            deadline=deadline,
            attempt=attempt,
            target_index=index,
            member_index=member_index,
            panel=panel,
            history=history,
            meta=meta,
            timeout_s=timeout,
            access=request.access,
            price=provider.price(target.model),
        )

    def _timeout_of(self, provider: str) -> float:
        """The provider's configured request timeout (``providers.<name>.timeout_s``)."""
        spec = self.settings.providers.get(provider)
        return spec.timeout_s if spec else 60.0

    async def _run_chain(
        self,
        request: Request,
        route: Route,
        deadline: float,
        *,
        first_call: Call | None = None,
        member_index: int | None = None,
        panel: Call | None = None,
        claims: Claims | None = None,
    ) -> ChainResult:
        started = self.clock.monotonic()
        meta: dict[str, Any] = first_call.meta if first_call is not None else {}
        attempts: list[Attempt] = []
        history: list[tuple[Target, Outcome]] = []
        last: Outcome | None = None
        last_target: Target | None = None
        max_attempts = self.settings.gateway.max_attempts_per_target
        for index, target in enumerate(route.targets):
            if claims is not None and not claims.claim(member_index, target):
                continue
            if self.clock.monotonic() >= deadline:
                last = Outcome.failure(
                    ErrorClass.DEADLINE_EXCEEDED,
                    default_message(ErrorClass.DEADLINE_EXCEEDED),
                    sent=False,
                )
                break
            if index == 0 and first_call is not None:
                call = first_call
            else:
                call = self._new_call(
                    request,
                    route,
                    target,
                    deadline=deadline,
                    index=index,
                    attempt=1,
                    meta=meta,
                    history=tuple(history),
                    member_index=member_index,
                    panel=panel,
                )
            rejection = await self.hooks.preflight(call)
            if rejection is not None:
                last = self._rejected(call, rejection, 0, attempts, history)
                last_target = target
                if rejection.fallback:
                    continue
                break
            attempt = 1
            move_on = False
            while True:
                call.timeout_s = max(0.001, min(call.timeout_s, deadline - self.clock.monotonic()))
                try:
                    result = await self.hooks.run_attempt(call, functools.partial(self._send, call))
                except BaseException:
                    # Cancelled (the client went away, a panel's quorum was met, the server
                    # stopping): the attempt still gets its audit line, sent or not.
                    self._log_attempt(call, _interrupted(call), "cancelled", None)
                    raise
                outcome = result.outcome
                stage = "refused" if result.refusal else "sent" if outcome.sent else "not_sent"
                attempts.append(Attempt(target, attempt, outcome, stage, result.refused_by))
                history.append((target, outcome))
                last, last_target = outcome, target
                advice = Disposition.combine(result.dispositions)
                self._log_attempt(
                    call, outcome, advice.action if advice else "none", result.refused_by
                )
                if outcome.ok:
                    return ChainResult(
                        outcome, target, attempts, meta, (self.clock.monotonic() - started) * 1000
                    )
                if result.refusal is not None and advice is None:
                    advice = Disposition("fallback" if result.refusal.fallback else "stop")
                if advice is None or advice.action == "stop":
                    break
                if advice.action == "fallback":
                    move_on = True
                    break
                # retry
                if attempt >= max_attempts:
                    move_on = True
                    break
                if self.clock.monotonic() + advice.delay_s >= deadline:
                    move_on = True
                    break
                call = self._new_call(
                    request,
                    route,
                    target,
                    deadline=deadline,
                    index=index,
                    attempt=attempt + 1,
                    meta=meta,
                    history=tuple(history),
                    member_index=member_index,
                    panel=panel,
                )
                # Preflight again before waiting: a breaker that the last failure opened,
                # or a kill switch flipped meanwhile, ends the retries now, not after a sleep.
                rejection = await self.hooks.preflight(call)
                if rejection is not None:
                    last = self._rejected(call, rejection, attempt + 1, attempts, history)
                    move_on = rejection.fallback
                    break
                if advice.delay_s > 0:
                    await self.clock.sleep(advice.delay_s)
                attempt += 1
            if not move_on:
                break
        if last is None:
            last = Outcome.failure(
                ErrorClass.PROVIDER_UNAVAILABLE,
                "no target of this route could be tried (all are used by other panel members)",
                sent=False,
            )
        return ChainResult(
            last, last_target, attempts, meta, (self.clock.monotonic() - started) * 1000
        )

    def _rejected(
        self,
        call: Call,
        rejection: Rejection,
        attempt: int,
        attempts: list[Attempt],
        history: list[tuple[Target, Outcome]],
    ) -> Outcome:
        """Record a preflight refusal of ``call`` as an attempt that sent nothing."""
        assert call.target is not None
        outcome = Outcome.failure(
            rejection.error_class,
            rejection.message,
            sent=False,
            details={"rejected_by": rejection.plugin, **rejection.details},
        )
        attempts.append(Attempt(call.target, attempt, outcome, "rejected", rejection.plugin))
        history.append((call.target, outcome))
        self._log_attempt(call, outcome, "rejected", rejection.plugin)
        return outcome

    async def _send(self, call: Call) -> Outcome:
        assert call.target is not None
        if (call.target, call.price) != call.origin:
            # Every check (caps per provider, the breaker, the price the ledger reserved
            # at) was made for the target the kernel chose: sending elsewhere, or at
            # another price, would bypass them.
            changed = "target" if call.target != call.origin[0] else "price"
            log.error("request.target_changed", changed=changed)
            # The after_call hooks (a breaker's probe ticket, the ledger) must see the
            # attempt they checked.
            call.target, call.price = call.origin
            return Outcome.failure(
                ErrorClass.INTERNAL_ERROR,
                f"a plugin changed the attempt's {changed} in before_call; nothing was "
                "sent. Plugins may rewrite system, messages and max_tokens only",
                sent=False,
                details={"refused_by": "kernel"},
            )
        # The hooks before this (a slow one, a lock) may have used the time left.
        left = call.deadline - self.clock.monotonic()
        if left <= 0:
            return Outcome.failure(
                ErrorClass.DEADLINE_EXCEEDED,
                default_message(ErrorClass.DEADLINE_EXCEEDED) + "; nothing was sent",
                sent=False,
            )
        call.timeout_s = max(0.001, min(call.timeout_s, left))
        provider = self.providers[call.target.provider]
        request = call.provider_request()
        if call.cost_ceiling_micro is not None:
            worst = call.worst_case_micro_usd()
            if worst is not None and worst > call.cost_ceiling_micro:
                log.error(
                    "request.grew_after_approval",
                    provider=provider.name,
                    approved_micro_usd=call.cost_ceiling_micro,
                    worst_case_micro_usd=worst,
                )
                fix = (
                    "A panel's members are approved together, before any member's own "
                    "before_call: rewrite them in the panel's before_call (call.members)"
                    if call.panel is not None and call.attempt == 1 and call.target_index == 0
                    else "Order request-rewriting plugins before cost and ledger"
                )
                return Outcome.failure(
                    ErrorClass.BUDGET_EXCEEDED,
                    "a plugin enlarged the request after its cost was approved (worst case "
                    f"${worst / 1e6:.6f} > approved ${call.cost_ceiling_micro / 1e6:.6f}); "
                    f"nothing was sent. {fix}",
                    sent=False,
                    details={"refused_by": "kernel"},
                )
        call.stash["kernel.sent_request"] = request
        t0 = time.perf_counter()
        try:
            with anyio.fail_after(request.timeout_s + 1.0):
                pending = provider.complete(request)
                if not inspect.isawaitable(pending):
                    # It already ran, and may have sent (a blocking SDK call): charged at
                    # its worst case, as any attempt whose usage is unknown.
                    log.error("provider.not_async", provider=provider.name)
                    return Outcome.failure(
                        ErrorClass.INTERNAL_ERROR,
                        f"provider {provider.name!r} is broken: its complete() must be `async def`",
                        sent=True,
                    )
                outcome = checked_outcome(await pending, provider.name)
        except TimeoutError:
            outcome = Outcome.failure(
                ErrorClass.TIMEOUT, default_message(ErrorClass.TIMEOUT), sent=True
            )
        except Exception as exc:
            log.error("provider.crashed", provider=provider.name, error_type=type(exc).__name__)
            outcome = Outcome.failure(
                ErrorClass.INTERNAL_ERROR,
                f"provider {provider.name!r} failed unexpectedly; see the gateway log",
                sent=True,
            )
        latency = (time.perf_counter() - t0) * 1000
        if (
            outcome.error_class is ErrorClass.TIMEOUT
            and request.timeout_s < self._timeout_of(call.target.provider)
            and "local" not in outcome.details
        ):
            # The call's deadline, not the provider's timeout, cut it short: no evidence
            # against the upstream's health (the breaker ignores `local` failures).
            details = {**outcome.details, "local": "cut short by the call's deadline"}
            outcome = replace(outcome, details=details)
        return replace(outcome, latency_ms=latency, cost_micro_usd=attempt_cost(call, outcome))

    def _log_attempt(self, call: Call, outcome: Outcome, disposition: str, by: str | None) -> None:
        t = call.target
        usage = outcome.usage
        log.info(
            "llm.attempt",
            request_id=call.request.request_id,
            task_class=call.task_class,
            provider=t.provider if t else None,
            model=t.model if t else None,
            attempt=call.attempt,
            ok=outcome.ok,
            error_class=outcome.error_class.value if outcome.error_class else None,
            sent=outcome.sent,
            latency_ms=round(outcome.latency_ms, 2),
            input_tokens=usage.input_tokens if usage else None,
            output_tokens=usage.output_tokens if usage else None,
            cost_usd=micro_to_usd(outcome.cost_micro_usd),
            disposition=disposition,
            by=by,
        )

    # --- envelopes ---------------------------------------------------------------------

    async def _verify(self, request: Request, envelope: Envelope) -> Envelope:
        verdicts: list[Verdict] = await self.hooks.verify(request, envelope)
        if not verdicts:
            return envelope
        meta = dict(envelope.meta)
        meta["verdicts"] = [
            {
                "verdict": v.verdict,
                "reasons": list(v.reasons),
                "source": v.source,
                "parse_error": v.parse_error,
            }
            for v in verdicts
        ]
        status: Status = (
            "success" if all(v.verdict == "ACCEPT" for v in verdicts) else "needs_human_review"
        )
        return Envelope(status, envelope.text, meta, envelope.error, envelope.data)

    # --- panels ------------------------------------------------------------------

    async def _run_panel(
        self, request: Request, route: Route, deadline: float, progress: ProgressFn | None
    ) -> Envelope:
        from .panel import run_panel

        return await run_panel(self, request, route, deadline, progress)

    def routing_info(self) -> dict[str, Any]:
        """What ``llm_routing_info`` returns: classes, providers, plugins, their sections."""
        from . import __version__

        classes: dict[str, Any] = {}
        for name, spec in self.settings.task_classes.items():
            if spec.members:
                classes[name] = {
                    "description": spec.description,
                    "panel": True,
                    "members": [m.model_dump(exclude_none=True) for m in spec.members],
                    "quorum": spec.effective_quorum(),
                    "min_distinct_providers": spec.min_distinct_providers,
                }
            else:
                classes[name] = {
                    "description": spec.description,
                    "provider": spec.provider,
                    "model": spec.model,
                    "max_tokens": spec.max_tokens,
                }
        providers: dict[str, Any] = {}
        for name, provider in sorted(self.providers.items()):
            st = provider.status()
            providers[name] = {
                "available": st.available,
                "reason": st.reason or None,
                "key_env": st.key_env,
                "base_url": st.base_url,
                "plugin": self.provider_origin.get(name),
            }
        return {
            "version": self.settings.version,  # the policy's own (routing.yaml `version`)
            "gateway_version": __version__,
            "config": self.settings.file_label,
            "task_classes": classes,
            "panels": sorted(n for n, s in self.settings.task_classes.items() if s.members),
            "providers": providers,
            "plugins": [p.name for p in self.plugins],
            **self.hooks.report_info(),
        }


def _interrupted(call: Call) -> Outcome:
    """What an attempt that ended by an exception (a cancellation) is known to have done:
    sent once the provider was called (the kernel keeps the request it handed over)."""
    return Outcome.failure(
        ErrorClass.CANCELLED,
        "the call was cancelled",
        sent="kernel.sent_request" in call.stash,
    )


def effective_system(request: Request, route: Route) -> str | None:
    """The caller's system prompt, else the task class default carried by the route."""
    return request.system if request.system is not None else route.system
