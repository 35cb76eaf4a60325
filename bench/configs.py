"""routing.yaml variants for the benchmark, all derived from the shipped routing.yaml.

The shipped file is the "full default policy stack". Every provider's ``base_url`` points
at the fake upstream and the ledger writes to a temporary file (WAL, synchronous=FULL, as
always). A variant removes one plugin from ``plugins:`` so its cost shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .common import REPO

#: The single-target class every latency column calls (openai/gpt-4o-mini, max_tokens 512).
TASK_CLASS = "quick_answer"
MODEL = "gpt-4o-mini"
MAX_TOKENS = 512
PROMPT = "Name the capital of France in one word."

#: Panel members (all Chat Completions over httpx2) and the upstream latency of each.
PANEL_CLASS = "bench_panel"
#: The slowest member alone, through the same gateway: what the panel adds to one call.
PANEL_SLOWEST_CLASS = "bench_panel_slowest"
PANEL_MEMBERS: tuple[tuple[str, str, float], ...] = (
    ("openai", "gpt-4o", 0.010),
    ("deepseek", "deepseek-chat", 0.025),
    ("local", "bench-local-model", 0.050),
)

#: Plugins whose removal is measured one at a time (kill_switch is essential: the loader
#: always adds it, so the bench unregisters it after building instead).
POLICIES = (
    "kill_switch",
    "cost",
    "breaker",
    "ledger",
    "retry",
    "fallback",
    "independence",
    "roles",
)


def shipped() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "routing.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def gateway_config(
    upstream_root: str,
    ledger_path: Path,
    *,
    without: str | None = None,
    minimal: bool = False,
    panel: bool = False,
) -> dict[str, Any]:
    """The shipped config pointed at the fake upstream, optionally with a plugin removed."""
    cfg = shipped()
    plugins: list[str] = list(cfg["plugins"])
    if minimal:
        plugins = ["router", "openai"]
    elif without is not None and without != "kill_switch":
        plugins.remove(without)
    for name, spec in cfg.setdefault("providers", {}).items():
        native = name in {"anthropic", "gemini"}  # their SDKs add the version path
        spec["base_url"] = upstream_root if native else f"{upstream_root}/v1"
    if minimal:
        cfg["providers"] = {"openai": cfg["providers"]["openai"]}
        cfg["task_classes"] = {TASK_CLASS: cfg["task_classes"][TASK_CLASS]}
    for section in POLICIES:
        if section not in plugins and section != "kill_switch":
            cfg.pop(section, None)
    if "ledger" in plugins:
        cfg["ledger"] = {**(cfg.get("ledger") or {}), "path": str(ledger_path)}
    if panel:
        plugins.insert(plugins.index("openai"), "openai_compatible")
        cfg["openai_compatible"] = {
            "endpoints": [
                {
                    "name": "local",
                    "base_url": f"{upstream_root}/v1",
                    "models": ["bench-local-model"],
                }
            ]
        }
        cfg.setdefault("prices", {})["local/bench-local-model"] = {
            "input_per_mtok": 0.1,
            "output_per_mtok": 0.2,
        }
        cfg["task_classes"][PANEL_CLASS] = {
            "description": "Benchmark panel: three members of different latencies.",
            "members": [{"provider": p, "model": m} for p, m, _ in PANEL_MEMBERS],
            "max_tokens": 256,
            "quorum": 3,
            "min_distinct_providers": 3,
        }
        provider, model, _ = max(PANEL_MEMBERS, key=lambda m: m[2])
        cfg["task_classes"][PANEL_SLOWEST_CLASS] = {
            "description": "Benchmark: the panel's slowest member alone.",
            "provider": provider,
            "model": model,
            "max_tokens": 256,
        }
        cfg.setdefault("independence", {}).setdefault("panels", {})[PANEL_CLASS] = {
            "mode": "blind",
            "enforce": "hard",
        }
    cfg["plugins"] = plugins
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path
