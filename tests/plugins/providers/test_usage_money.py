"""What an upstream's usage block is worth to the ledger, over each provider's real wire.

A usage block without usable counts (``{}``, nulls, negative numbers) used to be read as
0 tokens: the attempt was settled at $0 and a monthly cap let any number of such answers
through. Without counts the attempt stays charged at its worst case, as ``unknown``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from provider_support import KEYS, PROVIDERS, gateway_yaml

from llmgw.kernel import Request
from llmgw.kernel.fake_upstream import FakeUpstream
from llmgw.kernel.testing import gateway_from_yaml

# Every provider's test model priced alike, so one cap means the same number of calls.
PRICES = "prices:\n" + "".join(
    f"  {p}/{m}: {{input_per_mtok: 1, output_per_mtok: 1000}}\n" for p, (m, _) in PROVIDERS.items()
)
# max_tokens 64 at $1,000 per M output tokens: each attempt's worst case is ~$0.064.
CAP = "ledger:\n  caps: {total_monthly_usd: 0.2}\n"


@pytest.mark.anyio
@pytest.mark.parametrize("fault", ["usage_missing", "usage_negative"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_answers_without_counts_stay_charged_and_the_cap_holds(
    upstream: FakeUpstream, tmp_path: Path, provider: str, fault: str
) -> None:
    text = gateway_yaml(upstream, plugins=", kill_switch, ledger", extra=PRICES + CAP)
    env = {**KEYS, "LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "ledger.db")}
    async with gateway_from_yaml(text, env=env) as gw:
        upstream.fail_next(10, fault)
        envelopes = [await gw.route(Request(f"ask_{provider}", "hi")) for _ in range(6)]
        totals = dict(gw.routing_info()["ledger"]["total"])
    answered = [e for e in envelopes if e.status == "success"]
    refused = [e for e in envelopes if e.meta.get("error_class") == "budget_exceeded"]
    # Three worst cases fit under the cap; every later call is refused before sending.
    assert len(answered) == 3 and len(refused) == 3
    assert all(e.meta["cost_usd_approx"] is None for e in answered)
    assert totals["settled_usd"] == 0 and totals["reserved_usd"] == 0
    assert 0.18 < totals["unknown_usd"] <= 0.2
    assert len(upstream.requests) == 3
