"""A retry budget per provider, so that a dead upstream is not hammered.

The shape of Finagle's ``RetryBudget`` and Envoy's retry budgets: over a sliding window
of ``window_s`` seconds, retries may be at most ``ratio`` of the requests sent plus a
small floor of ``min_retries`` (so a quiet gateway can still retry a one-off blip).
Pure: every method takes ``now``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any


class RetryBudget:
    """Counts first attempts (deposits) and retries (withdrawals) over a sliding window."""

    def __init__(self, ratio: float, min_retries: int, window_s: float) -> None:
        self.ratio = ratio
        self.min_retries = min_retries
        self.window_s = window_s
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.denied = 0
        """Retries refused since start (a figure for ``report_info``)."""

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        for q in (self._requests, self._retries):
            while q and q[0] <= horizon:
                q.popleft()

    def note_request(self, now: float) -> None:
        """Count a first attempt: each one earns ``ratio`` of a retry."""
        self._prune(now)
        self._requests.append(now)

    def allowance(self, now: float) -> int:
        """How many retries the window allows in all (floor plus the earned share)."""
        self._prune(now)
        # The epsilon keeps 0.2 * 5 from landing on 0.9999... and losing a retry.
        return self.min_retries + math.floor(self.ratio * len(self._requests) + 1e-9)

    def has_room(self, now: float) -> bool:
        """Whether one more retry fits; a refusal is counted in ``denied``. Nothing is
        spent: :meth:`spend` is called when the retry is really sent (the kernel may still
        not retry: the next attempt refused in preflight, attempts used up)."""
        allowance = self.allowance(now)  # prunes first: count only the window's retries
        if len(self._retries) + 1 > allowance:
            self.denied += 1
            return False
        return True

    def spend(self, now: float) -> None:
        """Count a retry that is being sent. Calls checked at once may each spend one
        after :meth:`has_room`: a storm limiter, over by at most the calls in flight."""
        self._prune(now)
        self._retries.append(now)

    def try_withdraw(self, now: float) -> bool:
        """:meth:`has_room`, then :meth:`spend`."""
        if not self.has_room(now):
            return False
        self.spend(now)
        return True

    def snapshot(self, now: float) -> dict[str, Any]:
        allowance = self.allowance(now)
        return {
            "window_s": self.window_s,
            "requests": len(self._requests),
            "retries": len(self._retries),
            "allowed": allowance,
            "remaining": max(0, allowance - len(self._retries)),
            "denied_total": self.denied,
        }
