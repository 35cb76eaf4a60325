"""Circuit breaker per (provider, model): skip a failing upstream at once, probe it later.

``preflight`` refuses a target whose circuit is open with ``Rejection(circuit_open,
fallback=True)``, so the kernel moves to the route's next target without waiting.
``before_call`` admits the attempt (and, when half-open, claims the single probe slot,
so concurrent callers do not all become probes: the others are refused with
``circuit_open`` and fall back). ``after_call`` counts one outcome per upstream attempt:
only the health classes (``errors.HEALTH_FAILURES``) are failures, including a connection
that could not be made (nothing sent, but the upstream is unreachable) unless the provider
marks the failure ``local`` (ours: a full pool, a connect cut short by the deadline); rate
limits, auth, quota, invalid requests and refusals, ours or the upstream's, say nothing
about the upstream's health and are ignored. A probe that ends without a verdict (refused by a
later plugin, cancelled) frees its slot.

The state machine itself is :class:`~llmgw.plugins.policies.breaker_state.CircuitBreaker`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, PositiveInt, model_validator

from llmgw.kernel import (
    HEALTH_FAILURES,
    Call,
    CallRefused,
    ErrorClass,
    Outcome,
    PluginContext,
    Rejection,
    hookimpl,
)
from llmgw.kernel.config import Model

from .breaker_state import BreakerSettings, CircuitBreaker, CircuitState, Result, Ticket


def classify(outcome: Outcome) -> Result:
    """What an attempt's outcome says about the upstream's health."""
    if outcome.ok:
        return "success"
    if outcome.error_class not in HEALTH_FAILURES:
        return "ignored"
    # Not the upstream's doing: refused by a plugin before sending, or a failure marked
    # ``local`` (ours: the connection pool full, a request that could not be encoded, a
    # connect or a whole request cut short by the caller's deadline, sent or not).
    if "local" in outcome.details or outcome.refused_here:
        return "ignored"
    # Everything else counts, sent or not: a connection that could not be made (refused,
    # reset during connect, a connect timeout) is the plainest sign of a dead upstream,
    # and not counting it would let every caller keep trying a host that is down.
    return "failure"


class BreakerPlugin:
    """Holds one :class:`CircuitBreaker` per ``provider/model``."""

    class Config(Model):
        """The ``breaker:`` section."""

        consecutive_failures: PositiveInt = 5
        """Health failures in a row that open the circuit of a provider/model."""
        failure_rate: float = Field(default=0.5, gt=0, le=1)
        """Share of failures over `window_s` that opens the circuit (with `min_calls`)."""
        window_s: float = Field(default=60.0, gt=0)
        """Length in seconds of the sliding window behind `failure_rate`."""
        min_calls: PositiveInt = 10
        """Calls the window must hold before `failure_rate` applies."""
        open_s: float = Field(default=30.0, gt=0)
        """Seconds open after a trip, times the number of consecutive trips."""
        max_open_s: float = Field(default=300.0, gt=0)
        """Cap in seconds of one open period."""

        @model_validator(mode="after")
        def _caps(self) -> BreakerPlugin.Config:
            if self.max_open_s < self.open_s:
                raise ValueError(
                    f"max_open_s ({self.max_open_s}) is shorter than open_s ({self.open_s}); "
                    "make max_open_s at least open_s"
                )
            return self

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        cfg: BreakerPlugin.Config = ctx.config or BreakerPlugin.Config()
        self.settings = BreakerSettings(**cfg.model_dump())
        self.circuits: dict[str, CircuitBreaker] = {}

    def circuit(self, key: str) -> CircuitBreaker:
        """The circuit of ``provider/model`` (created closed on first use)."""
        found = self.circuits.get(key)
        if found is None:
            found = self.circuits[key] = CircuitBreaker(self.settings)
        return found

    def _refusal_text(self, key: str, now: float) -> tuple[str, dict[str, Any]]:
        circuit = self.circuit(key)
        if circuit.state(now) is CircuitState.HALF_OPEN:
            return (
                f"the circuit breaker for {key} is half-open and its one probe is in flight; "
                "falling back",
                {"breaker_state": "half_open"},
            )
        wait = max(0.0, circuit.open_until - now)
        return (
            f"the circuit breaker for {key} is open after repeated upstream failures; "
            f"it will be probed again in {wait:.0f} s",
            {"breaker_state": "open", "retry_in_s": round(wait, 3)},
        )

    @hookimpl
    def preflight(self, call: Call) -> Rejection | None:
        if call.target is None:
            return None
        key = call.target.key
        now = self.ctx.clock.monotonic()
        circuit = self.circuits.get(key)
        if circuit is None or circuit.can_try(now):
            return None
        message, details = self._refusal_text(key, now)
        return Rejection(ErrorClass.CIRCUIT_OPEN, message, fallback=True, details=details)

    @hookimpl
    def before_call(self, call: Call) -> None:
        if call.target is None:
            return
        key = call.target.key
        now = self.ctx.clock.monotonic()
        ticket = self.circuit(key).admit(now)
        if ticket is None:
            # Retries are not preflighted, and the probe slot may have been taken since
            # preflight: refuse here too, and let the kernel fall back at once.
            message, details = self._refusal_text(key, now)
            raise CallRefused(ErrorClass.CIRCUIT_OPEN, message, fallback=True, details=details)
        call.stash[self.ctx.name] = ticket

    @hookimpl
    def after_call(self, call: Call, outcome: Outcome) -> None:
        ticket = call.stash.get(self.ctx.name)
        if call.target is None or not isinstance(ticket, Ticket):
            return
        self.circuit(call.target.key).record(ticket, classify(outcome), self.ctx.clock.monotonic())

    @hookimpl
    def report_info(self) -> dict[str, Any]:
        now = self.ctx.clock.monotonic()
        circuits: dict[str, Any] = {}
        for key, circuit in sorted(self.circuits.items()):
            state = circuit.state(now)
            calls, failures = circuit.window_counts(now)
            circuits[key] = {
                "state": state.value,
                "consecutive_failures": circuit.consecutive,
                "opens_until_s": round(max(0.0, circuit.open_until - now), 3)
                if state is CircuitState.OPEN
                else None,
                "trips": circuit.trips,
                "total_trips": circuit.total_trips,
                "probe_in_flight": circuit.probe_in_flight,
                "window": {"calls": calls, "failures": failures},
            }
        s = self.settings
        return {
            "thresholds": {
                "consecutive_failures": s.consecutive_failures,
                "failure_rate": s.failure_rate,
                "window_s": s.window_s,
                "min_calls": s.min_calls,
                "open_s": s.open_s,
                "max_open_s": s.max_open_s,
            },
            "circuits": circuits,
        }
