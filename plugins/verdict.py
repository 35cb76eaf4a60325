"""Strict parsing of a verifier's answer into ACCEPT or REVISE.

The verifier must answer with one JSON object, exactly::

    {"verdict": "ACCEPT" | "REVISE", "reasons": ["...", ...]}

Rules (strict by design: a wrong ACCEPT ships an unverified artifact as verified, a
wrong REVISE costs one more round or a human look):

- The answer is the object alone, surrounding whitespace aside. One markdown code fence
  around it (```` ``` ```` or ```` ```json ````) is accepted, because models add it
  habitually and it cannot change the meaning; nothing may precede or follow the fence.
- Exactly the keys ``verdict`` and ``reasons``; no extra key, no duplicate key.
- ``verdict`` is the exact string ``"ACCEPT"`` or ``"REVISE"``: case matters, so
  ``"accept"``, ``"Accept "`` or ``"NOT ACCEPTABLE"`` are not verdicts.
- ``reasons`` is a list of strings (empty is allowed).

Anything else (prose, "NOT ACCEPTABLE", broken JSON, several objects, wrong types) is
REVISE with ``parse_error=True``: never ACCEPT.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from llmgw.kernel import Verdict

MAX_REASONS = 20
MAX_REASON_CHARS = 1000

_FENCE = re.compile(r"\A```(?:json|JSON)?[ \t]*\n(?P<body>.*?)\n?```\Z", re.DOTALL)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


@dataclass(frozen=True)
class ParsedVerdict:
    """A verdict and, when the answer was not a valid verdict, why (``error``)."""

    verdict: Verdict
    error: str | None = None

    @property
    def accepted(self) -> bool:
        return self.verdict.verdict == "ACCEPT" and not self.verdict.parse_error

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "verdict": self.verdict.verdict,
            "reasons": list(self.verdict.reasons),
            "verdict_parse_error": self.verdict.parse_error,
        }
        if self.error:
            out["parse_problem"] = self.error
        return out


def _revise_unparsed(problem: str, source: str) -> ParsedVerdict:
    reason = f"the verifier did not answer with the required JSON verdict ({problem})"
    return ParsedVerdict(Verdict("REVISE", (reason,), source, parse_error=True), problem)


def parse_verdict(text: str | None, *, source: str = "verifier") -> ParsedVerdict:
    """Parse a verifier's answer strictly; anything not a valid verdict is REVISE."""
    if text is None or not text.strip():
        return _revise_unparsed("the answer is empty", source)
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced is not None:
        body = fenced.group("body").strip()
    if not (body.startswith("{") and body.endswith("}")):
        return _revise_unparsed("the answer is not a single JSON object", source)
    try:
        value = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as exc:
        return _revise_unparsed(f"the key {str(exc)!r} appears twice", source)
    except ValueError:
        return _revise_unparsed("the answer is not valid JSON (or holds several values)", source)
    except RecursionError:  # a verdict is two levels deep; an artifact can steer the answer
        return _revise_unparsed("the answer is nested too deeply to be a verdict", source)
    if not isinstance(value, dict):
        return _revise_unparsed("the answer is not a JSON object", source)
    keys = set(value)
    if keys != {"verdict", "reasons"}:
        missing = sorted({"verdict", "reasons"} - keys)
        extra = sorted(keys - {"verdict", "reasons"})
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected key(s) {', '.join(repr(k) for k in extra[:5])}")
        return _revise_unparsed("; ".join(parts), source)
    verdict, reasons = value["verdict"], value["reasons"]
    if not isinstance(verdict, str) or verdict not in ("ACCEPT", "REVISE"):
        return _revise_unparsed('"verdict" must be exactly "ACCEPT" or "REVISE"', source)
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        return _revise_unparsed('"reasons" must be a list of strings', source)
    clipped = tuple(r[:MAX_REASON_CHARS] for r in reasons[:MAX_REASONS])
    kind: Literal["ACCEPT", "REVISE"] = "ACCEPT" if verdict == "ACCEPT" else "REVISE"
    return ParsedVerdict(Verdict(kind, clipped, source))
