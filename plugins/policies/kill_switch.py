"""Kill switches: ``LLM_GATEWAY_DISABLED`` and ``LLM_GATEWAY_EXPENSIVE_DISABLED``.

Both are checked on every call, in ``preflight`` and again in ``before_call`` (so a
switch turned on while a call is retrying or falling back stops the next attempt), and
whatever else ``plugins:`` enables or omits: the plugin is essential, the loader adds it
back when the list leaves it out.

A panel is one call: it is checked as a whole (the expensive threshold against its
members' worst cases summed) in preflight and in before_call. Its members' first attempts
are not preflighted again (the panel's preflight covered them), but each is checked in
its own before_call, the kill switch's being the first there, right before it is sent:
a switch turned on while the panel waited (for the ledger's lock, say) stops them. Every
later attempt of a member (a retry, a fallback) is checked in both, as any attempt.

Where a switch is read, on every call (nothing is cached):

1. the environment the gateway was started with (``settings.env``: the process
   environment plus the ``.env`` file beside ``routing.yaml``);
2. the live process environment (``os.environ``), for an embedding program or a test
   that sets a variable in-process;
3. the ``.env`` file beside ``routing.yaml``, re-read whenever its modification time
   changes. This is the way to flip a switch on a running server from outside: a
   process's environment cannot be changed by another process, a file can.

A switch is on when any of these says so (1, true, yes, on; any other non-empty value
that is not 0, false, no or off also counts as on, so a typo stops calls rather than
letting them through). Turning a switch *off* therefore takes effect without restart
only if it was not set when the gateway started; a switch set at start stays on until
restart. The kill switch errs on the side of stopping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import Field

from llmgw.kernel import (
    Call,
    CallRefused,
    ConfigError,
    ErrorClass,
    PluginContext,
    Rejection,
    Settings,
    hookimpl,
)
from llmgw.kernel.config import Model, read_dotenv

DISABLED = "LLM_GATEWAY_DISABLED"
EXPENSIVE_DISABLED = "LLM_GATEWAY_EXPENSIVE_DISABLED"
_OFF = frozenset({"", "0", "false", "no", "off"})


def switch_on(value: str | None) -> bool:
    """True for 1/true/yes/on and for anything not clearly off (fail safe)."""
    if value is None:
        return False
    return value.strip().lower() not in _OFF


def _usd(micro: int) -> str:
    return f"${micro / 1_000_000:.4f}"


class KillSwitchPlugin:
    """Refuses every call (``LLM_GATEWAY_DISABLED``) or expensive ones
    (``LLM_GATEWAY_EXPENSIVE_DISABLED``, above ``expensive_threshold_usd``)."""

    class Config(Model):
        """Section ``kill_switch`` of routing.yaml."""

        expensive_threshold_usd: Decimal = Field(default=Decimal("1.00"), ge=0)
        """With LLM_GATEWAY_EXPENSIVE_DISABLED on, calls (or panels, in total) whose worst-case
        cost is above this many USD are refused; an unknown price counts as above."""

    @staticmethod
    def essential(settings: Settings) -> str:
        """Always essential: a kill switch that config can drop is no kill switch."""
        return f"{DISABLED} and {EXPENSIVE_DISABLED} must be checked on every call"

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        config = ctx.config if ctx.config is not None else self.Config()
        self.threshold_micro = int(config.expensive_threshold_usd * 1_000_000)
        self._expensive_on = False  # as of the last check (set and read without an await)
        source = ctx.settings.source
        self._dotenv_path: Path | None = source.parent / ".env" if source else None
        self._dotenv_mtime: int | None = None
        self._dotenv: dict[str, str] = {}
        self._dotenv_error: str | None = None

    # --- reading the switches ------------------------------------------------------

    def _live_dotenv(self) -> Mapping[str, str]:
        """The ``.env`` beside routing.yaml as it is now (re-parsed when it changes)."""
        path = self._dotenv_path
        if path is None:
            return {}
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            self._dotenv_mtime, self._dotenv, self._dotenv_error = None, {}, None
            return {}
        if mtime != self._dotenv_mtime:
            try:
                self._dotenv = read_dotenv(path)
                self._dotenv_error = None
            except (ConfigError, OSError, UnicodeDecodeError) as exc:
                # A half-written .env must not switch a kill switch off: fail closed.
                self._dotenv_error = str(exc).splitlines()[0]
            self._dotenv_mtime = mtime
        return self._dotenv

    def state(self) -> dict[str, Any]:
        """Both switches now, with where each was found on."""
        dotenv = self._live_dotenv()
        sources: list[tuple[str, Mapping[str, str]]] = [
            ("startup environment", self.ctx.settings.env),
            ("process environment", os.environ),
            (".env", dotenv),
        ]
        out: dict[str, Any] = {}
        for key, var in (("disabled", DISABLED), ("expensive_disabled", EXPENSIVE_DISABLED)):
            found = [label for label, env in sources if switch_on(env.get(var))]
            out[key] = bool(found)
            out[f"{key}_by"] = found
        out["dotenv_error"] = self._dotenv_error
        return out

    # --- the checks ------------------------------------------------------------------

    def _check(self, call: Call) -> tuple[str, bool] | None:
        """(message, fallback allowed) when a switch refuses ``call``, else None."""
        st = self.state()
        self._expensive_on = bool(st["expensive_disabled"])
        if st["dotenv_error"]:
            return (
                f"the kill switch cannot read {self._dotenv_path} ({st['dotenv_error']}); "
                "calls are refused until the file is fixed",
                False,
            )
        if st["disabled"]:
            return (
                f"the gateway is disabled by {DISABLED} (set in the "
                f"{' and '.join(st['disabled_by'])}); unset it to allow calls",
                False,
            )
        if not st["expensive_disabled"]:
            return None
        worst = call.worst_case_micro_usd()
        what = (
            "this panel"
            if call.is_panel
            else (f"{call.target.key}" if call.target else "this call")
        )
        limit = _usd(self.threshold_micro)
        if worst is None:
            return (
                f"{EXPENSIVE_DISABLED} is on and the price of {what} is unknown, so it counts "
                f"as expensive (threshold {limit}, kill_switch.expensive_threshold_usd); "
                "add a price under prices: in routing.yaml or unset the switch",
                True,
            )
        if worst > self.threshold_micro:
            return (
                f"{EXPENSIVE_DISABLED} is on and the worst-case cost of {what} is "
                f"{_usd(worst)}, above the {limit} threshold "
                "(kill_switch.expensive_threshold_usd); lower max_tokens, pick a cheaper "
                "task class, or unset the switch",
                True,
            )
        return None

    def _covered(self, call: Call) -> bool:
        """A member's first attempt of a panel that passed both checks: its preflight is
        the panel's (see the module docstring)."""
        panel = call.panel
        return (
            panel is not None
            and panel.stash.get(self.ctx.name) is True
            and any(call is m for m in panel.members)
        )

    @hookimpl
    def preflight(self, call: Call) -> Rejection | None:
        """Refuse before anything is sent or reserved."""
        if self._covered(call):
            return None
        found = self._check(call)
        if found is None:
            return None
        message, fallback = found
        return Rejection(ErrorClass.KILL_SWITCH, message, fallback=fallback, plugin=self.ctx.name)

    @hookimpl
    def before_call(self, call: Call) -> None:
        """Check again before every attempt: a switch flipped mid-call stops retries."""
        found = self._check(call)
        if found is not None:
            message, fallback = found
            raise CallRefused(ErrorClass.KILL_SWITCH, message, fallback=fallback)
        if call.is_panel:
            call.stash[self.ctx.name] = True  # its members' first preflights: covered
        if not call.is_panel and self._expensive_on:
            # Approved as not expensive: a later plugin may not push it over the threshold.
            call.limit_cost(self.threshold_micro)

    @hookimpl
    def report_info(self) -> dict[str, Any]:
        st = self.state()
        return {
            "disabled": st["disabled"],
            "expensive_disabled": st["expensive_disabled"],
            "expensive_threshold_usd": self.threshold_micro / 1_000_000,
            "switched_on_by": {
                DISABLED: st["disabled_by"],
                EXPENSIVE_DISABLED: st["expensive_disabled_by"],
            },
            "dotenv_error": st["dotenv_error"],
        }
