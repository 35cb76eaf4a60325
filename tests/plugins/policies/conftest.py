"""Fixtures shared by the ledger tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _money_helpers import store

from llmgw.plugins.policies.ledger_store import LedgerStore


@pytest.fixture
def st(tmp_path: Path) -> Iterator[LedgerStore]:
    """An open ledger store on a fresh file, closed after the test."""
    s = store(tmp_path / "l.db")
    yield s
    s.close()
