"""Caps under concurrency: 200 concurrent calls against a $0.50 cap, in one process and in
4 processes sharing one ledger file. The fake upstream bills 20-100 % of each attempt's
worst case (some attempts time out after sending: counted as billed in full). Figure:
overshoot = what the upstream billed above the cap, which must be $0.000."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest
from _money_helpers import store

CAP_USD = 0.50
CAP = 500_000

PROVIDER_CODE = """
import random
import anyio
from llmgw.kernel import ErrorClass, Outcome, ProviderRequest, Usage
from llmgw.kernel.testing import FakeProvider, flat_price
from llmgw.kernel.types import input_token_bound

PRICE = flat_price("10", "100")


class Billing(FakeProvider):
    \"\"\"Bills 20-100 % of the worst case; 1 in 10 attempts times out after sending.\"\"\"

    def __init__(self, seed: int) -> None:
        super().__init__(prices={"m1": PRICE})
        self.rng = random.Random(seed)
        self.billed = 0

    async def complete(self, request: ProviderRequest) -> Outcome:
        await anyio.sleep(self.rng.uniform(0, 0.003))
        bound = input_token_bound(request.system, request.messages)
        if self.rng.random() < 0.1:
            self.billed += PRICE.worst_case_micro_usd(bound, request.max_tokens)
            return Outcome.failure(ErrorClass.TIMEOUT, "timeout", sent=True)
        f = self.rng.uniform(0.2, 1.0)
        usage = Usage(round(f * bound), round(f * request.max_tokens))
        self.billed += PRICE.cost_micro_usd(usage)
        return Outcome.success("ok", usage)


YAML = '''
plugins: [ledger, router, fake]
task_classes:
  quick: {provider: fake, model: m1, max_tokens: 100}
ledger:
  caps: {total_monthly_usd: %s}
'''
"""

RUN_CODE = """
async def run_calls(path: str, n: int, seed: int, ledger: bool = True) -> dict:
    from llmgw.kernel import Request
    from llmgw.kernel.testing import gateway_from_yaml

    provider = Billing(seed)
    env = {"LLM_GATEWAY_LEDGER_PATH": path}
    if not ledger:  # the control run: no ledger, no cap
        env["LLM_GATEWAY_LEDGER"] = "0"
    g = gateway_from_yaml(YAML % "null", env=env, providers=[provider]) if not ledger else \
        gateway_from_yaml(YAML % CAP_USD, env=env, providers=[provider])
    classes: dict = {}

    async def one() -> None:
        # arrivals spread over 20 ms; an attempt takes up to 3 ms: dozens in flight at once
        await anyio.sleep(provider.rng.uniform(0, 0.02))
        env = await g.route(Request("quick", "hi"))
        key = env.status if env.ok else env.error_class
        classes[key] = classes.get(key, 0) + 1

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    await g.aclose()
    return {"billed": provider.billed, "classes": classes}
"""

exec(PROVIDER_CODE + f"\nCAP_USD = {CAP_USD}\n" + RUN_CODE)  # noqa: S102 - shared with children


def check_ledger(path: Path, billed: int, label: str, classes: dict[str, int]) -> None:
    s = store(path)
    try:
        (month,) = {k for k in [s._read("SELECT month FROM totals")[0][0]]}
        total = s.scopes(month)["total"]
        assert s.count("reserved") == 0
        assert s.integrity_check() == "ok"
    finally:
        s.close()
    overshoot = max(0, billed - CAP)
    print(f"\n{label}: {sum(classes.values())} calls {classes}; upstream billed "
          f"${billed / 1e6:.6f} vs cap ${CAP_USD:.2f}; ledger committed "
          f"${total.used_micro / 1e6:.6f} (settled {total.settled_micro / 1e6:.6f}, unknown "
          f"{total.unknown_micro / 1e6:.6f}); overshoot ${overshoot / 1e6:.3f}")
    assert overshoot == 0
    assert total.used_micro <= CAP
    assert total.used_micro == billed  # every billed micro-dollar is in the ledger, once
    assert classes.get("budget_exceeded", 0) > 0  # the cap really was the limit
    assert classes.get("success", 0) > 0


@pytest.mark.anyio
async def test_200_concurrent_calls_never_overshoot_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    result = await run_calls(str(path), 200, seed=1)  # type: ignore[name-defined]
    check_ledger(path, result["billed"], "1 process x 200 concurrent", result["classes"])


CHILD = """
import json, sys, time, os, anyio
{code}
path, seed, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
while not os.path.exists(go):
    time.sleep(0.001)
print(json.dumps(anyio.run(run_calls, path, 50, seed)))
"""


def test_4_processes_sharing_one_ledger_never_overshoot_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    script = tmp_path / "child.py"
    code = PROVIDER_CODE + f"\nCAP_USD = {CAP_USD}\n" + RUN_CODE
    script.write_text(CHILD.format(code=textwrap.dedent(code)))
    go = tmp_path / "go"
    env = {"PATH": "/usr/bin:/bin", "LLM_GATEWAY_LOG_LEVEL": "ERROR"}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(path), str(seed), str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
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
    result = anyio.run(run_calls, str(tmp_path / "l.db"), 200, 1, False)  # type: ignore[name-defined]
    assert result["billed"] > CAP
    assert not (tmp_path / "l.db").exists()


def test_the_child_helper_runs_in_process(tmp_path: Path) -> None:
    # the same code the children run, so a failure there shows up here too
    result = anyio.run(run_calls, str(tmp_path / "l.db"), 5, 3)  # type: ignore[name-defined]
    assert sum(result["classes"].values()) == 5
