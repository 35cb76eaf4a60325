"""The circuit breaker state machine of one (provider, model): pure, no I/O, no clock.

Every method takes ``now`` (a monotonic time in seconds), so the machine can be driven
and tested alone. The states:

- ``closed``: calls pass; outcomes are counted. It opens on ``consecutive_failures``
  failures in a row, or when at least ``min_calls`` outcomes in the last ``window_s``
  seconds include a share ``>= failure_rate`` of failures.
- ``open``: calls are refused until ``open_until``. The open period is ``open_s`` times
  the number of consecutive trips (trips without a close in between), capped at
  ``max_open_s``.
- ``half_open`` (derived: open and ``now >= open_until``): exactly one probe at a time is
  admitted. Its success closes the circuit (trips back to 0); its failure opens it
  again for longer; an ignored outcome (refused before sending, cancelled, a class that
  says nothing about health) frees the probe slot and the circuit stays half-open.

Outcomes of calls admitted in an earlier period (admitted while closed, finished after
the circuit opened) are stale and ignored: a *generation* number, bumped on every open
and close, tells them apart.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

Result = Literal["success", "failure", "ignored"]


class CircuitState(StrEnum):
    """What a caller of the circuit sees."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """Thresholds of one circuit (the ``breaker:`` section of routing.yaml)."""

    consecutive_failures: int = 5
    failure_rate: float = 0.5
    window_s: float = 60.0
    min_calls: int = 10
    open_s: float = 30.0
    max_open_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Ticket:
    """Given to an admitted call; hand it back with the call's result."""

    generation: int
    probe: bool


class CircuitBreaker:
    """One circuit. Not thread-safe; the gateway runs it on one event loop."""

    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self._open = False
        self.open_until = 0.0
        self.trips = 0
        """Consecutive trips: opens since the circuit last closed."""
        self.total_trips = 0
        self.consecutive = 0
        self.generation = 0
        self.probe_in_flight = False
        self._window: deque[tuple[float, bool]] = deque()
        self._window_failures = 0

    # --- reading (pure) ---------------------------------------------------------------

    def state(self, now: float) -> CircuitState:
        if not self._open:
            return CircuitState.CLOSED
        if now < self.open_until:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    def can_try(self, now: float) -> bool:
        """Whether a call would be admitted now (no side effects: for ``preflight``)."""
        state = self.state(now)
        if state is CircuitState.CLOSED:
            return True
        return state is CircuitState.HALF_OPEN and not self.probe_in_flight

    def window_counts(self, now: float) -> tuple[int, int]:
        """(calls, failures) counted in the last ``window_s`` seconds."""
        horizon = now - self.settings.window_s
        calls = sum(1 for t, _ in self._window if t > horizon)
        failures = sum(1 for t, failed in self._window if t > horizon and failed)
        return calls, failures

    # --- changing ---------------------------------------------------------------------

    def admit(self, now: float) -> Ticket | None:
        """Admit a call (claiming the probe slot when half-open), or None to refuse it."""
        state = self.state(now)
        if state is CircuitState.CLOSED:
            return Ticket(self.generation, probe=False)
        if state is CircuitState.HALF_OPEN and not self.probe_in_flight:
            self.probe_in_flight = True
            return Ticket(self.generation, probe=True)
        return None

    def record(self, ticket: Ticket, result: Result, now: float) -> None:
        """Count the result of an admitted call."""
        if ticket.probe:
            if ticket.generation != self.generation or not self.probe_in_flight:
                return
            self.probe_in_flight = False
            if result == "success":
                self._close()
            elif result == "failure":
                self._trip(now)
            return
        if self._open or ticket.generation != self.generation or result == "ignored":
            return
        failed = result == "failure"
        self.consecutive = self.consecutive + 1 if failed else 0
        self._window.append((now, failed))
        self._window_failures += failed
        self._prune(now)
        calls = len(self._window)
        if self.consecutive >= self.settings.consecutive_failures or (
            calls >= self.settings.min_calls
            and self._window_failures >= self.settings.failure_rate * calls
        ):
            self._trip(now)

    # --- internals --------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        horizon = now - self.settings.window_s
        while self._window and self._window[0][0] <= horizon:
            _, failed = self._window.popleft()
            self._window_failures -= failed

    def _reset_counts(self) -> None:
        self.consecutive = 0
        self._window.clear()
        self._window_failures = 0

    def _trip(self, now: float) -> None:
        self.trips += 1
        self.total_trips += 1
        self._open = True
        self.open_until = now + min(self.settings.open_s * self.trips, self.settings.max_open_s)
        self.generation += 1
        self.probe_in_flight = False
        self._reset_counts()

    def _close(self) -> None:
        self._open = False
        self.trips = 0
        self.generation += 1
        self._reset_counts()
