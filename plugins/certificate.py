"""The certificate of one blind panel, as ``meta.visibility`` shows it.

See :mod:`llmgw.plugins.independence` for when each check runs and what is certified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from llmgw.kernel import Call, Message, Request
from llmgw.kernel.config import Model, Settings

from .visibility import CANONICAL_FORM, CONTENT_FORM, REQUEST_FORM, Digests

CLAIM = (
    "every request sent to every member (retries and fallbacks included) had the original "
    "system prompt and exactly one user message holding the original prompt, and included "
    "no earlier output (access empty)"
)


class PanelContract(Model):
    """The visibility contract of one panel."""

    mode: Literal["blind"] = "blind"
    """blind: each member sees only the original system prompt and prompt, no other output."""
    enforce: Literal["hard", "soft"] = "hard"
    """hard: a violation refuses the panel (or the member) before sending; soft: run and
    report certified false with the reasons."""


@dataclass
class MemberRecord:
    """One member's line of the certificate."""

    index: int
    provider: str
    model: str
    max_tokens: int
    request_sha256: str
    content_sha256: str
    access: list[str]
    sent: list[dict[str, Any]] = field(default_factory=list)

    def render(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "provider": self.provider,
            "model": self.model,
            "max_tokens": self.max_tokens,
            "request_sha256": self.request_sha256,
            "content_sha256": self.content_sha256,
            "access": list(self.access),
            "sent": [dict(s) for s in self.sent],
        }


@dataclass
class Certificate:
    """The live certificate of one panel call; rendered into ``meta.visibility``."""

    contract: PanelContract
    system: str | None
    system_source: str
    prompt: str
    original_sha256: str
    members: list[MemberRecord]
    min_distinct_providers: int
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    digests: Digests = field(default_factory=Digests, repr=False, compare=False)

    @property
    def certified(self) -> bool:
        return not self.reasons

    @property
    def hard(self) -> bool:
        return self.contract.enforce == "hard"

    def void(self, reasons: list[str]) -> list[str]:
        """Add reasons not given yet; returns the new ones."""
        new = [r for r in reasons if r not in self.reasons]
        self.reasons.extend(new)
        return new

    def problems(self, call: Call, who: str) -> list[str]:
        """Why ``call``'s request (as it stands now) is not blind; empty when it is."""
        found: list[str] = []
        if call.system != self.system:
            found.append(f"{who}: its system prompt differs from the original")
        if list(call.messages) != [Message("user", self.prompt)]:
            if len(call.messages) != 1:
                found.append(
                    f"{who}: it carries {len(call.messages)} messages instead of exactly the "
                    "original prompt as one user message"
                )
            else:
                found.append(f"{who}: its message differs from the original prompt")
        if call.access:
            found.append(
                f"{who}: it includes earlier outputs ({', '.join(call.access)}); a blind "
                "member sees none"
            )
        return found

    def render(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.contract.mode,
            "enforce": self.contract.enforce,
            "certified": self.certified,
            "independence_certified": self.certified,
            "claim": CLAIM,
            "original_sha256": self.original_sha256,
            "original_form": CONTENT_FORM
            + ' with messages = [{"role": "user", "content": <prompt>}]',
            "system_source": self.system_source,
            "request_form": REQUEST_FORM,
            "canonical_form": CANONICAL_FORM,
            "members": [m.render() for m in self.members],
        }
        if self.reasons:
            out["reasons"] = list(self.reasons)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def who(call: Call) -> str:
    target = call.target
    index = (call.member_index or 0) + 1
    return f"member {index} ({target.key if target else '?'})"


def original_system(request: Request, settings: Settings) -> tuple[str | None, str]:
    """The system prompt members are compared with, and where it came from.

    Taken from the caller's request and routing.yaml, never from the route a plugin
    built, so a routing plugin cannot change what "original" means.
    """
    if request.system is not None:
        return request.system, "request"
    spec = settings.task_classes.get(request.task_class)
    if spec is not None and spec.system is not None:
        return spec.system, "task_class"
    return None, "none"
