"""Prices: routing.yaml overrides, genai-prices worst cases, unknown models, caching."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from llmgw.kernel import load_settings
from llmgw.kernel.testing import FakeClock
from llmgw.plugins.providers import pricing
from llmgw.plugins.providers.pricing import PriceBook

BASE = """
plugins: [router]
task_classes:
  a: {provider: openai, model: gpt-4o-mini}
"""


def book(provider: str, genai: str | None, extra: str = "", hour: int = 12) -> PriceBook:
    settings = load_settings(text=BASE + extra, env={})
    clock = FakeClock(wall=datetime(2026, 11, 15, hour, 0, tzinfo=UTC))
    return PriceBook(provider, settings, clock, genai_provider=genai)


def test_genai_prices_figure_and_source() -> None:
    import genai_prices

    p = book("openai", "openai").price("gpt-4o-mini")
    assert p is not None
    assert (p.input_per_mtok, p.output_per_mtok) == (Decimal("0.15"), Decimal("0.6"))
    assert p.cached_input_per_mtok == Decimal("0.075")
    assert p.source == f"genai-prices {genai_prices.__version__}"


def test_override_takes_precedence() -> None:
    extra = "prices:\n  openai/gpt-4o-mini: {input_per_mtok: 9, output_per_mtok: 10}\n"
    p = book("openai", "openai", extra).price("gpt-4o-mini")
    assert p is not None
    assert (p.input_per_mtok, p.output_per_mtok, p.source) == (
        Decimal(9),
        Decimal(10),
        "routing.yaml prices",
    )


@pytest.mark.parametrize("hour", [3, 18])  # peak and off-peak UTC hours
def test_deepseek_time_of_day_price_is_the_days_maximum(hour: int) -> None:
    b = book("deepseek", "deepseek", hour=hour)
    p = b.price("deepseek-chat")
    assert p is not None
    assert (p.input_per_mtok, p.output_per_mtok) == (Decimal("0.27"), Decimal("1.1"))
    info = b.info("deepseek-chat")
    assert info is not None and any("time-of-day" in n for n in info.notes)


def test_tier_counts_only_when_a_prompt_can_reach_it() -> None:
    big = book("gemini", "google").price("gemini-2.5-pro")  # default 1 MiB prompts
    small = book("gemini", "google", "gateway: {max_prompt_bytes: 50000}\n").price("gemini-2.5-pro")
    assert big is not None and small is not None
    assert (big.input_per_mtok, big.output_per_mtok) == (Decimal("2.5"), Decimal("15"))
    assert (small.input_per_mtok, small.output_per_mtok) == (Decimal("1.25"), Decimal("10"))


def test_unknown_model_or_provider_has_no_price() -> None:
    assert book("openai", "openai").price("no-such-model-xyz") is None
    assert book("local", None).price("llama3.2") is None


def test_lookups_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = pricing.genai_price

    def counting(model: str, *args: object) -> object:
        calls.append(model)
        return real(model, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(pricing, "genai_price", counting)
    b = book("openai", "openai")
    for _ in range(3):
        b.price("gpt-4o-mini")
        b.price("nope-model")
    assert calls == ["gpt-4o-mini", "nope-model"]
