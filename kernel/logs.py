"""structlog set-up: JSON lines on stderr, with configured secret values removed.

stdout belongs to the MCP stdio protocol, so nothing here ever writes to it.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog

REDACTED = "[REDACTED]"


class Redactor:
    """Removes the exact values of registered secrets from rendered log lines.

    Secrets are process-wide (so is logging); providers add their key values when they
    start. Values shorter than 8 characters are ignored: they cannot be told apart
    from ordinary words.
    """

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()  # replaced whole on add: safe to read unlocked
        self._lock = threading.Lock()

    def add(self, value: str | None) -> None:
        if value and len(value) >= 8:
            # Also the JSON-escaped form, so a rendered line is scrubbed however the key
            # was written into it.
            forms = {value, json.dumps(value)[1:-1]}
            with self._lock:
                self._secrets = tuple(sorted(set(self._secrets) | forms, key=len, reverse=True))

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


REDACTOR = Redactor()


class _ScrubbingFormatter(logging.Formatter):
    """Formats stdlib records (HTTP clients, SDKs, uvicorn) as JSON lines like the
    gateway's own events (``event``, ``level``, ``timestamp``, plus ``logger``), secrets
    removed from the rendered line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "event": record.getMessage(),
            "logger": record.name,
            "level": record.levelname.lower(),
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat()
            .replace("+00:00", "Z"),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return REDACTOR.scrub(json.dumps(line, default=str))


def configure_logging(level: str = "INFO", stream: TextIO | None = None) -> None:
    """JSON lines to ``stream`` (stderr by default), one event per line, redacted."""
    out: Any = stream or _Stderr()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"{level!r} is not a log level")
    structlog.configure(
        # Secrets are removed from the rendered line, which holds every field, exception
        # text included: one pass per event instead of a walk over each value.
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
            _scrub_rendered,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line (message and newline together): print() writes them apart,
        # two system calls on a write-through stderr (PYTHONUNBUFFERED) and a line another
        # writer to the same stream could split.
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(_ScrubbingFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_llmgw", False):
            root.removeHandler(old)
    handler._llmgw = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    # HTTP clients log every request at INFO (a formatted, scrubbed line per call on the
    # hot path); the gateway's own llm.attempt event already says it. Keep theirs to
    # warnings unless DEBUG was asked for.
    quiet = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(quiet)


def reset_logging() -> None:
    """Undo :func:`configure_logging`: its handler off the root logger, the root back at
    WARNING, structlog's defaults (a program that embeds the gateway, tests)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_llmgw", False):
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    structlog.reset_defaults()


#: Libraries that log one INFO line per HTTP request.
_CHATTY = ("httpx2", "httpcore2", "httpx", "httpcore")


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced later)."""

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except (ValueError, OSError):  # closed or broken stream: logging never crashes a call
            return 0

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except (ValueError, OSError):
            pass


def _scrub_rendered(logger: Any, method: str, event: Any) -> Any:
    # Last line of defence: the rendered line itself (covers reprs of nested objects).
    return REDACTOR.scrub(event) if isinstance(event, str) else event
