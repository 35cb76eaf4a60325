"""``run_demo`` against the fake upstream with the provider plugins."""

from __future__ import annotations

import io

import pytest

from llmgw.kernel.demo import DEMO_PLUGINS, run_demo

REDUCED = ["router", "openai", "anthropic", "gemini", "deepseek"]


@pytest.mark.anyio
async def test_demo_with_provider_plugins() -> None:
    out = io.StringIO()
    assert await run_demo(out, REDUCED) == 0
    text = out.getvalue()
    assert "== single route: quick_answer ==" in text
    assert "echo[gpt-4o-mini]: What is the capital of France?" in text
    assert "== blind panel: triple_review ==" in text
    assert text.count("  member ") == 3
    assert "== fault: primary answers 503 ==" in text
    assert "[overloaded]" in text
    assert "demo-key" not in text


def test_demo_plugins_are_the_full_stack() -> None:
    assert DEMO_PLUGINS[-4:] == ("openai", "anthropic", "gemini", "deepseek")
    assert "router" in DEMO_PLUGINS and "fallback" in DEMO_PLUGINS


@pytest.mark.anyio
async def test_full_demo_falls_back_after_503() -> None:
    from llmgw.kernel import PluginError

    out = io.StringIO()
    try:
        rc = await run_demo(out)
    except PluginError as exc:  # a policy plugin is still a placeholder
        pytest.skip(f"full plugin stack not available: {exc}")
    text = out.getvalue()
    assert rc == 0, text
    assert "fell back from: openai/gpt-4o-mini" in text
    assert "== orchestrate (standard) ==" in text
