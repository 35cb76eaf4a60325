"""Fixtures for provider tests: a fake upstream and a gateway whose providers point at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from provider_support import KEYS, Stack, gateway_yaml

from llmgw.kernel.fake_upstream import FakeUpstream
from llmgw.kernel.testing import gateway_from_yaml


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture
async def stack(upstream: FakeUpstream) -> AsyncIterator[Stack]:
    gw = gateway_from_yaml(gateway_yaml(upstream), env=KEYS)
    try:
        yield Stack(upstream, gw)
    finally:
        await gw.aclose()
