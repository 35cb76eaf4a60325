"""One ``llm_orchestrate`` run: plan -> work -> verify, with failure-gated re-planning.

Every step is an ordinary gateway call (:meth:`Gateway.run_route`), so every policy
(kill switch, cost, ledger, breaker, retry) applies to it; the candidates after the first
of a role are that step's fallback targets. What each role may read is fixed here, by
composition, and checked on the wire by :class:`~llmgw.plugins.roles.RolesPlugin`:

- planner: the task (on a re-plan, also the verifier's reasons);
- worker: the task and the plan (on a later round, also the verifier's reasons);
- verifier: the task and the artifact, never the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from llmgw.kernel import Envelope, ErrorClass, Message, Request, Route, Target
from llmgw.kernel.types import Status, input_token_bound, micro_to_usd

from .compose import (
    STEP_ROLE,
    RunBudget,
    StepWatch,
    compose_plan,
    compose_verify,
    compose_work,
    prefer_other,
    rotate_away,
    tag_of,
)
from .verdict import ParsedVerdict, parse_verdict

if TYPE_CHECKING:
    from llmgw.kernel.gateway import ProgressFn

    from .roles import Candidate, RolesPlugin


#: A plan shorter than this (stripped) found in the artifact may be a coincidence (a blank
#: line, "1. Do it."): only a longer one counts as the verifier reading the plan.
MIN_QUOTED_PLAN = 40


class StopRun(Exception):
    """Ends the run early with a finished envelope (a failed step, the budget)."""

    def __init__(self, envelope: Envelope) -> None:
        super().__init__(envelope.status)
        self.envelope = envelope


class Orchestration:
    """The state of one run; :meth:`run` returns its envelope."""

    def __init__(self, plugin: RolesPlugin, progress: ProgressFn | None) -> None:
        self.plugin = plugin
        self.cfg = plugin.cfg
        self.gateway = plugin.ctx.gateway()
        self.clock = plugin.ctx.clock
        self.progress = progress
        self.started = self.clock.monotonic()
        self.steps: list[dict[str, Any]] = []
        limit = self.cfg.budget_usd
        self.budget = RunBudget(None if limit is None else round(limit * 1_000_000))
        self.cost_unknown = False
        self.total_steps = 0
        self.rounds = 0
        self.plan: str | None = None
        self.artifact: str | None = None
        self.verdict: ParsedVerdict | None = None
        self.worker_target: Target | None = None
        self.violations: list[str] = []
        self.notes: list[str] = []
        self.depth = ""

    # --- the loop --------------------------------------------------------------------

    async def run(self, task: str, depth: str) -> Envelope:
        self.depth = depth
        steps = self.cfg.depth[depth]
        try:
            self._check_first_round(task, steps)
            return await self._loop(task, steps)
        except StopRun as stop:
            return stop.envelope
        except Exception as exc:
            # The steps already run were paid for: the envelope must still say what they
            # cost, never a bare internal error with $0.
            self.plugin.ctx.log.exception(
                "orchestrate.crashed", error_type=type(exc).__name__, steps=len(self.steps)
            )
            return self._envelope(
                "error",
                ErrorClass.INTERNAL_ERROR,
                f"the run failed unexpectedly after {len(self.steps)} step(s); their cost "
                "is in meta; see the gateway log",
            )

    async def _loop(self, task: str, steps: Sequence[str]) -> Envelope:
        verifying = "verify" in steps
        rounds = 1 + (self.cfg.max_replans if verifying else 0)
        workers = list(self.cfg.candidates.worker)
        reasons: tuple[str, ...] | None = None
        for n in range(1, rounds + 1):
            self.rounds = n
            self.total_steps += len(steps)
            if "plan" in steps:
                env = await self._step(
                    n,
                    "plan",
                    compose_plan(task, reasons),
                    ("verdict",) if reasons is not None else (),
                    self.cfg.candidates.planner,
                )
                self.plan = env.text or ""
            if n > 1:
                workers = rotate_away(workers, self.worker_target)
            access = (("plan",) if "plan" in steps else ()) + (
                ("verdict",) if reasons is not None else ()
            )
            env = await self._step(
                n, "work", compose_work(task, self.plan, reasons), access, workers
            )
            self.artifact = env.text or ""
            self.worker_target = Target(env.meta["provider"], env.meta["model"], 0)
            if not verifying:
                return self._finish("success", verified=False)
            quoted = (self.plan or "").strip()
            if len(quoted) >= MIN_QUOTED_PLAN and quoted in self.artifact:
                self.notes.append(
                    f"round {n}: the artifact quotes the plan verbatim, so the "
                    "verifier read the plan through the artifact"
                )
            env = await self._step(
                n,
                "verify",
                compose_verify(task, self.artifact),
                ("artifact",),
                prefer_other(self.cfg.candidates.verifier, self.worker_target),
            )
            self.verdict = parse_verdict(env.text, source="verifier")
            self.steps[-1]["verdict"] = self.verdict.to_dict()
            if self.verdict.accepted:
                return self._finish("success", verified=True)
            reasons = self.verdict.verdict.reasons
        return self._finish(
            "needs_human_review",
            verified=False,
            why=f"the verifier did not accept the artifact in {self.rounds} round(s) "
            f"(max_replans {self.cfg.max_replans})",
        )

    async def _step(
        self,
        n: int,
        step: str,
        prompt: str,
        access: tuple[str, ...],
        candidates: Sequence[Candidate],
    ) -> Envelope:
        role = STEP_ROLE[step]
        bound = getattr(self.cfg.max_tokens, role)
        system: str = getattr(self.cfg.instructions, role)
        targets = self._targets(role, candidates)
        self._check_budget(role, targets, system, prompt)
        request = Request(
            task_class=f"orchestrate:{role}",
            prompt=prompt,
            system=system,
            max_tokens=bound,
            access=access,
        )
        watch = StepWatch(role, system, prompt, access, budget=self.budget)
        self.plugin.watches[request.request_id] = watch
        try:
            env = await self.gateway.run_route(
                request, Route(request.task_class, targets=targets), started=self.started
            )
        finally:
            self.plugin.watches.pop(request.request_id, None)
        self.steps.append(self._step_meta(n, step, env, watch))
        self.violations += watch.violations
        if env.meta.get("cost_usd_approx") is None and any(
            a.get("sent") for a in env.meta.get("attempts") or ()
        ):
            self.cost_unknown = True
        await self._report(n, role, env)
        if env.status == "error":
            raise StopRun(self._failed(n, role, env))
        if env.status != "success":
            raise StopRun(
                self._finish(
                    "needs_human_review",
                    verified=False,
                    why=f"round {n}: the {role} step was flagged for review by a verify plugin",
                )
            )
        return env

    # --- pieces ------------------------------------------------------------------------

    def _targets(self, role: str, candidates: Sequence[Candidate]) -> tuple[Target, ...]:
        bound = getattr(self.cfg.max_tokens, role)
        return tuple(Target(c.provider, c.model, bound, label=role) for c in candidates)

    def _worst_case(
        self, role: str, targets: tuple[Target, ...], system: str, prompt: str
    ) -> tuple[int | None, str]:
        """The step's worst case over its candidates (micro-USD), or None and why."""
        bound = input_token_bound(system, [Message("user", prompt)])
        worst = 0
        for t in targets:
            provider = self.gateway.providers.get(t.provider)
            price = provider.price(t.model) if provider is not None else None
            if price is None:
                return None, (
                    f"the {role} step cannot be bounded: no price for {t.key}, so "
                    "roles.budget_usd cannot be kept"
                )
            worst = max(worst, price.worst_case_micro_usd(bound, t.max_tokens))
        return worst, ""

    def _check_first_round(self, task: str, steps: Sequence[str]) -> None:
        """Refuse, before anything is sent, a run whose first round cannot fit the budget:
        a step that alone, with the plan and artifact it will be sent taken as empty,
        could cost more than ``roles.budget_usd`` would be refused after the steps
        before it were paid for."""
        budget = self.cfg.budget_usd
        if budget is None:
            return
        limit = round(budget * 1_000_000)
        prompts = {
            "plan": (compose_plan(task, None), self.cfg.candidates.planner),
            "work": (
                compose_work(task, "" if "plan" in steps else None, None),
                self.cfg.candidates.worker,
            ),
            "verify": (compose_verify(task, ""), self.cfg.candidates.verifier),
        }
        for step in steps:
            role = STEP_ROLE[step]
            prompt, candidates = prompts[step]
            targets = self._targets(role, candidates)
            worst, why = self._worst_case(
                role, targets, getattr(self.cfg.instructions, role), prompt
            )
            if worst is None:
                why += "; nothing was sent: add a price for it (prices: in routing.yaml)"
            elif worst <= limit:
                continue
            else:
                why = (
                    f"the {role} step alone could cost up to ${worst / 1e6:.6f}, more than "
                    f"roles.budget_usd (${budget}) allows a whole run; nothing was sent: "
                    f"raise the budget or lower roles.max_tokens.{role}"
                )
            raise StopRun(self._envelope("error", ErrorClass.BUDGET_EXCEEDED, why))

    def _check_budget(
        self, role: str, targets: tuple[Target, ...], system: str, prompt: str
    ) -> None:
        budget = self.cfg.budget_usd
        if budget is None:
            return
        worst, why = self._worst_case(role, targets, system, prompt)
        if worst is not None:
            if self.budget.committed_micro + worst <= round(budget * 1_000_000):
                return
            why = (
                f"the {role} step could cost up to ${worst / 1e6:.6f}; with "
                f"${self.budget.committed_micro / 1e6:.6f} committed it would pass "
                f"roles.budget_usd (${budget})"
            )
        if self.artifact is None:
            # No result yet: an error, though earlier steps (a plan) may have been paid.
            done = (
                f"; this step was not sent, {len(self.steps)} earlier step(s) cost "
                f"${self.budget.committed_micro / 1e6:.6f}"
                if self.steps
                else "; nothing was sent"
            )
            raise StopRun(self._envelope("error", ErrorClass.BUDGET_EXCEEDED, why + done))
        raise StopRun(self._finish("needs_human_review", verified=False, why=why))

    def _step_meta(self, n: int, step: str, env: Envelope, watch: StepWatch) -> dict[str, Any]:
        meta = env.meta
        sent = [s for s in watch.sent if s["sent"]]
        entry: dict[str, Any] = {
            "round": n,
            "step": step,
            "role": watch.role,
            "status": env.status,
            "provider": meta.get("provider"),
            "model": meta.get("model"),
            "tokens": meta.get("tokens"),
            "cost_usd": meta.get("cost_usd_approx"),
            "latency_ms": meta.get("latency_ms"),
            "access": list(watch.access),
            "content_sha256": watch.content_sha256,
            # The suffix of this step's input tags (<task-…>): with the task, plan and
            # artifact it rebuilds the prompt, hence content_sha256.
            "tag": tag_of(watch.prompt),
            "request_sha256": sent[-1]["request_sha256"] if sent else None,
            "sent": watch.sent,
        }
        if env.error_class:
            entry["error_class"] = env.error_class
        if "fallback_from" in meta:
            entry["fallback_from"] = meta["fallback_from"]
        return entry

    async def _report(self, n: int, role: str, env: Envelope) -> None:
        if self.progress is None:
            return
        who = f"{env.meta.get('provider')}/{env.meta.get('model')}"
        state = "done" if env.ok else env.status
        try:
            await self.progress(
                len(self.steps), self.total_steps, f"round {n}: {role} {state} ({who})"
            )
        except Exception:
            self.plugin.ctx.log.warning("progress.failed")

    def _failed(self, n: int, role: str, env: Envelope) -> Envelope:
        error_class = ErrorClass(env.error_class or ErrorClass.INTERNAL_ERROR.value)
        message = f"the {role} step (round {n}) failed: {env.error or error_class.value}"
        return self._envelope(
            "error", error_class, message, {"failed_step": {"round": n, "role": role}}
        )

    def _finish(self, status: Status, *, verified: bool, why: str | None = None) -> Envelope:
        if status == "success" and self.violations:
            status, verified = "needs_human_review", False
            why = "a step's request was changed after it was checked; see meta.visibility"
        return self._envelope(status, None, why, {"verified": verified})

    def _envelope(
        self,
        status: Status,
        error_class: ErrorClass | None,
        why: str | None,
        extra: dict[str, Any] | None = None,
    ) -> Envelope:
        tokens_in = sum((s["tokens"] or {}).get("input", 0) for s in self.steps)
        tokens_out = sum((s["tokens"] or {}).get("output", 0) for s in self.steps)
        meta: dict[str, Any] = {
            "provider": self.worker_target.provider if self.worker_target else None,
            "model": self.worker_target.model if self.worker_target else None,
            "latency_ms": round((self.clock.monotonic() - self.started) * 1000, 2),
            "tokens": {"input": tokens_in, "output": tokens_out, "total": tokens_in + tokens_out},
            "cost_usd_approx": (
                None
                if self.cost_unknown or self.budget.unknown_micro
                else micro_to_usd(self.budget.spent_micro)
            ),
            "cost_usd_known": micro_to_usd(self.budget.spent_micro),
            "cost_usd_unknown_worst_case": micro_to_usd(self.budget.unknown_micro),
            "task_class": "orchestrate",
            "depth": self.depth,
            "rounds": self.rounds,
            "max_replans": self.cfg.max_replans,
            "steps": self.steps,
            "visibility": self.plugin.certificate(self.violations, self.notes),
            **(extra or {}),
        }
        data = {
            "artifact": self.artifact,
            "plan": self.plan,
            "verdict": self.verdict.to_dict() if self.verdict else None,
        }
        if error_class is not None:
            meta["error_class"] = error_class.value
            return Envelope("error", None, meta, error=why, data=data)
        if why:
            meta["review_reason"] = why
        return Envelope(status, self.artifact, meta, data=data)
