"""Percentiles, medians over rounds and their spread."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of unsorted values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"p50": pct(values, 0.5), "p90": pct(values, 0.9), "p99": pct(values, 0.99)}


def over_rounds(values: Sequence[float]) -> dict[str, Any]:
    """Median over rounds, with the spread (min, max) and every round's value."""
    vals = [v for v in values if v == v]  # drop NaN
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "rounds": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "rounds": [round(v, 4) for v in vals],
    }
