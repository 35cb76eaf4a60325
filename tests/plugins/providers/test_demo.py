"""``llmgw demo``: the real provider plugins against the fake upstream, offline."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from llmgw.kernel.demo import DEMO_PLUGINS, run_demo

REDUCED = ["router", "openai", "anthropic", "gemini", "deepseek"]
ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.anyio
async def test_demo_with_provider_plugins_only() -> None:
    out = io.StringIO()
    assert await run_demo(out, REDUCED) == 0
    text = out.getvalue()
    assert "== single route: quick_answer ==" in text
    assert "echo[gpt-4o-mini]: What is the capital of France?" in text
    assert "== blind panel: triple_review ==" in text
    assert text.count("  member ") == 3
    assert "== fault: openai/gpt-4o-mini answers 503 ==" in text
    assert "[overloaded]" in text
    assert "demo-key" not in text


def test_demo_plugins_are_the_full_stack() -> None:
    assert DEMO_PLUGINS[-4:] == ("openai", "anthropic", "gemini", "deepseek")
    assert "router" in DEMO_PLUGINS
    assert "fallback" in DEMO_PLUGINS


@pytest.mark.anyio
async def test_demo_runs_the_shipped_routing_yaml(tmp_path: Path) -> None:
    out = io.StringIO()
    rc = await run_demo(out, config=ROOT / "routing.yaml")
    text = out.getvalue()
    assert rc == 0, text
    assert "independence: certified=True" in text
    assert "round 1 verify verifier" in text
    assert "access=['artifact'] verdict=ACCEPT" in text
    assert "fell back from: openai/gpt-4o-mini" in text


@pytest.mark.anyio
async def test_demo_refuses_a_provider_it_cannot_redirect(tmp_path: Path) -> None:
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(
        "plugins: [router, openai_compatible]\n"
        "openai_compatible:\n"
        "  endpoints: [{name: remote, base_url: 'https://llm.example/v1', models: [m]}]\n"
        "task_classes:\n  q: {provider: remote, model: m}\n"
    )
    out = io.StringIO()
    assert await run_demo(out, config=cfg) == 1
    assert "only runs against loopback" in out.getvalue()


def test_llmgw_demo_command_exits_0_from_the_repository() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "llmgw.kernel.cli", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "config: routing.yaml" in r.stdout
