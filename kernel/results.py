"""How a route's attempts ended: the attempt records, the chain's result, its envelope and
what each attempt cost. Shared by the request loop (:mod:`.gateway`) and panels
(:mod:`.panel`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from .envelope import Envelope
from .errors import ErrorClass, default_message
from .types import Call, Outcome, Request, Route, Target, Usage, micro_to_usd

log = structlog.get_logger("llmgw.gateway")

__all__ = ["Attempt", "ChainResult", "attempt_cost", "chain_envelope"]


@dataclass
class Attempt:
    """One line of ``meta.attempts``."""

    target: Target
    attempt: int
    outcome: Outcome
    stage: str  # "sent", "refused", "rejected", "skipped"
    by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "provider": self.target.provider,
            "model": self.target.model,
            "attempt": self.attempt,
            "stage": self.stage,
            "ok": self.outcome.ok,
            "sent": self.outcome.sent,
            "latency_ms": round(self.outcome.latency_ms, 2),
            "cost_usd": micro_to_usd(self.outcome.cost_micro_usd),
        }
        if not self.outcome.ok:
            d["error_class"] = self.outcome.error_class.value if self.outcome.error_class else None
        if self.by:
            d["by"] = self.by
        return d


@dataclass
class ChainResult:
    """How a single route (or one panel member) ended."""

    outcome: Outcome
    target: Target | None
    attempts: list[Attempt] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    latency_ms: float = 0.0


def chain_envelope(request: Request, route: Route, result: ChainResult) -> Envelope:
    """The envelope of a single route (or one panel member) from how its chain ended."""
    outcome, target = result.outcome, result.target
    tokens_in = sum(a.outcome.usage.input_tokens for a in result.attempts if a.outcome.usage)
    tokens_out = sum(a.outcome.usage.output_tokens for a in result.attempts if a.outcome.usage)
    costs = [a.outcome.cost_micro_usd for a in result.attempts if a.outcome.sent]
    unknown_cost = any(c is None for c in costs)
    meta: dict[str, Any] = {
        "provider": target.provider if target else None,
        "model": target.model if target else None,
        "latency_ms": round(result.latency_ms, 2),
        "tokens": {"input": tokens_in, "output": tokens_out, "total": tokens_in + tokens_out},
        "cost_usd_approx": micro_to_usd(sum(c for c in costs if c is not None)),
        "task_class": request.task_class,
        "request_id": request.request_id,
    }
    if unknown_cost:
        meta["cost_usd_known"] = meta["cost_usd_approx"]
        meta["cost_usd_approx"] = None
        meta["cost_note"] = (
            "cost unknown: no price for this model (add it under prices: in routing.yaml) "
            "or no usage reported; cost_usd_known is the part that is known"
        )
    if outcome.usage is not None:
        meta["tokens"]["cached_input"] = outcome.usage.cached_input_tokens
        meta["tokens"]["reasoning"] = outcome.usage.reasoning_tokens
    if outcome.finish_reason:
        meta["finish_reason"] = outcome.finish_reason
    if route.targets and target is not None and target != route.targets[0]:
        meta["fallback_from"] = route.targets[0].key
    meta["attempts"] = [a.to_dict() for a in result.attempts]
    for key, value in result.meta.items():
        meta.setdefault(key, value)
    if outcome.ok:
        return Envelope("success", outcome.text, meta)
    error_class = outcome.error_class or ErrorClass.INTERNAL_ERROR
    meta["error_class"] = error_class.value
    message = outcome.message or default_message(error_class)
    if outcome.refused_here and target is not None:
        # Refused here (an open circuit, a spent budget) after the same target answered:
        # say what the upstream answered too, not only the refusal that ended it.
        answered = [
            a.outcome.error_class
            for a in result.attempts
            if a.target == target
            and a.outcome.error_class is not None
            and not a.outcome.refused_here
        ]
        if answered:
            message = f"{message} (after {target.key} answered {answered[-1].value})"
    tried: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for a in result.attempts:
        if a.target != target and a.outcome.error_class is not None:
            where = skipped if a.outcome.refused_here else tried
            where[a.target.key] = a.outcome.error_class.value
    # A target that answered and was then refused (its retry) is listed for its answer.
    skipped = {key: cls for key, cls in skipped.items() if key not in tried}
    for label, found in (("also tried", tried), ("not sent to", skipped)):
        if found:
            listed = ", ".join(f"{key} ({cls})" for key, cls in found.items())
            message = f"{message}; {label}: {listed}"
    return Envelope("error", None, meta, error=message)


#: Error answers given before the model ran: the provider does not bill them. 408 and
#: 5xx other than 503/529 are left out: the model may have run (a timeout at a proxy).
_UNBILLED_STATUS = frozenset(range(400, 500)) - {408} | {503, 529}
_MAYBE_BILLED = frozenset({ErrorClass.TIMEOUT, ErrorClass.CONNECTION_ERROR})


def attempt_cost(call: Call, outcome: Outcome) -> int | None:
    """Micro-dollars an attempt cost: from usage, 0 when surely unbilled, else None."""
    if outcome.usage is not None and call.price is not None:
        return call.price.cost_micro_usd(outcome.usage)
    if not outcome.sent:
        return 0
    if (
        outcome.usage is None
        and outcome.status_code in _UNBILLED_STATUS
        and outcome.error_class not in _MAYBE_BILLED
    ):
        return 0
    return None  # sent, no usage: may be billed (timeout, reset, proxy error)


#: Above any real count; keeps every cost an integer the ledger can store.
MAX_REPORTED_TOKENS = 10**12
_USAGE_FIELDS = ("input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens")


def checked_outcome(outcome: object, provider: str) -> Outcome:
    """``outcome`` as a provider plugin returned it, made safe for the money path.

    A plugin's mistake must not release money that was spent or record a cost that
    cannot be: an answer is always ``sent``; a failure's class is an :class:`ErrorClass`;
    a usage that is not whole non-negative counts is dropped (so the attempt stays
    charged at its worst case, as with no usage). Anything else than an ``Outcome`` is a
    sent failure (the plugin may have spent money before it went wrong).
    """
    if not isinstance(outcome, Outcome):
        log.error("provider.bad_outcome", provider=provider, problem=type(outcome).__name__)
        return Outcome.failure(
            ErrorClass.INTERNAL_ERROR,
            f"provider {provider!r} is broken: complete() returned "
            f"{type(outcome).__name__}, not an Outcome",
            sent=True,
        )
    problems: list[str] = []
    changes: dict[str, Any] = {}
    if outcome.ok and not outcome.sent:
        problems.append("an answer marked not sent")
        changes["sent"] = True
    if outcome.ok and not isinstance(outcome.text, str):
        problems.append("an answer without text")
        changes.update(
            ok=False,
            sent=True,
            text=None,
            error_class=ErrorClass.MALFORMED_RESPONSE,
            message=f"provider {provider!r} returned an answer without text",
        )
    elif not outcome.ok and not isinstance(outcome.error_class, ErrorClass):
        try:
            changes["error_class"] = ErrorClass(str(outcome.error_class))
        except ValueError:
            changes["error_class"] = ErrorClass.INTERNAL_ERROR
        problems.append(f"error_class {outcome.error_class!r} is not an ErrorClass")
    usage = outcome.usage
    if usage is not None and not (
        isinstance(usage, Usage)
        and all(
            type(v) is int and 0 <= v <= MAX_REPORTED_TOKENS
            for v in (getattr(usage, f) for f in _USAGE_FIELDS)
        )
    ):
        problems.append("usage that is not whole non-negative token counts")
        changes["usage"] = None
    if not problems:
        return outcome
    log.error("provider.bad_outcome", provider=provider, problem="; ".join(problems))
    return replace(outcome, **changes)
