"""The load of the caps-under-concurrency test, importable by its child processes."""

from __future__ import annotations

import random
from typing import Any

import anyio

from llmgw.kernel import ErrorClass, Outcome, ProviderRequest, Request, Usage
from llmgw.kernel.testing import FakeProvider, flat_price, gateway_from_yaml
from llmgw.kernel.types import input_token_bound

PRICE = flat_price("10", "100")
CAP_USD = 0.50

YAML = """
plugins: [ledger, router, fake]
task_classes:
  quick: {provider: fake, model: m1, max_tokens: 100}
ledger:
  caps: {total_monthly_usd: %s}
"""


class Billing(FakeProvider):
    """Bills 20-100 % of the worst case; 1 in 10 attempts times out after sending (counted
    as billed in full, the worst that can happen)."""

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


async def run_calls(path: str, n: int, seed: int, ledger: bool = True) -> dict[str, Any]:
    """``n`` concurrent calls through a gateway on ledger ``path``; what was billed."""
    provider = Billing(seed)
    env = {"LLM_GATEWAY_LEDGER_PATH": path}
    if not ledger:  # the control run: no ledger, no cap
        env["LLM_GATEWAY_LEDGER"] = "0"
    cap = CAP_USD if ledger else "null"
    g = gateway_from_yaml(YAML % cap, env=env, providers=[provider])
    classes: dict[str, int] = {}

    async def one() -> None:
        # arrivals spread over 20 ms; an attempt takes up to 3 ms: dozens in flight at once
        await anyio.sleep(provider.rng.uniform(0, 0.02))
        env = await g.route(Request("quick", "hi"))
        key = env.status if env.ok else str(env.error_class)
        classes[key] = classes.get(key, 0) + 1

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    await g.aclose()
    return {"billed": provider.billed, "classes": classes}
