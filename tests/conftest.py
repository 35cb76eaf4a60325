"""Shared fixtures: the test suite never reads the real environment or real keys."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_real_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A ledger without an explicit path lands in the user data dir: keep it in a temp dir.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))
    for name in (
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "GEMINI_API_KEY",
        "DEEPSEEK_API_KEY",
        "LLM_GATEWAY_DISABLED",
        "LLM_GATEWAY_EXPENSIVE_DISABLED",
        "LLM_GATEWAY_CONFIG",
        "LLM_GATEWAY_CAP_TOTAL_MONTHLY",
        "LLM_GATEWAY_LEDGER",
        "LLM_GATEWAY_LEDGER_PATH",
    ):
        monkeypatch.delenv(name, raising=False)
