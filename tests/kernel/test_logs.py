"""The gateway's log lines: one JSON object per line, each written whole."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from llmgw.kernel.logs import REDACTOR, configure_logging, reset_logging


class Writes:
    """A stream that keeps every write call apart."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


@pytest.fixture
def writes() -> Iterator[Writes]:
    stream = Writes()
    configure_logging(level="INFO", stream=stream)  # type: ignore[arg-type]
    yield stream
    reset_logging()


def test_each_event_is_one_write_of_one_whole_line(writes: Writes) -> None:
    """Message and newline in a single write: a write-through stderr (PYTHONUNBUFFERED)
    makes each write a system call, and another writer to the same stream could land
    between two of them."""
    log = structlog.get_logger("llmgw.test")
    log.info("llm.attempt", provider="openai", ok=True)
    log.warning("second", n=2)
    logging.getLogger("some.library").warning("from the stdlib")
    assert len(writes.calls) == 3
    assert all(c.endswith("\n") and c.count("\n") == 1 for c in writes.calls)
    first = json.loads(writes.calls[0])
    assert (first["event"], first["provider"], first["level"]) == ("llm.attempt", "openai", "info")
    third = json.loads(writes.calls[2])  # other libraries' records: JSON lines too
    assert (third["event"], third["logger"], third["level"]) == (
        "from the stdlib",
        "some.library",
        "warning",
    )
    assert third["timestamp"].endswith("Z")


def test_a_registered_secret_never_reaches_the_stream(writes: Writes) -> None:
    secret = "sk-test-CANARY-0123456789abcdef"
    REDACTOR.add(secret)
    structlog.get_logger("llmgw.test").error("leak?", key=secret, nested={"k": secret})
    logging.getLogger("some.library").error("header Bearer %s", secret)
    text = "".join(writes.calls)
    assert secret not in text and text.count("[REDACTED]") >= 3
