"""Independence: certify, from what is actually sent, that a blind panel's members are blind.

A panel's agreement is evidence only if no member saw another's answer. This plugin
makes that a claim a client can falsify, checked against the requests themselves
rather than against a list the gateway built for the purpose.

What is certified (``meta.visibility``). For a panel listed under
``independence.panels`` with ``mode: blind``: every request sent for every member
(each retry and each fallback model included) had

- the original system prompt: the caller's ``system``, else the task class's ``system``;
- exactly one message, ``user``, whose content is the caller's prompt;
- an empty access set (``Call.access``: it includes no earlier output).

``original_sha256`` is the content digest of that blind request, ``{"system", "messages":
[{"role": "user", "content": prompt}]}``; each member lists the ``request_sha256`` of its
primary request (provider, model, system, messages, max_tokens), its
``content_sha256`` (equal to ``original_sha256`` when blind), its access set, and under
``sent`` the request digest of every attempt actually handed to the provider (taken from
the kernel's record of the sent request, after every plugin's rewrite). All digests are
SHA-256 of the canonical JSON given in ``canonical_form``; a client rebuilds them from
what it sent. Provider, model and ``max_tokens`` are not content, so a fallback to
another model is certified on the same content while its request digest differs.

When it is checked:

1. ``preflight(panel)``: every member's first request as it stands, before anything is
   reserved or sent. A violation with ``enforce: hard`` refuses the whole panel there.
2. ``before_call(panel)``: again, after the plugins listed earlier ran theirs on the
   panel (the ledger reserves here); hard refuses the whole panel, nothing sent.
3. ``before_call(member attempt)``: the attempt's final request (list ``independence``
   after any plugin that rewrites requests, so this runs innermost). A violation voids
   the certificate; with hard that attempt, and every later member attempt of the
   panel, is refused (``independence_violation``), and a panel that still reaches its
   quorum is returned as ``needs_human_review``, never ``success``.
4. ``after_call(member attempt)``: the request the kernel actually sent is compared
   with the one checked; a difference (a rewriter listed after this plugin) voids the
   certificate after the fact.

``enforce: soft`` never refuses: it runs the panel and reports ``certified: false`` with
the reasons.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationInfo, model_validator

from llmgw.kernel import (
    Call,
    CallRefused,
    Envelope,
    ErrorClass,
    Message,
    Outcome,
    PluginContext,
    ProviderRequest,
    Rejection,
    Request,
    Verdict,
    hookimpl,
)
from llmgw.kernel.config import Model, Settings

from .certificate import CLAIM, Certificate, MemberRecord, PanelContract, original_system, who
from .visibility import CANONICAL_FORM, CONTENT_FORM, REQUEST_FORM, Digests

__all__ = ["IndependencePlugin", "PanelContract"]


class IndependencePlugin:
    """Certifies blind panels in ``meta.visibility``; refuses violations when hard."""

    class Config(Model):
        """The ``independence:`` section: ``panels.<task_class>: {mode, enforce}``."""

        panels: dict[str, PanelContract] = Field(default_factory=dict)
        """Visibility contract per panel task class."""

        @model_validator(mode="after")
        def _panels_exist(self, info: ValidationInfo) -> IndependencePlugin.Config:
            settings = (info.context or {}).get("settings")
            if not isinstance(settings, Settings):
                return self
            panels = sorted(n for n, s in settings.task_classes.items() if s.is_panel)
            for name in self.panels:
                spec = settings.task_classes.get(name)
                if spec is None or not spec.is_panel:
                    what = "no task class" if spec is None else "a single-target task class"
                    raise ValueError(
                        f"panels.{name}: {name!r} is {what}; a visibility contract applies "
                        f"to panel task classes only (panels: {', '.join(panels) or 'none'})"
                    )
            return self

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        self.cfg: IndependencePlugin.Config = ctx.config or IndependencePlugin.Config()
        # Request ids of panels whose hard certificate was voided: verify() turns their
        # success into needs_human_review. Cleared by verify or by a failed panel.
        self._voided_hard: dict[str, list[str]] = {}

    # --- helpers ---------------------------------------------------------------------

    def _certificate(self, call: Call) -> Certificate | None:
        holder = call if call.is_panel else call.panel
        if holder is None:
            return None
        cert = holder.stash.get(self.ctx.name)
        return cert if isinstance(cert, Certificate) else None

    def _publish(self, panel: Call, cert: Certificate) -> None:
        panel.meta["visibility"] = cert.render()
        if cert.hard and not cert.certified:
            self._voided_hard[panel.request.request_id] = list(cert.reasons)

    def _start(self, panel: Call, contract: PanelContract) -> Certificate:
        request = panel.request
        system, source = original_system(request, self.ctx.settings)
        digests = Digests()  # members share their content: each digest is computed once
        members = []
        for m in panel.members:
            assert m.target is not None
            members.append(
                MemberRecord(
                    index=m.member_index or 0,
                    provider=m.target.provider,
                    model=m.target.model,
                    max_tokens=m.max_tokens,
                    request_sha256=digests.of_call(m),
                    content_sha256=digests.content(m.system, m.messages),
                    access=list(m.access),
                )
            )
        return Certificate(
            contract=contract,
            system=system,
            system_source=source,
            prompt=request.prompt,
            original_sha256=digests.content(system, [Message("user", request.prompt)]),
            members=members,
            min_distinct_providers=panel.route.min_distinct_providers,
            digests=digests,
        )

    # --- hooks -----------------------------------------------------------------------

    @hookimpl
    def preflight(self, call: Call) -> Rejection | None:
        if not call.is_panel:
            return None
        contract = self.cfg.panels.get(call.task_class)
        if contract is None:
            return None
        cert = self._start(call, contract)
        for m in call.members:
            cert.void(cert.problems(m, who(m)))
        call.stash[self.ctx.name] = cert
        self._publish(call, cert)
        if cert.reasons and cert.hard:
            self._voided_hard.pop(call.request.request_id, None)  # never dispatched
            return Rejection(
                ErrorClass.INDEPENDENCE_VIOLATION,
                f"panel {call.task_class!r} is not blind ({cert.reasons[0]}"
                + (
                    f"; {len(cert.reasons) - 1} more in meta.visibility.reasons"
                    if len(cert.reasons) > 1
                    else ""
                )
                + "); independence enforce: hard refuses it before anything is reserved",
                details={"reasons": list(cert.reasons)},
            )
        return None

    @hookimpl
    def before_call(self, call: Call) -> None:
        cert = self._certificate(call)
        if cert is None:
            return
        if call.is_panel:
            # Plugins listed earlier ran before_call on the panel: check the members again.
            new: list[str] = []
            for m in call.members:
                new += cert.void(cert.problems(m, who(m)))
            if new:  # unchanged since preflight published it otherwise
                self._publish(call, cert)
            if new and cert.hard:
                # Refused here, so neither verify() nor our after_call will see this panel.
                self._voided_hard.pop(call.request.request_id, None)
                raise CallRefused(
                    ErrorClass.INDEPENDENCE_VIOLATION,
                    f"panel {call.task_class!r} became non-blind before dispatch ({new[0]}); "
                    "independence enforce: hard refuses the whole panel",
                    details={"reasons": list(cert.reasons)},
                )
            return
        panel = call.panel
        assert panel is not None
        if cert.hard and not cert.certified:
            raise CallRefused(
                ErrorClass.INDEPENDENCE_VIOLATION,
                f"{who(call)} not sent: this panel's independence certificate is void "
                f"({cert.reasons[0]})",
            )
        problems = cert.problems(call, who(call))
        # Remember exactly what was checked, to compare with what the kernel sends.
        call.stash[self.ctx.name] = cert.digests.of_call(call)
        if problems:
            cert.void(problems)
            self._publish(panel, cert)
            if cert.hard:
                raise CallRefused(
                    ErrorClass.INDEPENDENCE_VIOLATION,
                    f"{who(call)} not sent: {problems[0].split(': ', 1)[-1]}; "
                    "independence enforce: hard",
                    details={"reasons": problems},
                )

    @hookimpl
    def after_call(self, call: Call, outcome: Outcome) -> None:
        cert = self._certificate(call)
        if cert is None:
            return
        if call.is_panel:
            answered = {s["provider"] for m in cert.members for s in m.sent if s.get("ok")}
            if answered and len(answered) < cert.min_distinct_providers:
                cert.notes.append(
                    f"answers came from {len(answered)} distinct provider(s), fewer than the "
                    f"panel's min_distinct_providers ({cert.min_distinct_providers}), after "
                    "fallbacks"
                )
            self._publish(call, cert)
            if not outcome.ok:  # no verify() for a failed panel
                self._voided_hard.pop(call.request.request_id, None)
            return
        sent = call.stash.get("kernel.sent_request")
        panel = call.panel
        # Handed to the provider but never sent (no key, refused locally): nothing left
        # the process, so nothing is recorded under `sent`.
        if not isinstance(sent, ProviderRequest) or panel is None or not outcome.sent:
            return
        record = cert.members[call.member_index or 0]
        digests = cert.digests
        sent_sha = digests.request(
            sent.provider, sent.model, sent.system, sent.messages, sent.max_tokens
        )
        record.sent.append(
            {
                "provider": sent.provider,
                "model": sent.model,
                "max_tokens": sent.max_tokens,
                "request_sha256": sent_sha,
                "content_sha256": digests.content(sent.system, sent.messages),
                "attempt": call.attempt,
                "ok": outcome.ok,
            }
        )
        checked = call.stash.get(self.ctx.name)
        if checked != sent_sha:
            cert.void(
                [
                    f"{who(call)}: the request sent differs from the request checked "
                    "before sending (a plugin listed after independence rewrote it); list "
                    "independence after every plugin that rewrites requests"
                ]
            )
        # Not published here: the panel's own after_call (which runs once every member has
        # ended, before the envelope is built) publishes the certificate with every record.

    @hookimpl
    def verify(self, request: Request, result: Envelope) -> Verdict | None:
        reasons = self._voided_hard.pop(request.request_id, None)
        if reasons is None:
            return None
        return Verdict(
            "REVISE",
            ("the panel's independence certificate is void (enforce: hard)", *reasons),
            source=self.ctx.name,
        )

    @hookimpl
    def report_info(self) -> dict[str, Any]:
        settings = self.ctx.settings
        panels: dict[str, Any] = {}
        for name, spec in sorted(settings.task_classes.items()):
            if not spec.is_panel:
                continue
            contract = self.cfg.panels.get(name)
            panels[name] = {
                "members": [f"{m.provider}/{m.model}" for m in spec.members or ()],
                "mode": contract.mode if contract else None,
                "enforce": contract.enforce if contract else None,
                "contract": contract is not None,
            }
        late = self._rewriters_after()
        info: dict[str, Any] = {
            "claim": CLAIM,
            "canonical_form": CANONICAL_FORM,
            "request_form": REQUEST_FORM,
            "content_form": CONTENT_FORM,
            "panels": panels,
        }
        if late:
            info["before_call_after_independence"] = late
            info["note"] = (
                "these plugins run before_call after independence: a rewrite by them is "
                "detected only after sending (the certificate is then voided)"
            )
        return info

    def _rewriters_after(self) -> list[str]:
        try:
            names = [i.plugin_name for i in self.ctx.gateway().hooks.impls("before_call")]
        except RuntimeError:
            return []
        if self.ctx.name not in names:
            return []
        return names[names.index(self.ctx.name) + 1 :]
