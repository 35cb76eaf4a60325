"""The response envelope every tool returns: ``{status, data: {text, ...}, meta, error?}``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ErrorClass
from .types import Status


@dataclass(frozen=True)
class Envelope:
    """A tool result. ``data`` holds extra fields beside ``text`` (panel members, plan)."""

    status: Status
    text: str | None
    meta: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def error_class(self) -> str | None:
        value = self.meta.get("error_class")
        return str(value) if value is not None else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": self.status,
            "data": {"text": self.text, **self.data},
            "meta": dict(self.meta),
        }
        if self.error is not None:
            out["error"] = self.error
        return out

    @classmethod
    def failure(
        cls, error_class: ErrorClass, message: str, meta: Mapping[str, Any] | None = None
    ) -> Envelope:
        """An error envelope with a short, actionable message and its class in meta."""
        full = {
            "provider": None,
            "model": None,
            "latency_ms": 0,
            "tokens": {"input": 0, "output": 0, "total": 0},
            "cost_usd_approx": 0.0,
            **(meta or {}),
            "error_class": error_class.value,
        }
        return cls(status="error", text=None, meta=full, error=message)
