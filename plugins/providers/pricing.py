"""Model prices: routing.yaml ``prices:`` overrides first, else the bundled genai-prices data.

genai-prices is read offline (its bundled snapshot; the opt-in updater is never used)
and imported on the first lookup. Its figures can vary with the request: DeepSeek's
depend on the time of day, some models (Gemini 2.5 Pro) have an input-size tier. A
:class:`~llmgw.kernel.Price` holds one flat figure that is used both for the preflight
upper bound and for settling, so we take the worst case: the highest price of any time
of the current UTC day, and the highest tier that a prompt allowed by
``gateway.max_prompt_bytes`` can reach. Reported costs may therefore be somewhat above
the bill for off-peak DeepSeek calls; caps can never be overshot by a price that was
too low. Put an exact figure in ``prices:`` to override.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import structlog

from llmgw.kernel import Clock, Price, Settings

log = structlog.get_logger("llmgw.providers.pricing")

OVERRIDE_SOURCE = "routing.yaml prices"

#: Our provider names -> genai-prices provider ids.
GENAI_PROVIDER_IDS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gemini": "google",
    "deepseek": "deepseek",
}


@dataclass(frozen=True)
class PriceInfo:
    """A price with the notes that explain how it was chosen (for report_info)."""

    price: Price
    notes: tuple[str, ...] = ()


class PriceBook:
    """Prices of one provider's models, looked up once per model and cached."""

    def __init__(
        self, provider: str, settings: Settings, clock: Clock, *, genai_provider: str | None
    ) -> None:
        self.provider = provider
        self.settings = settings
        self.clock = clock
        self.genai_provider = genai_provider
        self._cache: dict[str, PriceInfo | None] = {}

    def price(self, model: str) -> Price | None:
        info = self.info(model)
        return info.price if info else None

    def info(self, model: str) -> PriceInfo | None:
        if model not in self._cache:
            self._cache[model] = self._lookup(model)
        return self._cache[model]

    def _lookup(self, model: str) -> PriceInfo | None:
        spec = self.settings.prices.get(f"{self.provider}/{model}")
        if spec is not None:
            return PriceInfo(
                Price(
                    spec.input_per_mtok,
                    spec.output_per_mtok,
                    OVERRIDE_SOURCE,
                    spec.cached_input_per_mtok,
                )
            )
        if self.genai_provider is None:
            return None
        # The largest input bound a request can have: system and prompt at the byte cap.
        max_input = 16 + 2 * (self.settings.gateway.max_prompt_bytes + 8)
        try:
            return genai_price(model, self.genai_provider, self.clock.now(), max_input)
        except Exception as exc:  # bad bundled data must not break routing: price unknown
            log.warning(
                "pricing.lookup_failed",
                provider=self.provider,
                model=model,
                error_type=type(exc).__name__,
            )
            return None


def genai_price(
    model: str, provider_id: str, now: datetime, max_input_tokens: int
) -> PriceInfo | None:
    """The worst-case flat price of ``model`` in genai-prices' bundled data, or None."""
    genai_prices: Any = importlib.import_module("genai_prices")
    snapshot_mod: Any = importlib.import_module("genai_prices.data_snapshot")
    types_mod: Any = importlib.import_module("genai_prices.types")
    try:
        _provider, info = snapshot_mod.get_snapshot().find_provider_model(
            model, None, provider_id, None
        )
    except LookupError:
        return None
    notes: list[str] = []
    candidates = _day_prices(info, types_mod, now.astimezone(UTC))
    if len({_key(c) for c in candidates}) > 1:
        notes.append("the highest of the day's time-of-day prices")
    tiered = False

    def worst(attr: str) -> Decimal | None:
        nonlocal tiered
        values: list[Decimal] = []
        for mp in candidates:
            value = getattr(mp, attr, None)
            if isinstance(value, types_mod.TieredPrices):
                values.append(Decimal(value.base))
                for tier in value.tiers:
                    if tier.start < max_input_tokens:
                        values.append(Decimal(tier.price))
                        tiered = True
            elif value is not None:
                values.append(Decimal(value))
        return max(values) if values else None

    inp, out, cached = worst("input_mtok"), worst("output_mtok"), worst("cache_read_mtok")
    if inp is None or out is None:
        return None
    if tiered:
        notes.append("the highest input-size tier reachable under gateway.max_prompt_bytes")
    source = f"genai-prices {genai_prices.__version__}"
    return PriceInfo(Price(inp, out, source, cached), tuple(notes))


def _day_prices(info: Any, types_mod: Any, now: datetime) -> list[Any]:
    """Every price set in force at some moment of ``now``'s UTC day."""
    if not isinstance(info.prices, list):
        return [info.prices]
    day = datetime.combine(now.date(), time(0, 0), tzinfo=UTC)
    moments = [day + timedelta(minutes=15 * i) for i in range(96)]
    for cp in info.prices:
        c = cp.constraint
        if isinstance(c, types_mod.TimeOfDateConstraint):
            start = c.start_time if c.start_time.tzinfo else c.start_time.replace(tzinfo=UTC)
            moments.append(datetime.combine(now.date(), start.replace(tzinfo=None), tzinfo=UTC))
    found: list[Any] = []
    for moment in moments:
        mp = info.get_prices(moment)
        if not any(mp is f for f in found):
            found.append(mp)
    return found


def _key(mp: Any) -> str:
    return repr((getattr(mp, "input_mtok", None), getattr(mp, "output_mtok", None)))


def price_dict(info: PriceInfo | None) -> dict[str, Any]:
    """A JSON-able description of a price for report_info."""
    if info is None:
        return {"price": None, "price_source": None}
    p = info.price
    out: dict[str, Any] = {
        "price": {
            "input_per_mtok": str(p.input_per_mtok),
            "output_per_mtok": str(p.output_per_mtok),
            "cached_input_per_mtok": (
                str(p.cached_input_per_mtok) if p.cached_input_per_mtok is not None else None
            ),
        },
        "price_source": p.source,
    }
    if info.notes:
        out["price_basis"] = list(info.notes)
    return out
