"""The example hook files, loaded by path and ordered by config, doing their jobs."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from llmgw.kernel import Request, load_settings
from llmgw.kernel.build import build_gateway
from llmgw.kernel.testing import FakeProvider, FakeProviderPlugin, flat_price

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
plugins:
  - hooks/audit_log.py
  - hooks/secret_guard.py
  - kill_switch
  - ledger
  - router
  - fake
secret_guard:
  extra_patterns: {{internal: "itk_[a-z]{{8}}"}}
audit_log: {{path: audit.jsonl, include_prompt_digest: true}}
ledger:
  path: {ledger}
  caps: {{total_monthly_usd: 10}}
task_classes:
  quick: {{provider: fake, model: m1, max_tokens: 50}}
"""


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, FakeProvider]:
    shutil.copytree(ROOT / "examples" / "hooks", tmp_path / "hooks")
    (tmp_path / "routing.yaml").write_text(CONFIG.format(ledger=tmp_path / "ledger.db"))
    return tmp_path, FakeProvider(prices={"m1": flat_price()})


def _build(tmp: Path, fake: FakeProvider):  # type: ignore[no-untyped-def]
    settings = load_settings(tmp / "routing.yaml", env={})
    return build_gateway(settings, extra_plugins={"fake": FakeProviderPlugin(fake)})


def _ledger_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])


@pytest.mark.anyio
@pytest.mark.parametrize(
    "prompt",
    [
        "my key is sk-proj-abcdefghijklmnopqrstuvwx",
        "token itk_abcdefgh please",
        "-----BEGIN RSA PRIVATE KEY-----\nMII...",
    ],
)
async def test_secret_guard_refuses_before_anything_is_sent_or_reserved(
    setup: tuple[Path, FakeProvider], prompt: str
) -> None:
    tmp, fake = setup
    gw = _build(tmp, fake)
    env = await gw.route(Request("quick", prompt))
    assert env.status == "error"
    assert env.meta["error_class"] == "policy_refused"
    assert "looks like a credential" in (env.error or "")
    assert "abcdefgh" not in json.dumps(env.to_dict())
    assert fake.received == []
    assert _ledger_rows(tmp / "ledger.db") == 0
    await gw.aclose()


@pytest.mark.anyio
async def test_clean_prompts_pass_and_the_audit_log_records_each_attempt(
    setup: tuple[Path, FakeProvider],
) -> None:
    tmp, fake = setup
    gw = _build(tmp, fake)
    assert [p.name for p in gw.plugins][:2] == ["audit_log", "secret_guard"]
    env = await gw.route(Request("quick", "hello there"))
    assert env.status == "success"
    assert len(fake.received) == 1
    lines = [json.loads(x) for x in (tmp / "audit.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    line = lines[0]
    assert (line["provider"], line["model"], line["ok"], line["sent"]) == ("fake", "m1", True, True)
    assert line["cost_micro_usd"] == env.meta["attempts"][0]["cost_usd"] * 1_000_000
    assert "hello" not in (tmp / "audit.jsonl").read_text()
    assert len(line["prompt_sha256"]) == 64
    assert (tmp / "audit.jsonl").stat().st_mode & 0o777 == 0o600
    await gw.aclose()


@pytest.mark.anyio
async def test_audit_log_being_outermost_sees_refused_attempts(
    setup: tuple[Path, FakeProvider],
) -> None:
    tmp, fake = setup
    text = (
        (tmp / "routing.yaml")
        .read_text()
        .replace("total_monthly_usd: 10", "total_monthly_usd: 0.000001")
    )
    (tmp / "routing.yaml").write_text(text)
    gw = _build(tmp, fake)
    env = await gw.route(Request("quick", "hello"))
    assert env.meta["error_class"] == "budget_exceeded"
    assert fake.received == []
    line = json.loads((tmp / "audit.jsonl").read_text().splitlines()[0])
    assert (line["error_class"], line["sent"]) == ("budget_exceeded", False)
    await gw.aclose()


def test_bad_pattern_is_a_config_error(setup: tuple[Path, FakeProvider]) -> None:
    from llmgw.kernel import ConfigError

    tmp, fake = setup
    text = (tmp / "routing.yaml").read_text().replace('"itk_[a-z]{8}"', '"itk_[a-z"')
    (tmp / "routing.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        _build(tmp, fake)
    assert "secret_guard.extra_patterns" in str(err.value)
    assert "not a valid regex" in str(err.value)
