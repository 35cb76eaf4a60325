"""Caps under concurrency: 200 concurrent calls against a $0.50 cap, in one process and in
4 processes sharing one ledger file. The fake upstream bills 20-100 % of each attempt's
worst case (some attempts time out after sending: counted as billed in full). Figure:
overshoot = what the upstream billed above the cap, which must be $0.000."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from _ledger_load import CAP_USD, run_calls
from _money_helpers import store

CAP = 500_000
HERE = Path(__file__).parent


def check_ledger(path: Path, billed: int, label: str, classes: dict[str, int]) -> None:
    s = store(path)
    try:
        ((month,),) = s._read("SELECT DISTINCT month FROM totals")
        total = s.scopes(month)["total"]
        assert s.count("reserved") == 0
        assert s.integrity_check() == "ok"
    finally:
        s.close()
    overshoot = max(0, billed - CAP)
    print(
        f"\n{label}: {sum(classes.values())} calls {classes}; upstream billed "
        f"${billed / 1e6:.6f} vs cap ${CAP_USD:.2f}; ledger committed "
        f"${total.used_micro / 1e6:.6f} (settled {total.settled_micro / 1e6:.6f}, unknown "
        f"{total.unknown_micro / 1e6:.6f}); overshoot ${overshoot / 1e6:.3f}"
    )
    assert overshoot == 0
    assert total.used_micro <= CAP
    assert total.used_micro == billed  # every billed micro-dollar is in the ledger, once
    assert classes.get("budget_exceeded", 0) > 0  # the cap really was the limit
    assert classes.get("success", 0) > 0


@pytest.mark.anyio
async def test_200_concurrent_calls_never_overshoot_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    result = await run_calls(str(path), 200, seed=1)
    check_ledger(path, result["billed"], "1 process x 200 concurrent", result["classes"])


CHILD = """
import json, os, sys, time
import anyio
sys.path.insert(0, sys.argv[4])
from _ledger_load import run_calls
path, seed, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
while not os.path.exists(go):
    time.sleep(0.001)
print(json.dumps(anyio.run(run_calls, path, 50, seed)))
"""


def test_4_processes_sharing_one_ledger_never_overshoot_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    go = tmp_path / "go"
    env = {"PATH": "/usr/bin:/bin", "LLM_GATEWAY_LOG_LEVEL": "ERROR"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(path), str(seed), str(go), str(HERE)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        for seed in range(4)
    ]
    time.sleep(0.8)  # let every child import and build its gateway, then start together
    go.write_text("go")
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    billed = sum(r["billed"] for r in results)
    classes: dict[str, int] = {}
    for r in results:
        for k, v in r["classes"].items():
            classes[k] = classes.get(k, 0) + v
    check_ledger(path, billed, "4 processes x 50 concurrent", classes)


def test_control_without_the_ledger_the_same_load_overshoots(tmp_path: Path) -> None:
    # proves the figure above can fail: the same calls without a ledger bill past $0.50
    result = anyio.run(run_calls, str(tmp_path / "l.db"), 200, 1, False)
    assert result["billed"] > CAP
    assert not (tmp_path / "l.db").exists()


def test_the_child_helper_runs_in_process(tmp_path: Path) -> None:
    # the same code the children run, so a failure there shows up here too
    result = anyio.run(run_calls, str(tmp_path / "l.db"), 5, 3)
    assert sum(result["classes"].values()) == 5
