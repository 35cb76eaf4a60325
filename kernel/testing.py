"""Test helpers for the gateway and for plugin authors (an opt-in pytest plugin).

Enable with ``-p llmgw.kernel.testing`` (or ``pytest_plugins = ["llmgw.kernel.testing"]``).
It provides:

- :func:`gateway_from_yaml`: build a gateway from a ``routing.yaml`` string;
- :class:`FakeProvider` / :class:`FakeProviderPlugin`: a scripted provider that records
  every request it receives (no network);
- :class:`FakeClock`: a clock whose ``sleep`` advances time instantly;
- :func:`mcp_session`: an in-memory MCP client connected to a gateway's server;
- fixtures ``anyio_backend`` (asyncio), ``fake_clock`` and ``make_gateway``.

The fake HTTP upstream that speaks the providers' wire formats lives in
:mod:`llmgw.kernel.fake_upstream`.
"""

from __future__ import annotations

import random
import textwrap
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from .build import build_gateway
from .config import load_settings
from .errors import ErrorClass
from .gateway import Gateway
from .hookspecs import hookimpl
from .types import Outcome, Price, ProviderRequest, ProviderStatus, Usage

__all__ = [
    "FakeClock",
    "FakeProvider",
    "FakeProviderPlugin",
    "gateway_from_yaml",
    "mcp_session",
]


class FakeClock:
    """A deterministic clock: ``sleep`` advances time at once and is recorded."""

    def __init__(self, start: float = 1000.0, wall: datetime | None = None) -> None:
        self._t = start
        self._wall0 = wall or datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
        self._t0 = start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self._t

    def now(self) -> datetime:
        return self._wall0 + timedelta(seconds=self._t - self._t0)

    def advance(self, seconds: float) -> None:
        self._t += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._t += max(0.0, seconds)


Script = Outcome | Callable[[ProviderRequest], Outcome]


@dataclass
class FakeProvider:
    """A provider that answers from a script and records what it was sent.

    With no script it echoes the prompt. ``script`` entries are consumed in order; a
    callable receives the request. ``fail_with(ErrorClass.X)`` queues a failure.
    """

    name: str = "fake"
    prices: Mapping[str, Price] = field(default_factory=dict)
    available: bool = True
    script: deque[Script] = field(default_factory=deque)
    received: list[ProviderRequest] = field(default_factory=list)
    closed: bool = False

    def status(self) -> ProviderStatus:
        if self.available:
            return ProviderStatus(True, key_env=f"{self.name.upper()}_API_KEY")
        return ProviderStatus(
            False, f"{self.name.upper()}_API_KEY is not set", key_env=f"{self.name.upper()}_API_KEY"
        )

    def price(self, model: str) -> Price | None:
        return self.prices.get(model)

    def then(self, *outcomes: Script) -> FakeProvider:
        self.script.extend(outcomes)
        return self

    def fail_with(
        self, error_class: ErrorClass, *, sent: bool = True, retry_after_s: float | None = None
    ) -> FakeProvider:
        return self.then(
            Outcome.failure(
                error_class, f"fake {error_class.value}", sent=sent, retry_after_s=retry_after_s
            )
        )

    async def complete(self, request: ProviderRequest) -> Outcome:
        self.received.append(request)
        if not self.available:
            return Outcome.failure(
                ErrorClass.AUTH_ERROR, f"{self.name.upper()}_API_KEY is not set", sent=False
            )
        if self.script:
            item = self.script.popleft()
            return item(request) if callable(item) else item
        text = f"echo[{request.model}]: {request.messages[-1].content}"
        usage = Usage(
            input_tokens=max(1, len(request.messages[-1].content) // 4),
            output_tokens=min(request.max_tokens, max(1, len(text) // 4)),
        )
        return Outcome.success(text, usage, finish_reason="stop")

    async def aclose(self) -> None:
        self.closed = True


class FakeProviderPlugin:
    """A plugin object registering fake providers (pass it in ``extra_plugins``)."""

    def __init__(self, *providers: FakeProvider) -> None:
        self.providers = {p.name: p for p in providers}

    @hookimpl
    def register_providers(self, register: Callable[[Any], None]) -> None:
        for provider in self.providers.values():
            register(provider)


def flat_price(input_per_mtok: str = "1", output_per_mtok: str = "2") -> Price:
    """A simple price for tests: USD per million input / output tokens."""
    return Price(Decimal(input_per_mtok), Decimal(output_per_mtok), source="test")


def gateway_from_yaml(
    text: str,
    *,
    env: Mapping[str, str] | None = None,
    providers: Iterable[FakeProvider] = (),
    extra_plugins: Mapping[str, object] | None = None,
    clock: Any = None,
    seed: int = 0,
    path: Path | str | None = None,
) -> Gateway:
    """Build a gateway from YAML text. Fake providers are enabled as plugin ``fake``.

    ``env`` replaces the process environment (default: empty), so tests never see real
    keys. List ``fake`` in ``plugins:`` to use ``providers``.
    """
    extra: dict[str, object] = dict(extra_plugins or {})
    provs = list(providers)
    if provs:
        extra.setdefault("fake", FakeProviderPlugin(*provs))
    settings = load_settings(path, text=textwrap.dedent(text), env=dict(env or {}))
    return build_gateway(settings, clock=clock, rng=random.Random(seed), extra_plugins=extra)


@asynccontextmanager
async def mcp_session(gateway: Gateway) -> AsyncIterator[Any]:
    """An in-memory MCP client session connected to ``gateway``'s server."""
    from mcp import Client

    from .server import build_server

    server = build_server(gateway, own_gateway=False)
    async with Client(server) as client:
        yield client


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_gateway() -> Iterator[Callable[..., Gateway]]:
    """``make_gateway(yaml_text, providers=[...], env={...})``; closed after the test."""
    built: list[Gateway] = []

    def make(text: str, **kwargs: Any) -> Gateway:
        gw = gateway_from_yaml(text, **kwargs)
        built.append(gw)
        return gw

    yield make
    import anyio

    async def close_all() -> None:
        for gw in built:
            await gw.aclose()

    anyio.run(close_all)
