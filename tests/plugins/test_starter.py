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
