"""The spend ledger: reserve every attempt's worst case before it is sent, settle after.

Invariant, per UTC month and scope (the total, each provider):
``settled + reserved + unknown <= cap``, also under concurrency and across processes
sharing the ledger file. How:

- ``before_call`` reserves the attempt's true upper bound (input bound x input price +
  ``max_tokens`` x output price) in one ``BEGIN IMMEDIATE`` transaction across all scopes
  (:mod:`.ledger_store`), before any byte leaves the process. Every retry and fallback
  attempt reserves for itself. A panel reserves all its members at once, all or nothing,
  and hands each member's first attempt its reservation.
- ``after_call`` settles from the usage (idempotent by reservation id; billed errors
  too), keeps a sent attempt without usage (timeout, reset, cancel) charged as
  ``unknown``, and releases what was never sent.
- Reservations carry a lease; at start, expired ones (a crashed process) become
  ``unknown``, never released.
- Fail closed: a ledger error, or an unknown price while a cap applies, refuses the call.
- At start, the current month's totals are checked against its entries (one read of
  that month). Damaged totals (a hand edit, a file restored from elsewhere) are logged
  and shown in ``llm_routing_info``; while a damaged scope has a cap, calls are refused
  until ``llmgw spend --repair`` mends it (re-read at most every ``DAMAGE_RECHECK_S``).

Speed without weakening any of that (figures in docs/performance.md):

- The SQLite work runs on the ledger's writer thread (:mod:`.ledger_writer`): a
  ``synchronous=FULL`` commit waits for the disk and a write may wait for another
  process's lock, and every other request would wait with it. The one exception is below
  (inline when alone): then no other request of this gateway is waiting on the ledger and
  it never waits for a lock.
- Group commit: the writer runs everything queued in one transaction, one savepoint per
  write, so concurrent calls share one ``fsync``; a write is acknowledged only after that
  COMMIT (durable).
- Inline when alone: a reservation made while no other call of this gateway is out and
  the writer is idle commits on the event loop thread (same connection, same lock, one
  ``BEGIN IMMEDIATE`` try, together with the queued settles), saving the hop to the
  thread and back; locked by another process, it goes to the thread as above. Not for a
  panel: applied on the loop and committed on the thread (the writer's loop batch), its
  slowest member answered 0.3-0.7 ms sooner in interleaved runs, although its request
  left ~0.4 ms later (bench/README.md); for one call after another, inline stays faster.
- A reservation is waited for (nothing is sent before it is on disk); a settle, unknown
  or release is handed to the writer and ``after_call`` returns at once. That is safe:
  until it commits, the reservation keeps the worst case counted (the invariant is only
  more conservative meanwhile), and if the process dies first the lease turns the
  reservation ``unknown`` at the next start (charged, never lost). Whatever reads spend
  (``report_info``, :meth:`LedgerPlugin.flush`, ``shutdown``) first waits for the writes
  queued before it. When the gateway goes idle, the last settles commit within ~60 ms
  (the writer's own look at its queue, then the linger); until then another process
  sharing the file sees their worst case still held.

Holds (``hold_ahead``, on by default): the one durable commit left on a call's path is
its reservation's. So a reservation also reserves, in the same transaction and under the
same cap check, a hold: ``hold_ahead`` more worst cases of that attempt for its provider
(whole units, at most a quarter of what each cap leaves). The next attempts to that
provider are covered by the hold, on disk before they are made: each takes its worst case
out of the hold in memory, all or nothing for a panel, and is sent without waiting for a
write. Its own entry is drawn from the hold later, with the writes queued (:class:`Draw`:
the amount moves from the hold's entry to the attempt's, the totals do not change), and
the settle follows as before. An attempt the hold cannot cover reserves for itself and
takes a new hold; the old one is given back in that same transaction (first, so its
headroom counts). So one call in ``hold_ahead + 1`` waits for a commit. Topping a hold up
in the background was tried: on this kind of machine its commit took ~13 ms (the writer
thread waits for the event loop's GIL at each step), longer than the hold lasted. A hold
is given back when no attempt has drawn from it for ``hold_idle_s`` (each hold on its own:
its lease, renewed only by its draws, must never run out while this gateway lives), when
its lease ends within ``hold_idle_s`` on the wall clock (a machine that slept), and at
shutdown; one taken by a reservation that commits during shutdown is released at once.
A hold is kept as its reservation completes, on whichever thread completes it, before any
later write is handed back (``on_done``), so a call refused in the same batch finds it.
Giving back releases exactly what no attempt took (:class:`GiveBack`): if an
attempt's draw could not be written (the ledger locked past ``busy_timeout_s``), its
amount stays in the hold, reserved, and turns unknown with the lease; it was sent. A
reservation refused by a cap while this gateway holds money (or gave a hold back while
it was out) gives every hold back, first in the next transaction, and is checked again, at
most three times in all: this gateway's holds never refuse a call
that fits without them (another gateway's may, until it goes idle). The invariant holds
throughout: a hold is counted as reserved from its commit until each amount leaves it
into an attempt's reservation or is released. A process that dies keeps its hold charged:
its lease turns what is left ``unknown`` at the next start, as any reservation; that may
include attempts drawn but not yet written, which is why it is never released. Near a cap
the holds shrink to nothing and each attempt reserves for itself again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from llmgw.kernel import (
    Call,
    CallRefused,
    ConfigError,
    ErrorClass,
    Outcome,
    PluginContext,
    Settings,
    hookimpl,
)
from llmgw.kernel.types import new_id

from .ledger_config import (
    LEDGER_ENV,
    LedgerConfig,
    caps_hint,
    ledger_enabled,
    ledger_path,
    resolve_caps,
)
from .ledger_messages import cap_message, ledger_failed, scope_label, totals_damaged
from .ledger_ops import Ahead, Draw, GiveBack, MarkUnknown, Op, Release, Reserve, Settle
from .ledger_report import build_report, format_spend, spend_report
from .ledger_sql import HOLD_MODEL
from .ledger_store import (
    TOTAL,
    CapExceeded,
    Item,
    LedgerError,
    LedgerReader,
    LedgerStore,
    month_of,
)
from .ledger_writer import LedgerWriter

__all__ = ["LedgerPlugin", "format_spend", "spend_report"]

#: While the totals are damaged and a cap is set, how often a call re-reads them (a repair
#: made meanwhile lets calls through again without a restart).
DAMAGE_RECHECK_S = 5.0

#: A hold's request id (its model and task class are ``HOLD_MODEL``, its attempt 0).
HOLD_REQUEST = "hold"


@dataclass(eq=False)
class _Hold:
    """A hold of this gateway: reserved on disk for ``provider``'s next attempts in
    ``month``. ``free`` is what no attempt has drawn yet (only what has committed)."""

    id: str
    month: str
    provider: str
    free: int
    #: ``time.monotonic()`` of its taking or last draw: unused for ``hold_idle_s``, it is
    #: given back (well before its lease, which only its draws renew, runs out).
    used: float = 0.0
    #: When its lease ends (wall clock, as stored): a hold is not drawn from, and is given
    #: back, within ``hold_idle_s`` of it (a machine that slept, a commit that waited).
    lease_end: float = 0.0


class LedgerPlugin:
    """SQLite spend ledger with monthly caps; on by default, essential when a cap is set."""

    Config = LedgerConfig

    @staticmethod
    def essential(settings: Settings) -> str | None:
        """A cap set in the environment or routing.yaml makes the ledger unremovable."""
        return caps_hint(settings, settings.section("ledger"))

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        self.config: LedgerConfig = ctx.config if ctx.config is not None else LedgerConfig()
        self.caps, self.cap_origin = resolve_caps(ctx.settings, self.config)
        self.enabled = ledger_enabled(ctx.settings.env)
        if not self.enabled and self.caps.any:
            raise ConfigError(
                f"{LEDGER_ENV}=0 turns the spend ledger off, but a monthly cap is set "
                f"({', '.join(sorted(self.cap_origin.values()))}) and caps are enforced by "
                "the ledger",
                file="environment",
                path=LEDGER_ENV,
                fix=f"unset {LEDGER_ENV}, or remove the caps",
            )
        self.path = ledger_path(ctx.settings, self.config)
        self.store = LedgerStore(self.path, busy_timeout_s=self.config.busy_timeout_s)
        self.open_error: str | None = None
        self.opened = False
        self.expired_at_start = 0
        # One thread of its own: writes run in submission order, group-committed.
        self.writer = LedgerWriter(self.store)
        # Attempts of this gateway between their reservation and their after_call: while
        # another one is out, a reservation goes to the writer thread (group commit).
        self.in_flight = 0
        #: This month's totals rows that do not match its entries (read at open, again
        #: at most every DAMAGE_RECHECK_S while there are any), and those of them in a
        #: scope with a cap (they refuse calls).
        self.damage: list[str] = []
        self.damage_capped: list[str] = []
        self._damage_checked = 0.0
        #: This gateway's holds by (month, provider); changed under ``_holds_lock`` (the
        #: event loop draws and takes them, the idle timer's thread gives them back).
        self.holds: dict[tuple[str, str], _Hold] = {}
        self._holds_lock = threading.RLock()
        self._idle_timer: threading.Timer | None = None
        #: Holds given back so far: a reservation refused by the cap checks again if any
        #: was given back while it was out (it may have counted against it).
        self._given_back = 0
        #: Shutting down: a hold a reservation still committing takes is released at once.
        self._closing = False
        #: Providers a reservation out now asks a hold for: the calls that miss meanwhile
        #: reserve without asking for one more (50 calls in flight would take 50 holds).
        self._asking: set[str] = set()
        if self.enabled:
            if ctx.check_only:
                self.open_error = path_problem(self.path, self.config.busy_timeout_s)
            else:
                self._open()

    def _open(self) -> None:
        """Open (at start; again before a call if that failed), turn the expired
        reservations of a process that stopped into ``unknown``, then check this month's
        totals against its entries."""
        if self.opened:
            return
        try:
            self.store.open()
            self.expired_at_start = self.store.expire_leases(self.ctx.clock.now())
            if self.store.unexpired:
                # Damage in some month's totals (any month): reported, not fatal. A
                # damaged scope with a cap this month still refuses calls (_check_totals).
                self.ctx.log.error(
                    "ledger.leases_not_expired",
                    path=str(self.path),
                    count=len(self.store.unexpired),
                    first=self.store.unexpired[0][:300],
                    note="they stay reserved (charged in full); their month's totals "
                    "do not match its entries",
                    fix="llmgw spend --check, then llmgw spend --repair",
                )
            self.open_error = None
            self.opened = True
        except LedgerError as exc:
            # Not a start-up failure: every call is refused (fail closed) until it opens.
            self.open_error = str(exc)
            self.ctx.log.error("ledger.open_failed", path=str(self.path), error=str(exc))
            return
        if self.expired_at_start:
            self.ctx.log.warning(
                "ledger.leases_expired",
                count=self.expired_at_start,
                note="reservations of a process that stopped are kept charged as unknown",
            )
        self._check_totals()
        if self.damage:
            self.ctx.log.error(
                "ledger.totals_damaged",
                path=str(self.path),
                problems=self.damage,
                calls_refused=bool(self.damage_capped),
                fix="llmgw spend --repair",
            )

    def _check_totals(self) -> None:
        """Read this month's totals against its entries (blocking: at open, on the writer
        thread, or in ``report_info``'s worker thread). Damage matters to calls only in a
        scope with a cap (``damage_capped``); the rest is reported. A failed read changes
        nothing: a reservation reads the totals itself, and fails closed if it cannot."""
        self._damage_checked = self.ctx.clock.monotonic()
        month = month_of(self.ctx.clock.now())
        try:
            found = self.store.month_audit(month)
        except LedgerError as exc:
            self.ctx.log.warning("ledger.check_failed", path=str(self.path), error=str(exc))
            return
        was = bool(self.damage)
        self.damage = found.problems
        self.damage_capped = [
            problem
            for (_, scope), problems in sorted(found.damaged.items())
            if self.caps.for_scope(scope) is not None
            for problem in problems
        ]
        if was and not self.damage:
            self.ctx.log.info("ledger.totals_match", path=str(self.path), month=month)

    def _damage_due(self) -> bool:
        """Damage known, and not re-read for ``DAMAGE_RECHECK_S``."""
        return bool(self.damage) and (
            self.ctx.clock.monotonic() - self._damage_checked >= DAMAGE_RECHECK_S
        )

    # --- before_call: reserve --------------------------------------------------------

    @hookimpl
    async def before_call(self, call: Call) -> None:
        """Reserve the attempt's worst case (a panel: all members at once)."""
        if not self.enabled:
            return
        if not self.opened:
            await self.writer.run_plain(self._open)
            if not self.opened:
                raise ledger_failed(self.open_error or "not open", self.caps, self.cap_origin)
        if self.damage_capped:
            if self._damage_due():
                # Every call waits for it anyway: none goes out while the damage stands.
                await self.writer.run_plain(self._check_totals)
            if self.damage_capped:
                raise totals_damaged(
                    self.damage_capped, self.caps, self.cap_origin, DAMAGE_RECHECK_S
                )
        mine = call.stash.get(self.ctx.name)
        if mine is not None and mine.get("pre"):
            mine["used"] = True  # a panel member's first attempt: reserved with the panel
            call.limit_cost(int(mine["amount"]))
            return
        calls = call.members if call.is_panel else (call,)
        items = [self._item(c) for c in calls]
        now = self.ctx.clock.now()
        self._free_unsent_first(call, now)
        if not self._draw(items, now):
            await self._reserve(call, items, now)
        if call.is_panel:
            for member, item in zip(call.members, items, strict=True):
                member.stash[self.ctx.name] = {
                    "reservation": item.id,
                    "amount": item.amount_micro,
                    "pre": True,
                    "used": False,
                }
        call.stash[self.ctx.name] = {
            "reservation": items[0].id if not call.is_panel else None,
            "amount": sum(i.amount_micro for i in items),
            "out": True,  # counted in in_flight until its after_call
        }
        if not call.is_panel and worst_known(call):
            # A plugin listed after the ledger may not enlarge what was reserved: the
            # kernel refuses to send a request whose worst case exceeds this.
            call.limit_cost(items[0].amount_micro)
        # Last: after_call runs (and counts it back) once before_call has completed.
        self.in_flight += 1

    async def _reserve(self, call: Call, items: list[Item], now: datetime) -> None:
        """Reserve ``items`` in a transaction of their own, waiting for its commit, and
        take holds for their providers as the caps allow (see "Holds" above)."""
        ahead = self._ahead(items, now)

        def release_all(_: object) -> None:
            # Its holds, if any, were kept when it committed (see below): only the items.
            for item in items:
                self._later(Release(item.id, now, "cancelled"), item.id)

        for tries in range(1, 4):
            given_back = self._given_back

            def done(
                taken: list[tuple[str, int]] | None,
                exc: BaseException | None,
                ahead: list[Ahead] = ahead,
            ) -> None:
                # On the thread that completed the write, before any later write is
                # handed back: a call refused by the cap right after this one already
                # finds its holds here, and can give them back.
                if exc is None:
                    self._took(taken or [], ahead, now)
                else:
                    self._asked(ahead)

            try:
                await self.writer.run(
                    Reserve(items, self.caps, now, self.config.lease_s, ahead),
                    if_abandoned=release_all,
                    # A panel's reservation is committed on the thread even when alone:
                    # see "Inline when alone" in the module docstring.
                    inline=self.in_flight == 0 and not call.is_panel,
                    on_done=done,
                )
            except CapExceeded as exc:
                ahead = []
                if tries < 3 and (self.holds or self._given_back != given_back):
                    # This gateway's own holds (for other providers, or taken by another
                    # call meanwhile) must never refuse a call that fits without them:
                    # give them all back, first in the next transaction, and check again.
                    self._give_back(now)
                    continue
                raise CallRefused(
                    ErrorClass.BUDGET_EXCEEDED,
                    cap_message(exc, call, self.caps, self.cap_origin),
                    fallback=exc.provider_only and not call.is_panel,
                    details={"scopes": [b.use.scope for b in exc.breaches]},
                ) from None
            except LedgerError as exc:
                raise ledger_failed(str(exc), self.caps, self.cap_origin) from None
            return

    # --- holds -------------------------------------------------------------------------

    def _draw(self, items: list[Item], now: datetime) -> bool:
        """Cover every item from this gateway's holds, all or none: True when drawn (each
        item's entry is queued, to be drawn from its hold)."""
        if not self.holds:
            return False
        month = month_of(now)
        need: dict[str, int] = {}
        for item in items:
            need[item.provider] = need.get(item.provider, 0) + item.amount_micro
        wall = now.timestamp()
        soon = wall + self.config.hold_idle_s
        with self._holds_lock:
            found = []
            for provider, amount in need.items():
                hold = self.holds.get((month, provider))
                if hold is None or hold.free < amount or amount <= 0 or hold.lease_end < soon:
                    return False
                found.append((hold, amount))
            by_provider = {}
            used = time.monotonic()
            for hold, amount in found:
                hold.free -= amount
                hold.used = used
                hold.lease_end = wall + self.config.lease_s  # what its draws renew
                by_provider[hold.provider] = hold
            # Queued under the lock: a hold given back (idle, replaced) is released after
            # every draw from it, in the writer's order.
            for item in items:
                hold = by_provider[item.provider]
                self._later(Draw(hold.id, item, now, self.config.lease_s), item.id)
        return True

    def _ahead(self, items: list[Item], now: datetime) -> list[Ahead]:
        """The holds to ask for with a reservation of ``items``: one per provider, sized by
        its largest item. The holds they replace (too small, or of another month) are
        given back first, in the same transaction, so their headroom counts."""
        if not self.config.hold_ahead:
            return []
        ahead = []
        for provider in dict.fromkeys(i.provider for i in items):
            unit = max(i.amount_micro for i in items if i.provider == provider)
            if unit <= 0:
                continue
            self._give_back(now, provider)
            with self._holds_lock:
                if provider in self._asking:
                    continue
                self._asking.add(provider)
            item = Item(new_id(), provider, HOLD_MODEL, HOLD_MODEL, HOLD_REQUEST, 0, attempt=0)
            ahead.append(Ahead(item, unit, self.config.hold_ahead))
        return ahead

    def _asked(self, ahead: list[Ahead]) -> None:
        """The reservation that asked for ``ahead`` is over: other calls may ask again."""
        with self._holds_lock:
            for a in ahead:
                self._asking.discard(a.item.provider)

    def _took(self, taken: list[tuple[str, int]], ahead: list[Ahead], now: datetime) -> None:
        """Keep the holds a reservation made at ``now`` took (replacing any another call
        of this gateway took meanwhile) and see that they are given back when unused."""
        asked = {a.item.id: a for a in ahead}
        month = month_of(now)
        lease_end = now.timestamp() + self.config.lease_s
        with self._holds_lock:
            self._asked(ahead)
            if self._closing:  # taken as the gateway shuts down: nothing will draw on it
                for hold_id, _ in taken:
                    self._later(Release(hold_id, now), hold_id)
                return
            for hold_id, amount in taken:
                provider = asked[hold_id].item.provider
                if (month, provider) in self.holds:  # another call's, taken meanwhile
                    self._drop((month, provider), now)
                self.holds[(month, provider)] = _Hold(
                    hold_id, month, provider, amount, time.monotonic(), lease_end
                )
            if taken and self._idle_timer is None:
                self._arm(self.config.hold_idle_s)

    def _give_back(
        self, now: datetime, provider: str | None = None, idle_before: float | None = None
    ) -> None:
        """Give back the holds of ``provider`` (any month; None: every provider), or
        those last used before ``idle_before`` (monotonic) or whose lease ends within
        ``hold_idle_s`` of ``now``."""
        soon = now.timestamp() + self.config.hold_idle_s
        with self._holds_lock:
            for key, hold in list(self.holds.items()):
                if provider not in (None, key[1]):
                    continue
                if idle_before is not None and hold.used > idle_before and hold.lease_end >= soon:
                    continue
                self._drop(key, now)

    def _drop(self, key: tuple[str, str], now: datetime) -> None:
        """Forget a hold and queue the release of what no attempt has drawn from it (after
        every draw from it, in the writer's order; the lock held). Only that: if a draw's
        write failed, its amount stays in the hold, reserved, and turns unknown with the
        lease (it was sent)."""
        hold = self.holds.pop(key)
        self._given_back += 1
        self._later(GiveBack(hold.id, hold.free, now), hold.id)

    def _arm(self, delay: float) -> None:
        timer = threading.Timer(delay, self._idle)
        timer.daemon = True
        self._idle_timer = timer
        timer.start()

    def _idle(self) -> None:
        """On the timer's thread: give back each hold no attempt has drawn from for
        ``hold_idle_s``, and look again when the next one would be."""
        idle_s = self.config.hold_idle_s
        with self._holds_lock:
            self._idle_timer = None
            self._give_back(self.ctx.clock.now(), idle_before=time.monotonic() - idle_s)
            if self.holds:
                self._arm(
                    max(0.01, min(h.used for h in self.holds.values()) + idle_s - time.monotonic())
                )

    def _free_unsent_first(self, call: Call, now: datetime) -> None:
        """A panel member attempting past its first attempt, which never reached this
        plugin (refused in preflight, its target claimed by another member, skipped at the
        deadline), no longer needs what the panel reserved for it: released now, queued
        ahead of this attempt's reservation so it joins the same transaction first. Held
        until the panel's end, it could make the cap refuse this very fallback."""
        panel = call.panel
        if panel is None or call.member_index is None or call.member_index >= len(panel.members):
            return
        first = panel.members[call.member_index]
        pre = first.stash.get(self.ctx.name) if first is not call else None
        if pre and pre.get("pre") and not pre.get("used"):
            pre["pre"] = False  # no longer held for it: the panel's end skips it
            rid = str(pre["reservation"])
            self._later(Release(rid, now), rid)

    def _item(self, call: Call) -> Item:
        assert call.target is not None
        worst = call.worst_case_micro_usd()
        if worst is None:
            applicable = [
                s
                for s in (TOTAL, f"provider:{call.target.provider}")
                if self.caps.for_scope(s) is not None
            ]
            if applicable:
                where = " and ".join(scope_label(s, self.caps, self.cap_origin) for s in applicable)
                raise CallRefused(
                    ErrorClass.BUDGET_EXCEEDED,
                    f"the price of {call.target.key} is unknown, so its cost cannot be "
                    f"reserved against the {where}; add it under prices: in routing.yaml",
                    fallback=True,
                )
        return Item(
            id=new_id(),
            provider=call.target.provider,
            model=call.target.model,
            task_class=call.task_class,
            request_id=call.request.request_id,
            amount_micro=worst or 0,
            priced=worst is not None,
            attempt=call.attempt,
        )

    # --- after_call: settle ----------------------------------------------------------

    @hookimpl
    async def after_call(self, call: Call, outcome: Outcome) -> None:
        """Settle, keep as unknown, or release; a panel releases unused pre-reservations."""
        if not self.enabled:
            return
        now = self.ctx.clock.now()
        mine = call.stash.get(self.ctx.name)
        if mine is not None and mine.pop("out", False):
            self.in_flight -= 1
        if call.is_panel:
            unused = [
                s["reservation"]
                for m in call.members
                if (s := m.stash.get(self.ctx.name)) and s.get("pre") and not s.get("used")
            ]
            for rid in unused:
                self._later(Release(rid, now), rid)
            return
        if mine is None or mine.get("reservation") is None or mine.get("settled"):
            return
        rid = str(mine["reservation"])
        error = outcome.error_class.value if outcome.error_class else None
        op: Op
        if outcome.usage is not None:
            op = Settle(
                rid,
                outcome.cost_micro_usd,
                now,
                outcome.usage.input_tokens,
                outcome.usage.output_tokens,
                error,
            )
        elif outcome.sent and outcome.cost_micro_usd is not None:
            # The upstream answered with an error status and no usage (the kernel prices
            # that at 0): a definite answer, not an unknown.
            op = Settle(rid, outcome.cost_micro_usd, now, 0, 0, error)
        elif outcome.sent:
            op = MarkUnknown(rid, now, error)
        else:
            op = Release(rid, now, error)
        self._later(op, rid)
        mine["settled"] = True

    def _later(self, op: Op, rid: str) -> None:
        """Hand a settle, unknown, release or draw to the writer without waiting for its
        commit (see the module docstring for why that is safe); a failure is logged."""

        def done(f: concurrent.futures.Future[bool]) -> None:
            exc = None if f.cancelled() else f.exception()
            if exc is not None:
                # The entry (or the hold it was drawn from) stays reserved; its lease turns
                # it unknown (charged) at the next start.
                self.ctx.log.error(
                    "ledger.write_failed",
                    write=type(op).__name__.lower(),
                    reservation=rid,
                    error=str(exc),
                )

        self.writer.submit(op, lazy=True).add_done_callback(done)

    async def flush(self) -> None:
        """Wait until every ledger write queued so far has committed (or failed)."""
        if self.enabled:
            await asyncio.wrap_future(self.writer.flush())

    def _flush_blocking(self) -> str | None:
        """:meth:`flush` for sync callers; an error text if it did not finish in time."""
        try:
            self.writer.flush().result(timeout=self.config.busy_timeout_s + 1)
        except concurrent.futures.TimeoutError:
            return f"{self.writer.pending} ledger write(s) still pending"
        return None

    # --- info ------------------------------------------------------------------------

    @hookimpl
    def report_info(self) -> dict[str, Any]:
        month = month_of(self.ctx.clock.now())
        if self.enabled and not self.opened and self.path.exists() and not self.ctx.check_only:
            self._open()
        store = self.store if self.opened else None
        error = self.open_error
        if store is not None:
            error = self._flush_blocking() or error  # the report includes every settle
        try:
            report = build_report(
                store,
                self.caps,
                self.cap_origin,
                month=month,
                path=str(self.path),
                enabled=self.enabled,
                error=error,
            )
        except LedgerError as exc:
            report = build_report(
                None,
                self.caps,
                self.cap_origin,
                month=month,
                path=str(self.path),
                enabled=self.enabled,
                error=str(exc),
            )
        report["lease_s"] = self.config.lease_s
        report["expired_at_start"] = self.expired_at_start
        if self.opened and self._damage_due():
            self._check_totals()  # in llm_routing_info's worker thread
        report["totals_damage"] = list(self.damage)
        return report

    @hookimpl
    def shutdown(self) -> None:
        """Give the holds back, commit every queued write, then close the file."""
        with self._holds_lock:
            self._closing = True
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
        self._give_back(self.ctx.clock.now())
        self.writer.close()
        self.store.close()


def worst_known(call: Call) -> bool:
    """True when the call's worst case is computable (a known price)."""
    return call.worst_case_micro_usd() is not None


def path_problem(path: Path, busy_timeout_s: float = 5.0) -> str | None:
    """Why the ledger at ``path`` could not be opened or created, without creating or
    writing anything (``llmgw check-config``), or None."""
    directory = path.parent
    if path.exists():
        if not path.is_file():
            return f"{path} exists and is not a file"
        if not os.access(path, os.R_OK | os.W_OK):
            return f"{path} is not readable and writable by this user"
        try:  # read-only: a file that is no database, or a damaged one, is found here
            reader = LedgerReader(path, busy_timeout_s=busy_timeout_s)
            try:
                verdict = reader.quick_check()
            finally:
                reader.close()
        except LedgerError as exc:
            return str(exc)
        if verdict != "ok":
            return f"{path} is damaged: {verdict[:200]} (see llmgw spend --check)"
    else:
        while not directory.exists():
            directory = directory.parent
        if not directory.is_dir():
            return f"{directory} is not a directory, so {path} cannot be created"
    # SQLite writes its -wal and -shm files beside the ledger.
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory} is not writable by this user"
    return None
