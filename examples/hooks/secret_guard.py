"""A local hook: refuse prompts that contain what looks like a credential.

List it in ``plugins:`` by path, before ``ledger`` (any position works, because a
``preflight`` refusal comes before every ``before_call``; putting it first makes it the
first check). A refused prompt is never sent and nothing is reserved.

    plugins:
      - examples/hooks/secret_guard.py
      - kill_switch
      - ...
    secret_guard:
      extra_patterns:
        internal_token_format: "itk_[A-Za-z0-9]{24}"

(A key named ``..._token``, ``..._key`` or ``..._secret`` with a literal value is refused
by the config loader as a secret written into the file; name patterns after what they
match, e.g. ``..._format``.)

The error names the kind of secret found, never the text that matched.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from llmgw.kernel import ErrorClass, Rejection, hookimpl
from llmgw.kernel.config import Model

DEFAULT_PATTERNS = {
    "openai_key": r"sk-(?:proj-)?[A-Za-z0-9_-]{20,}",
    "anthropic_key": r"sk-ant-[A-Za-z0-9_-]{20,}",
    "google_api_key": r"AIza[0-9A-Za-z_-]{35}",
    "aws_access_key": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "github_token": r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",
    "private_key": r"-----BEGIN (?:RSA |EC |OPENSSH |)PRIVATE KEY-----",
}


class SecretGuard:
    """Refuses, in ``preflight``, any prompt or system text matching a secret pattern."""

    class Config(Model):
        use_defaults: bool = True
        extra_patterns: dict[str, str] = Field(default_factory=dict)

        @field_validator("extra_patterns")
        @classmethod
        def _compiles(cls, value: dict[str, str]) -> dict[str, str]:
            for name, pattern in value.items():
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"pattern {name!r} is not a valid regex: {exc}") from None
            return value

    def __init__(self, ctx: Any) -> None:
        config: SecretGuard.Config = ctx.config
        patterns = dict(DEFAULT_PATTERNS) if config.use_defaults else {}
        patterns.update(config.extra_patterns)
        self.patterns = {name: re.compile(p) for name, p in patterns.items()}
        self.refused = 0

    @hookimpl
    def preflight(self, call: Any) -> Rejection | None:
        texts = [call.system or ""] + [m.content for m in call.messages]
        for name, pattern in self.patterns.items():
            if any(pattern.search(t) for t in texts):
                self.refused += 1
                return Rejection(
                    ErrorClass.POLICY_REFUSED,
                    f"the prompt contains what looks like a credential ({name}); remove it "
                    "and try again (nothing was sent)",
                )
        return None

    @hookimpl
    def report_info(self) -> dict[str, Any]:
        return {"patterns": sorted(self.patterns), "refused": self.refused}


plugin = SecretGuard
