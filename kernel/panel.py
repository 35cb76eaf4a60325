"""Panels: every member's request is final and preflighted before any is dispatched.

The panel-level call goes through ``preflight`` and ``before_call`` like any attempt
(a plugin sees the whole panel there: independence certifies it, the ledger reserves it
all or nothing); then each member runs the gateway's chain concurrently, and
``after_call`` closes the panel-level call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import structlog

from .envelope import Envelope
from .errors import ErrorClass
from .gateway import effective_system
from .results import chain_envelope
from .types import Call, Message, Outcome, Request, Route, Target, micro_to_usd
from .wire import WIRE_WAIT_S, watching

if TYPE_CHECKING:
    from .gateway import Gateway, ProgressFn
    from .results import ChainResult

log = structlog.get_logger("llmgw.panel")


async def run_panel(
    gw: Gateway, request: Request, route: Route, deadline: float, progress: ProgressFn | None
) -> Envelope:
    started = gw.clock.monotonic()
    members = route.members
    distinct = len({m.targets[0].provider for m in members})
    base_meta: dict[str, Any] = {
        "task_class": request.task_class,
        "request_id": request.request_id,
    }
    if distinct < route.min_distinct_providers:
        return Envelope.failure(
            ErrorClass.POLICY_REFUSED,
            f"this panel needs {route.min_distinct_providers} distinct providers but its "
            f"members use {distinct}; nothing was sent",
            base_meta,
        )
    panel_meta: dict[str, Any] = {}
    panel_call = Call(
        request=request,
        route=route,
        settings=gw.settings,
        target=None,
        system=effective_system(request, route),
        messages=[Message("user", request.prompt)],
        max_tokens=0,
        deadline=deadline,
        meta=panel_meta,
    )
    first_calls = tuple(
        gw._new_call(
            request,
            m,
            m.targets[0],
            deadline=deadline,
            index=0,
            attempt=1,
            meta={},
            history=(),
            member_index=i,
            panel=panel_call,
        )
        for i, m in enumerate(members)
    )
    panel_call.members = first_calls
    rejection = await gw.hooks.preflight(panel_call)
    if rejection is not None:
        meta = {**base_meta, **panel_meta, "rejected_by": rejection.plugin}
        return Envelope.failure(
            rejection.error_class, rejection.message + "; nothing was sent", meta
        )

    results: list[ChainResult | None] = [None] * len(members)
    claims = Claims(members, route.min_distinct_providers)
    quorum = route.quorum or len(members)
    done = 0

    pacing = gw.panel_pacing
    keys = [m.targets[0].key for m in members]

    async def run_member(i: int, on_wire: anyio.Event) -> None:
        nonlocal done
        try:
            with watching(on_wire.set):
                results[i] = await gw._run_chain(
                    request,
                    members[i],
                    deadline,
                    first_call=first_calls[i],
                    member_index=i,
                    panel=panel_call,
                    claims=claims,
                )
        finally:
            on_wire.set()
        r = results[i]
        if r is not None and r.outcome.ok:
            pacing.record(keys[i], r.outcome.latency_ms)
        done += 1
        if progress is not None:
            state = "ok" if r and r.outcome.ok else "failed"
            await _safe_progress(progress, done, len(members), f"member {i + 1} {state}")

    async def send_all() -> Outcome:
        # An anyio task group, not asyncio.TaskGroup: the latter cancels members with a
        # native Task.cancel(), which lands inside the facade's shielded after_call and
        # cuts it short (a ledger settle, a breaker count).
        async with anyio.create_task_group() as tg:
            order = pacing.order(keys)
            for n, i in enumerate(order):
                on_wire = anyio.Event()
                tg.start_soon(run_member, i, on_wire)
                if n + 1 < len(order):
                    # The next member starts once this one's request is out (kernel/wire.py).
                    with anyio.move_on_after(WIRE_WAIT_S):
                        await on_wire.wait()
        ok = sum(1 for r in results if r is not None and r.outcome.ok)
        if ok >= quorum:
            return Outcome.success("", None)
        return Outcome.failure(
            ErrorClass.PANEL_FAILED, f"{ok} of {len(members)} members succeeded", sent=True
        )

    attempt = await gw.hooks.run_attempt(panel_call, send_all)
    if attempt.refusal is not None:
        meta = {**base_meta, **panel_meta, "refused_by": attempt.refused_by}
        return Envelope.failure(
            attempt.refusal.error_class, attempt.refusal.message + "; nothing was sent", meta
        )
    return panel_envelope(gw, request, route, results, panel_meta, quorum, started)


def panel_envelope(
    gw: Gateway,
    request: Request,
    route: Route,
    results: list[ChainResult | None],
    panel_meta: dict[str, Any],
    quorum: int,
    started: float,
) -> Envelope:
    member_envs: list[dict[str, Any]] = []
    tokens_in = tokens_out = 0
    cost = 0
    unknown = False
    ok = 0
    classes: list[str | None] = []
    for member, result in zip(route.members, results, strict=True):
        assert result is not None
        env = chain_envelope(request, member, result)
        member_envs.append(env.to_dict())
        tokens_in += env.meta["tokens"]["input"]
        tokens_out += env.meta["tokens"]["output"]
        cost_usd = env.meta.get("cost_usd_approx")
        if cost_usd is None:
            cost_usd = env.meta.get("cost_usd_known")
        cost += round((cost_usd or 0) * 1_000_000)
        unknown = unknown or "cost_note" in env.meta
        if env.ok:
            ok += 1
        classes.append(env.error_class)
    meta: dict[str, Any] = {
        "provider": None,
        "model": None,
        "latency_ms": round((gw.clock.monotonic() - started) * 1000, 2),
        "tokens": {"input": tokens_in, "output": tokens_out, "total": tokens_in + tokens_out},
        "cost_usd_approx": micro_to_usd(cost),
        "task_class": request.task_class,
        "request_id": request.request_id,
        "panel": {
            "members": len(route.members),
            "succeeded": ok,
            "quorum": quorum,
            "member_error_classes": classes,
        },
    }
    if unknown:
        meta["cost_usd_known"] = meta["cost_usd_approx"]
        meta["cost_usd_approx"] = None
        meta["cost_note"] = "cost unknown for some members; cost_usd_known is the known part"
    meta.update(panel_meta)
    texts = [
        f"[{m['meta']['provider']}/{m['meta']['model']}]\n{m['data']['text']}"
        for m in member_envs
        if m["status"] == "success"
    ]
    data = {"members": member_envs}
    if ok >= quorum:
        return Envelope("success", "\n\n".join(texts), meta, data=data)
    meta["error_class"] = ErrorClass.PANEL_FAILED.value
    failed = ", ".join(f"member {i + 1}: {c}" for i, c in enumerate(classes) if c)
    return Envelope(
        "error",
        None,
        meta,
        error=f"only {ok} of {len(route.members)} panel members succeeded (quorum {quorum}); "
        f"{failed}",
        data=data,
    )


# --- introspection ------------------------------------------------------------------


class Claims:
    """Which (provider, model) each panel member uses, so fallbacks never collide.

    A member may not move to a model another member uses, nor, when the panel asks for
    ``min_distinct_providers``, to a provider that would leave fewer distinct providers
    than that among the members.
    """

    def __init__(self, members: tuple[Route, ...], min_distinct_providers: int = 1) -> None:
        self._owner: dict[str, int] = {
            m.targets[0].key: i for i, m in enumerate(members) if m.targets
        }
        self._provider: dict[int, str] = {
            i: m.targets[0].provider for i, m in enumerate(members) if m.targets
        }
        self._min_distinct = min_distinct_providers

    def claim(self, member: int | None, target: Target) -> bool:
        if member is None:
            return True
        owner = self._owner.get(target.key)
        if owner is not None and owner != member:
            return False
        if self._min_distinct > 1:
            after = {**self._provider, member: target.provider}
            if len(set(after.values())) < self._min_distinct:
                return False
        self._owner[target.key] = member
        self._provider[member] = target.provider
        return True


async def _safe_progress(progress: ProgressFn, done: float, total: float, msg: str) -> None:
    try:
        await progress(done, total, msg)
    except Exception:
        log.warning("progress.failed")
