"""Retry of transient upstream failures: full-jitter backoff, server hints, a budget.

The loop itself is the kernel's: ``after_call`` only advises. For a transient class
(``errors.TRANSIENT``; ``malformed_response`` once only) with attempts left on the same
target it returns ``Disposition("retry", delay)``, the delay drawn from full jitter
``uniform(0, min(max_delay_s, base_delay_s * 2**(attempt-1)))`` (tenacity's exponential
window, drawn with the gateway's injected rng) and never shorter than the server's hint
(``outcome.retry_after_s``). When the hint is longer than ``max_hint_s``, or the wait
would cross the call's deadline, or the provider's retry budget is spent, it advises
``fallback`` instead. Every other class gets no advice (no retry).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from pydantic import Field, PositiveInt, model_validator

from llmgw.kernel import TRANSIENT, Call, Disposition, ErrorClass, Outcome, PluginContext, hookimpl
from llmgw.kernel.config import Model

from .retry_budget import RetryBudget

if TYPE_CHECKING:
    import tenacity


class _Strategies:
    """tenacity's stop and full-jitter wait, built on the first failure that asks.

    Imported then, not at start: a gateway whose calls never fail never loads tenacity
    (~5 ms of a cold start). tenacity draws from the ``random`` module; the wait here
    draws from the gateway's injected ``random.Random`` (a gateway's tests need their
    own seed).
    """

    def __init__(self, rng: random.Random, max_attempts: int, base: float, cap: float) -> None:
        import tenacity

        class FullJitter(tenacity.wait_random_exponential):
            def __call__(self, retry_state: tenacity.RetryCallState) -> float:
                high = tenacity.wait_exponential.__call__(self, retry_state)
                return rng.uniform(self.min, high)

        self.tenacity = tenacity
        self.stop = tenacity.stop_after_attempt(max_attempts)
        self.wait = FullJitter(multiplier=base, max=cap)
        # The strategies read a RetryCallState; this Retrying is only their owner.
        self.retrying = tenacity.Retrying(stop=self.stop, wait=self.wait)

    def state(self, attempt: int) -> tenacity.RetryCallState:
        state = self.tenacity.RetryCallState(self.retrying, None, (), {})
        state.attempt_number = attempt
        return state


class RetryPlugin:
    """Advises the kernel to retry the same target, or to fall back, per attempt."""

    class Config(Model):
        """The ``retry:`` section."""

        max_attempts: PositiveInt = Field(default=3, le=20)
        """Attempts per target, the first included."""
        base_delay_s: float = Field(default=0.5, gt=0)
        """Backoff window after the first failure; it doubles with each attempt."""
        max_delay_s: float = Field(default=8.0, gt=0)
        """Cap of the backoff window (full jitter: the wait is uniform in the window)."""
        max_hint_s: float = Field(default=30.0, gt=0)
        """A server hint longer than this falls back instead of waiting."""
        budget_ratio: float = Field(default=0.2, ge=0, le=1)
        """Retries allowed per provider, as a share of its requests in the budget window."""
        budget_min_retries: int = Field(default=5, ge=0)
        """Retries per provider always allowed in the budget window, on top of the share."""
        budget_window_s: float = Field(default=10.0, gt=0)
        """Length in seconds of the sliding window of the retry budget."""
        min_attempt_s: float = Field(default=1.0, ge=0, le=600)
        """A retry is made only if at least this long is left of the call's deadline after
        its wait; otherwise the call falls back at once (a retry with no time to answer is
        sent, possibly billed, and times out)."""

        @model_validator(mode="after")
        def _delays(self) -> RetryPlugin.Config:
            if self.max_delay_s < self.base_delay_s:
                raise ValueError(
                    f"max_delay_s ({self.max_delay_s}) is shorter than base_delay_s "
                    f"({self.base_delay_s}); make max_delay_s at least base_delay_s"
                )
            return self

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        self.cfg: RetryPlugin.Config = ctx.config or RetryPlugin.Config()
        self._built: _Strategies | None = None
        self.budgets: dict[str, RetryBudget] = {}

    @property
    def strategies(self) -> _Strategies:
        """tenacity's stop and wait for this configuration (built on first use)."""
        if self._built is None:
            c = self.cfg
            self._built = _Strategies(self.ctx.rng, c.max_attempts, c.base_delay_s, c.max_delay_s)
        return self._built

    def budget(self, provider: str) -> RetryBudget:
        """The retry budget of ``provider`` (shared by its models)."""
        found = self.budgets.get(provider)
        if found is None:
            c = self.cfg
            found = RetryBudget(c.budget_ratio, c.budget_min_retries, c.budget_window_s)
            self.budgets[provider] = found
        return found

    def backoff(self, attempt: int) -> float:
        """The full-jitter delay after failed attempt number ``attempt`` (1-based)."""
        s = self.strategies
        return float(s.wait(s.state(attempt)))

    @hookimpl
    def after_call(self, call: Call, outcome: Outcome) -> Disposition | None:
        target = call.target
        if target is None:
            return None
        now = self.ctx.clock.monotonic()
        budget = self.budget(target.provider)
        error_class = outcome.error_class
        # A first attempt that went (or tried to go) upstream earns retry budget.
        if call.attempt == 1 and (outcome.ok or outcome.sent or error_class in TRANSIENT):
            budget.note_request(now)
        if outcome.ok or error_class is None or error_class not in TRANSIENT:
            return None
        if error_class is ErrorClass.MALFORMED_RESPONSE and any(
            t == target and o.error_class is ErrorClass.MALFORMED_RESPONSE for t, o in call.history
        ):
            return None  # retried once already: the upstream answers garbage
        s = self.strategies
        if s.stop(s.state(call.attempt)):
            return None  # attempts exhausted: the fallback plugin's advice applies
        remaining = call.deadline - now
        hint = outcome.retry_after_s
        if hint is not None and hint > self.cfg.max_hint_s:
            return self._skip(call, f"server asks to wait {hint:g} s (> max_hint_s)")
        delay = self.backoff(call.attempt)
        if hint is not None:
            delay = max(delay, hint)
        if delay + self.cfg.min_attempt_s >= remaining:
            return self._skip(
                call,
                f"waiting {delay:.2f} s would leave less than min_attempt_s "
                f"({self.cfg.min_attempt_s:g} s) of the deadline for the retry",
            )
        if not budget.has_room(now):
            return self._skip(call, f"retry budget of provider {target.provider} is spent")
        return Disposition("retry", delay, reason=f"{error_class.value}, attempt {call.attempt}")

    @hookimpl
    def before_call(self, call: Call) -> None:
        # A retry is spent from the budget when it is sent, not when it is advised: the
        # kernel may not make it (its preflight refused, attempts used up).
        if call.attempt > 1 and call.target is not None:
            self.budget(call.target.provider).spend(self.ctx.clock.monotonic())

    def _skip(self, call: Call, why: str) -> Disposition:
        call.meta["retry_skipped"] = why
        return Disposition("fallback", reason=why)

    @hookimpl
    def report_info(self) -> dict[str, Any]:
        now = self.ctx.clock.monotonic()
        c = self.cfg
        return {
            "max_attempts": c.max_attempts,
            "base_delay_s": c.base_delay_s,
            "max_delay_s": c.max_delay_s,
            "max_hint_s": c.max_hint_s,
            "min_attempt_s": c.min_attempt_s,
            "budget": {"ratio": c.budget_ratio, "min_retries": c.budget_min_retries},
            "budgets": {p: b.snapshot(now) for p, b in sorted(self.budgets.items())},
        }
