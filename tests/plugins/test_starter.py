"""``llmgw init``: a starter config that validates, sized to the keys that are present."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from llmgw.kernel import load_settings
from llmgw.kernel.build import build_gateway
from llmgw.kernel.cli import main

KEYS = {
    "anthropic": "ANTHROPIC_API_KEY",
    "openai": "OPENAI_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
}


@pytest.mark.parametrize(
    ("present", "panels"),
    [
        (["openai"], set()),
        (["anthropic", "gemini"], {"dual_opinion"}),
        (["anthropic", "openai", "gemini", "deepseek"], {"dual_opinion", "triple_review"}),
    ],
)
def test_init_writes_a_valid_config_for_the_keys_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, present: list[str], panels: set[str]
) -> None:
    for name in present:
        monkeypatch.setenv(KEYS[name], f"test-key-for-{name}-000000")
    cfg = tmp_path / "routing.yaml"
    assert main(["init", "--config", str(cfg)]) == 0
    monkeypatch.setenv("LLM_GATEWAY_LEDGER_PATH", str(tmp_path / "ledger.db"))
    settings = load_settings(cfg)
    assert {n for n, s in settings.task_classes.items() if s.members} == panels
    providers = {s.provider for s in settings.task_classes.values() if s.provider}
    assert providers <= set(present)
    gw = build_gateway(settings)
    assert set(gw.providers) == set(present)
    assert all(p.status().available for p in gw.providers.values())
    has_roles = any(t.name == "llm_orchestrate" for t in gw.tools)
    assert has_roles == (len(present) >= 2)
    anyio.run(gw.aclose)


def test_init_refuses_to_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test-key-openai-0000000")
    cfg = tmp_path / "routing.yaml"
    cfg.write_text("# mine\n")
    assert main(["init", "--config", str(cfg)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cfg.read_text() == "# mine\n"


def test_init_without_keys_explains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "routing.yaml"
    assert main(["init", "--config", str(cfg)]) == 2
    assert "no provider key is set" in capsys.readouterr().err
    assert not cfg.exists()
    assert main(["init", "--all", "--config", str(cfg)]) == 0
    assert "triple_review" in cfg.read_text()


def test_init_reads_keys_from_a_dotenv_beside_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Keys may live in a .env beside routing.yaml for every other command; init said
    "no provider key is set"."""
    (tmp_path / ".env").write_text("ANTHROPIC_API_KEY=test-key-anthropic-000000\n")
    cfg = tmp_path / "routing.yaml"
    assert main(["init", "--config", str(cfg)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert "anthropic" in cfg.read_text()


def test_init_into_an_impossible_place_is_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test-key-openai-0000000")
    (tmp_path / "file").write_text("")
    assert main(["init", "--config", str(tmp_path / "file" / "routing.yaml")]) == 1
    err = capsys.readouterr().err
    assert "llmgw init: cannot write" in err and "Traceback" not in err


def _openai_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A starter routing.yaml written by `llmgw init` for an OpenAI key."""
    monkeypatch.setenv("OPENAI_API_KEY", "test-key-openai-0000000")
    cfg = tmp_path / "routing.yaml"
    assert main(["init", "--config", str(cfg)]) == 0
    return cfg


def test_check_config_leaves_no_ledger_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It created the ledger file and its directories: a typo in the path left state."""
    cfg = _openai_config(tmp_path, monkeypatch)
    ledger = tmp_path / "new" / "dirs" / "ledger.db"
    monkeypatch.setenv("LLM_GATEWAY_LEDGER_PATH", str(ledger))
    assert main(["check-config", "--config", str(cfg)]) == 0
    assert not (tmp_path / "new").exists()
    (tmp_path / "blocker").write_text("")
    monkeypatch.setenv("LLM_GATEWAY_LEDGER_PATH", str(tmp_path / "blocker" / "l.db"))
    capsys.readouterr()
    assert main(["check-config", "--config", str(cfg)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_check_config_still_finds_a_ledger_that_is_no_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _openai_config(tmp_path, monkeypatch)
    ledger = tmp_path / "ledger.db"
    ledger.write_bytes(b"not a database, but some bytes " * 200)
    monkeypatch.setenv("LLM_GATEWAY_LEDGER_PATH", str(ledger))
    capsys.readouterr()
    assert main(["check-config", "--config", str(cfg)]) == 2
    assert "file is not a database" in capsys.readouterr().err
    # Read only: no -wal or -shm file beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.db", "routing.yaml"]
