"""The benchmark harness, smallest configuration: correctness only, never timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_smoke_run_measures_every_column_correctly(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    # 0: every goal passed, 1: some goal missed (timing: not judged here), 2: a failure.
    assert proc.returncode in {0, 1}, proc.stdout + proc.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))

    cols = doc["columns"]
    assert {"direct", "gw_full", "mcp_gw", "mcp_bare"} <= set(cols)
    for key, col in cols.items():
        assert col["errors"] == 0, (key, col["first_error"])
        # One upstream request per call: no hidden retry, nothing lost.
        assert col["upstream_requests_per_call"] == 1.0, key
        assert col["latency_ms"]["p50"]["median"] > 0
    assert cols["gw_full"]["baseline"] == "direct"
    assert cols["mcp_gw"]["baseline"] == "mcp_bare"
    assert cols["gw_full"]["calls_per_s"]["median"] > 0

    assert doc["panel"]["errors"] == 0
    # A panel waits for its slowest member, whose upstream answers after 50 ms; so does
    # that member alone through the gateway (answers checked: errors stays 0). Their
    # ratios to the direct call, timed apart, sit near 1: a smoke run's few samples
    # can put one a little under it (0.988 seen), so only the wall times are bounded.
    slowest_ms = max(m["upstream_latency_ms"] for m in doc["panel"]["members"])
    assert slowest_ms == 50.0
    assert doc["panel"]["wall_p50_ms"]["median"] >= slowest_ms
    assert doc["panel"]["slowest_alone_p50_ms"]["median"] >= slowest_ms
    for key in ("ratio", "slowest_alone_ratio", "ratio_over_alone"):
        assert 0.9 < doc["panel"][key]["median"] < 2.0, key

    cold = doc["cold_start"]
    assert {"llm_route", "llm_routing_info"} <= set(cold["llmgw"]["tools"])
    assert cold["bare"]["tools"] == ["ask"]
    assert cold["bare_paused"]["tools"] == ["ask"]
    assert cold["time_ratio_same_collector"] > 0
    assert cold["llmgw"]["rss_mb"]["median"] > 10

    ledger = doc["ledger"]
    for procs in ("procs_1", "procs_4"):
        assert ledger[procs]["invariant_ok"], (procs, ledger[procs]["problems"])
    assert ledger["procs_4"]["reservations_per_s"]["median"] > 0
    assert ledger["cap_race"] == {
        "room": 10, "accepted": 10, "overshoot_micro": 0, "ok": True
    }  # fmt: skip

    # The machine's own costs, at the start and the end of the run (bench/probe.py).
    for when in ("start", "end"):
        probe = doc["machine_probe"][when]
        assert probe["fdatasync_ms"]["back_to_back_p50"] > 0
        assert probe["fdatasync_ms"]["after_idle_p50"] > 0
        assert probe["syscall_us"] > 0 and probe["python_ms"] > 0
    assert "machine probe (start -> end): fdatasync of 24 KiB" in proc.stdout

    names = {g["goal"] for g in doc["goals"]}
    assert "in-process added p50, full stack + ledger" in names
    assert all(isinstance(g["pass"], bool) for g in doc["goals"])
    assert "Goals" in proc.stdout and ("PASS" in proc.stdout or "MISS" in proc.stdout)


def test_the_llmgw_bench_command_finds_the_suite_outside_the_checkout(tmp_path: Path) -> None:
    """The console script's sys.path holds its own directory, not the checkout's: the
    command found no bench/ (exit 2) even from the checkout itself."""
    script = Path(sys.executable).with_name("llmgw")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "llmgw.kernel.cli"]
    for cwd in (REPO, tmp_path):
        proc = subprocess.run(
            [*command, "bench", "--help"], cwd=cwd, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "usage: python -m bench" in proc.stdout
