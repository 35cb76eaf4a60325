"""The breaker's state machine alone: examples, and a stateful test against a reference.

The reference model below is written differently on purpose: it keeps every counted
outcome in a list and recomputes consecutive failures and the window from it, where the
real machine keeps running counters and a pruned deque.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llmgw.plugins.policies.breaker_state import (
    BreakerSettings,
    CircuitBreaker,
    CircuitState,
    Result,
    Ticket,
)

# --- examples --------------------------------------------------------------------------


def _fail(cb: CircuitBreaker, now: float, n: int = 1) -> None:
    for _ in range(n):
        ticket = cb.admit(now)
        assert ticket is not None
        cb.record(ticket, "failure", now)


def test_opens_after_consecutive_failures_and_not_before() -> None:
    cb = CircuitBreaker(BreakerSettings())
    _fail(cb, 0.0, 4)
    assert cb.state(0.0) is CircuitState.CLOSED
    _fail(cb, 0.0)
    assert cb.state(0.0) is CircuitState.OPEN
    assert cb.open_until == 30.0
    assert cb.admit(29.9) is None
    assert not cb.can_try(29.9)


def test_a_success_resets_the_consecutive_count() -> None:
    cb = CircuitBreaker(BreakerSettings())
    _fail(cb, 0.0, 4)
    t = cb.admit(0.0)
    assert t is not None
    cb.record(t, "success", 0.0)
    _fail(cb, 0.0, 4)
    assert cb.state(0.0) is CircuitState.CLOSED
    assert cb.consecutive == 4


def test_opens_on_failure_rate_over_the_window_with_min_calls() -> None:
    cb = CircuitBreaker(BreakerSettings(consecutive_failures=100))
    for i in range(9):  # alternate: 5 failures out of 9, below min_calls
        t = cb.admit(float(i))
        assert t is not None
        cb.record(t, "failure" if i % 2 == 0 else "success", float(i))
    assert cb.state(9.0) is CircuitState.CLOSED
    t = cb.admit(9.0)
    assert t is not None
    cb.record(t, "success", 9.0)  # 10 calls, 5 failures: 50 %
    assert cb.state(9.0) is CircuitState.OPEN


def test_old_outcomes_leave_the_window() -> None:
    cb = CircuitBreaker(BreakerSettings(consecutive_failures=100, window_s=60))
    _fail(cb, 0.0, 5)
    for i in range(5):
        t = cb.admit(61.0 + i)
        assert t is not None
        cb.record(t, "success", 61.0 + i)
    assert cb.window_counts(66.0) == (5, 0)
    assert cb.state(66.0) is CircuitState.CLOSED


def test_open_time_grows_with_consecutive_trips_up_to_the_cap() -> None:
    cb = CircuitBreaker(BreakerSettings(consecutive_failures=1, open_s=30, max_open_s=100))
    now = 0.0
    durations = []
    for _ in range(5):
        _fail(cb, now)
        durations.append(cb.open_until - now)
        now = cb.open_until
        assert cb.state(now) is CircuitState.HALF_OPEN
    assert durations == [30, 60, 90, 100, 100]
    probe = cb.admit(now)
    assert probe is not None and probe.probe
    cb.record(probe, "success", now)
    assert cb.state(now) is CircuitState.CLOSED
    assert cb.trips == 0
    _fail(cb, now)
    assert cb.open_until - now == 30


def test_half_open_admits_one_probe_and_ignored_results_free_it() -> None:
    cb = CircuitBreaker(BreakerSettings(consecutive_failures=1))
    _fail(cb, 0.0)
    probe = cb.admit(30.0)
    assert probe == Ticket(cb.generation, probe=True)
    assert cb.admit(30.0) is None
    assert not cb.can_try(30.0)
    cb.record(probe, "ignored", 31.0)
    assert cb.state(31.0) is CircuitState.HALF_OPEN
    assert cb.can_try(31.0)
    again = cb.admit(31.0)
    assert again is not None and again.probe
    cb.record(again, "failure", 32.0)
    assert cb.state(32.0) is CircuitState.OPEN
    assert cb.open_until == 92.0  # second consecutive trip: 2 x 30 s


def test_late_results_of_an_earlier_period_are_ignored() -> None:
    cb = CircuitBreaker(BreakerSettings(consecutive_failures=2))
    slow = cb.admit(0.0)
    assert slow is not None
    _fail(cb, 0.0, 2)
    assert cb.state(0.0) is CircuitState.OPEN
    cb.record(slow, "success", 1.0)  # admitted while closed, answers while open
    assert cb.state(1.0) is CircuitState.OPEN
    probe = cb.admit(30.0)
    assert probe is not None
    cb.record(probe, "success", 30.0)
    cb.record(slow, "failure", 31.0)  # stale in the new closed period
    assert cb.consecutive == 0


# --- stateful test against a reference model ----------------------------------------------


@dataclass
class Reference:
    """The breaker as the spec reads, with no cleverness."""

    s: BreakerSettings
    is_open: bool = False
    until: float = 0.0
    trips: int = 0
    period: int = 0
    probe: bool = False
    counted: list[tuple[float, bool]] = field(default_factory=list)

    def state(self, now: float) -> CircuitState:
        if not self.is_open:
            return CircuitState.CLOSED
        return CircuitState.OPEN if now < self.until else CircuitState.HALF_OPEN

    def can_try(self, now: float) -> bool:
        st_ = self.state(now)
        return st_ is CircuitState.CLOSED or (st_ is CircuitState.HALF_OPEN and not self.probe)

    def consecutive(self) -> int:
        n = 0
        for _, failed in reversed(self.counted):
            if not failed:
                break
            n += 1
        return n

    def admit(self, now: float) -> tuple[int, bool] | None:
        if not self.can_try(now):
            return None
        if self.state(now) is CircuitState.HALF_OPEN:
            self.probe = True
            return (self.period, True)
        return (self.period, False)

    def trip(self, now: float) -> None:
        self.trips += 1
        self.is_open = True
        self.until = now + min(self.s.open_s * self.trips, self.s.max_open_s)
        self.period += 1
        self.probe = False
        self.counted = []

    def record(self, ticket: tuple[int, bool], result: Result, now: float) -> None:
        period, probe = ticket
        if probe:
            if period == self.period and self.probe:
                self.probe = False
                if result == "success":
                    self.is_open, self.trips, self.counted = False, 0, []
                    self.period += 1
                elif result == "failure":
                    self.trip(now)
            return
        if self.is_open or period != self.period or result == "ignored":
            return
        self.counted.append((now, result == "failure"))
        recent = [failed for t, failed in self.counted if t > now - self.s.window_s]
        if self.consecutive() >= self.s.consecutive_failures or (
            len(recent) >= self.s.min_calls and sum(recent) / len(recent) >= self.s.failure_rate
        ):
            self.trip(now)


breaker_settings = st.builds(
    BreakerSettings,
    consecutive_failures=st.integers(1, 6),
    # binary fractions: the two ways of comparing a rate agree exactly
    failure_rate=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
    window_s=st.sampled_from([10.0, 60.0]),
    min_calls=st.integers(1, 12),
    open_s=st.sampled_from([5.0, 30.0]),
    max_open_s=st.sampled_from([30.0, 100.0, 300.0]),
)


class BreakerMachine(RuleBasedStateMachine):
    """Drives the real machine and the reference with the same calls and clock."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.inflight: list[tuple[Ticket, tuple[int, bool]]] = []

    @initialize(s=breaker_settings)
    def setup(self, s: BreakerSettings) -> None:
        self.real = CircuitBreaker(s)
        self.ref = Reference(s)

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 4.0, 5.0, 9.0, 10.0, 29.0, 30.0, 31.0, 60.0, 301.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def admit(self) -> None:
        got = self.real.admit(self.now)
        want = self.ref.admit(self.now)
        assert (got is None) == (want is None)
        if got is not None and want is not None:
            assert got.probe == want[1]
            self.inflight.append((got, want))

    @precondition(lambda self: bool(self.inflight))
    @rule(
        index=st.integers(0, 50),
        result=st.sampled_from(["success", "failure", "failure", "ignored"]),
    )
    def finish(self, index: int, result: Result) -> None:
        real_ticket, ref_ticket = self.inflight.pop(index % len(self.inflight))
        self.real.record(real_ticket, result, self.now)
        self.ref.record(ref_ticket, result, self.now)

    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "real"):
            return
        now = self.now
        assert self.real.state(now) == self.ref.state(now)
        assert self.real.can_try(now) == self.ref.can_try(now)
        assert self.real.trips == self.ref.trips
        assert self.real.probe_in_flight == self.ref.probe
        if self.ref.is_open:
            assert self.real.open_until == self.ref.until
        else:
            assert self.real.consecutive == self.ref.consecutive()
            recent = [f for t, f in self.ref.counted if t > now - self.ref.s.window_s]
            assert self.real.window_counts(now) == (len(recent), sum(recent))

    @invariant()
    def at_most_one_probe(self) -> None:
        assert sum(1 for ticket, _ in self.inflight if ticket.probe) <= 1


BreakerMachine.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBreakerMachine = BreakerMachine.TestCase


@pytest.mark.parametrize("bad", [{"consecutive_failures": 0}, {"failure_rate": 1.5}])
def test_config_refuses_bad_thresholds(bad: dict[str, float]) -> None:
    from pydantic import ValidationError

    from llmgw.plugins.policies.breaker import BreakerPlugin

    with pytest.raises(ValidationError):
        BreakerPlugin.Config(**bad)  # type: ignore[arg-type]
