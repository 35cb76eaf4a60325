"""The "request is on the wire" signal of every shipped provider, through its real client."""

from __future__ import annotations

import time
from typing import Any

import httpx2
import pytest
from provider_support import PROVIDERS, Stack, request

from llmgw.kernel import wire


@pytest.mark.anyio
@pytest.mark.parametrize("provider", sorted(PROVIDERS))
async def test_each_provider_signals_once_its_request_is_written(
    stack: Stack, provider: str
) -> None:
    stack.up.set_latency(PROVIDERS[provider][0], 0.2)
    fired: list[float] = []
    with wire.watching(lambda: fired.append(time.perf_counter())):
        outcome = await stack.gw.providers[provider].complete(request(provider))
    answered = time.perf_counter()
    assert outcome.ok, outcome.message
    assert fired, "the provider never signalled that its request was on the wire"
    # Fired once the request was out, not once the answer was in: the upstream held the
    # answer 0.2 s after reading the request.
    assert answered - fired[0] >= 0.15
    assert len(stack.up.requests) == 1


@pytest.mark.anyio
async def test_nothing_is_traced_when_nobody_watches() -> None:
    req = httpx2.Request("POST", "http://127.0.0.1:9/x", content=b"{}")
    await wire.request_hook(req)
    assert "trace" not in req.extensions
    wire.sent()  # outside a panel: a no-op, never an error


@pytest.mark.anyio
async def test_a_trace_extension_already_set_is_kept() -> None:
    seen: list[str] = []
    fired: list[bool] = []

    async def mine(event: str, info: dict[str, Any]) -> None:
        seen.append(event)

    req = httpx2.Request("POST", "http://127.0.0.1:9/x", content=b"{}", extensions={"trace": mine})
    with wire.watching(lambda: fired.append(True)):
        await wire.request_hook(req)
    trace = req.extensions["trace"]
    await trace("http11.send_request_headers.complete", {})
    assert fired == [] and seen == ["http11.send_request_headers.complete"]
    await trace("http11.send_request_body.complete", {})
    assert fired == [True] and seen[-1] == "http11.send_request_body.complete"
