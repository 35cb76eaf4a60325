"""``llmgw spend --check``: the ledger checked against itself, read-only."""

from __future__ import annotations

import hashlib
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from _ledger_damage import (
    ENTRY_RULE_DAMAGE,
    NEXT_MONTH,
    NOW,
    TOTALS_DAMAGE,
    audit,
    busy_ledger,
    item,
    tamper,
)
from _money_helpers import fake

from llmgw.kernel import Request
from llmgw.kernel.cli import main
from llmgw.kernel.testing import gateway_from_yaml
from llmgw.plugins.policies import ledger_sql
from llmgw.plugins.policies.ledger_store import Caps, LedgerStore

CONFIG = """
plugins: [{plugins}]
task_classes:
  quick: {{provider: fake, model: m1, max_tokens: 100}}
ledger:
  caps: {{total_monthly_usd: 2}}
"""


def test_every_kind_of_write_leaves_a_ledger_that_checks_clean(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    busy_ledger(path)
    found = audit(path)
    assert found.problems == []
    assert found.ok and found.entries == 8
    assert found.months == ["2026-11", "2026-12"]
    assert found.notes == []
    # Past its lease, the open December reservation is pointed out, not a problem.
    later = audit(path, NEXT_MONTH + timedelta(seconds=601))
    assert later.ok
    assert len(later.notes) == 1 and "1 reservation(s) ($0.000300)" in later.notes[0]


def test_a_scope_exactly_at_its_cap_with_an_overage_checks_clean(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    st = LedgerStore(path)
    st.open()
    st.reserve([item("x", 200)], Caps(total=200), now=NOW, lease_s=60)
    st.settle("x", cost_micro=250, now=NOW)  # 250 settled, 50 of it overage: 200 counted
    st.close()
    found = audit(path)
    assert found.ok, found.problems


@pytest.mark.parametrize(("statement", "expected"), [*TOTALS_DAMAGE, *ENTRY_RULE_DAMAGE])
def test_damage_is_named_by_month_scope_and_amount(
    tmp_path: Path, statement: str, expected: str
) -> None:
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, statement)
    found = audit(path)
    assert not found.ok
    assert expected in found.problems, found.problems


def test_the_check_reads_one_snapshot_while_a_gateway_writes(tmp_path: Path) -> None:
    """Entries and totals come from the same read transaction: a write committed by
    another connection between the two reads cannot show up as damage."""
    path = tmp_path / "l.db"
    busy_ledger(path)
    writer = LedgerStore(path)
    writer.open()
    reading = sqlite3.connect(path, isolation_level=None)
    wrote: list[bool] = []

    class Interleaving:
        """The reader's connection, with a write of another process slipped in right
        after the entries have been summed."""

        def __getattr__(self, name: str) -> object:
            return getattr(reading, name)

        def execute(self, query: str, *params: object) -> object:
            cursor = reading.execute(query, *params)
            if "GROUP BY month, provider" in query and not wrote:
                rows = cursor.fetchall()
                writer.reserve([item("new", 500)], Caps(), now=NOW, lease_s=60)
                wrote.append(True)
                return iter(rows)
            return cursor

    try:
        found = ledger_sql.audit(Interleaving(), NOW.timestamp())  # type: ignore[arg-type]
    finally:
        writer.close()
        reading.close()
    assert wrote and found.ok, found.problems


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.anyio
async def test_llmgw_spend_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "routing.yaml"
    config.write_text(CONFIG.format(plugins="ledger, router"))
    path = tmp_path / "l.db"
    monkeypatch.setenv("LLM_GATEWAY_LEDGER_PATH", str(path))
    spend = ["spend", "--check", "--config", str(config)]
    # No ledger yet: nothing to check, and no file made.
    assert main(spend) == 0
    assert "ledger check: nothing to check" in capsys.readouterr().out
    assert not path.exists()

    g = gateway_from_yaml(
        CONFIG.format(plugins="ledger, router, fake"),
        env={"LLM_GATEWAY_LEDGER_PATH": str(path)},
        providers=[fake()],
    )
    for _ in range(3):
        assert (await g.route(Request("quick", "hi"))).ok
    await g.aclose()
    before = _digest(path)
    assert main(spend) == 0
    out = capsys.readouterr().out
    # Three attempts and the hold the first one took (given back at close).
    assert "ledger check: OK (4 entries in 1 month(s)" in out and "fake/m1" in out
    assert _digest(path) == before  # read-only: not a byte written

    tamper(path, "UPDATE totals SET settled_micro = 0 WHERE scope = 'total'")
    assert main(spend) == 1
    out = capsys.readouterr().out
    assert "ledger check: 1 PROBLEM(S)" in out and "total: totals settled $0.000000" in out
    assert "llmgw spend --repair" in out
    # Without --check the report is printed as before, and the exit code is 0.
    assert main(["spend", "--config", str(config)]) == 0
    assert "ledger check" not in capsys.readouterr().out


def test_a_ledger_in_the_old_index_form_is_checked_as_it_is(tmp_path: Path) -> None:
    """The check rebuilds nothing: an older file is read without being changed."""
    path = tmp_path / "l.db"
    busy_ledger(path)
    db = sqlite3.connect(path)
    db.execute("DROP INDEX entries_open")
    db.execute("CREATE INDEX entries_open ON entries (state, lease_until)")
    db.commit()
    db.close()
    before = _digest(path)
    assert audit(path).ok
    assert _digest(path) == before


def test_a_file_that_cannot_be_read_is_not_called_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "routing.yaml"
    config.write_text(CONFIG.format(plugins="ledger, router"))
    path = tmp_path / "l.db"
    path.write_bytes(b"not a ledger at all, " * 100)
    monkeypatch.setenv("LLM_GATEWAY_LEDGER_PATH", str(path))
    assert main(["spend", "--check", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "ledger check: could not read the ledger (" in out
    assert "PROBLEM" not in out and "--repair" not in out
