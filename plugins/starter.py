"""``llmgw init``: a commented starter routing.yaml for the providers whose keys are set.

One key gives single-provider classes; two or more add cross-vendor fallbacks, panels
and a role table that mixes vendors (agreement is evidence only between different
models).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Vendor:
    name: str
    key_env: str
    cheap: str
    strong: str
    long: str


VENDORS = (
    Vendor(
        "anthropic",
        "ANTHROPIC_API_KEY",
        "claude-haiku-4-5",
        "claude-sonnet-4-6",
        "claude-sonnet-4-6",
    ),
    Vendor("openai", "OPENAI_API_KEY", "gpt-4o-mini", "gpt-4o", "gpt-4o"),
    Vendor("gemini", "GEMINI_API_KEY", "gemini-2.5-flash-lite", "gemini-2.5-pro", "gemini-2.5-pro"),
    Vendor("deepseek", "DEEPSEEK_API_KEY", "deepseek-chat", "deepseek-reasoner", "deepseek-chat"),
)


class InitError(Exception):
    """``llmgw init`` cannot write a config; the message says why and what to do."""


def present_vendors(env: Mapping[str, str]) -> list[Vendor]:
    return [v for v in VENDORS if env.get(v.key_env)]


def _t(vendor: Vendor, model: str) -> str:
    return f"{{provider: {vendor.name}, model: {model}}}"


def render(vendors: list[Vendor]) -> str:
    """The starter file for these vendors (first = preferred)."""
    if not vendors:
        raise InitError("no vendor given")
    first = vendors[0]
    others = vendors[1:]
    long_vendor = next((v for v in vendors if v.name == "gemini"), first)
    names = ", ".join(v.name for v in vendors)
    out: list[str] = [
        "# routing.yaml written by `llmgw init` for: " + names,
        "# Callers name a task class; this file picks the model. Keys stay in the environment",
        "# (or a .env beside this file). Reference: docs/configuration.md",
        "",
        "version: 1",
        "",
        "# Order matters: first listed = outermost layer around each call.",
        "plugins:",
        "  - kill_switch",
        "  - cost",
        "  - breaker",
        "  - ledger",
        "  - retry",
        "  - fallback",
    ]
    if len(vendors) >= 2:
        out += ["  - independence", "  - roles"]
    out += ["  - router"] + [f"  - {v.name}" for v in vendors]
    out += ["", "task_classes:"]
    classes = [
        (
            "quick_answer",
            "Short factual answers; cheapest adequate model.",
            first,
            first.cheap,
            512,
        ),
        ("general_reasoning", "Multi-step reasoning and planning.", first, first.strong, 2048),
        ("long_context", "Long documents.", long_vendor, long_vendor.long, 4096),
        (
            "deep_audit",
            "Careful review; slow and thorough.",
            others[0] if others else first,
            (others[0] if others else first).strong,
            4096,
        ),
        (
            "batch_classification",
            "High-volume labelling with short outputs.",
            first,
            first.cheap,
            64,
        ),
    ]
    for name, desc, vendor, model, max_tokens in classes:
        out += [
            f"  {name}:",
            f"    description: {desc}",
            f"    provider: {vendor.name}",
            f"    model: {model}",
            f"    max_tokens: {max_tokens}",
        ]
    if len(vendors) >= 2:
        out += [
            "  dual_opinion:",
            "    description: Two independent answers from two vendors.",
            "    members:",
            f"      - {_t(vendors[0], vendors[0].strong)}",
            f"      - {_t(vendors[1], vendors[1].strong)}",
            "    max_tokens: 1024",
            "    min_distinct_providers: 2",
        ]
    if len(vendors) >= 3:
        out += [
            "  triple_review:",
            "    description: Three independent reviews; two must answer.",
            "    members:",
            *[f"      - {_t(v, v.strong)}" for v in vendors[:3]],
            "    max_tokens: 1024",
            "    quorum: 2",
            "    min_distinct_providers: 3",
        ]
    out += [
        "",
        "cost:",
        "  warn_usd: 0.05",
        "  block_usd: 1.00",
        "",
        "ledger:",
        "  caps:",
        "    total_monthly_usd: null   # e.g. 20.0, or LLM_GATEWAY_CAP_TOTAL_MONTHLY",
        "",
        "fallback:",
        "  chains:",
    ]
    if others:
        for name, _desc, vendor, _model, _mt in classes:
            cheap = name in {"quick_answer", "batch_classification"}
            alts = [v for v in vendors if v is not vendor][:2]
            chain = ", ".join(_t(v, v.cheap if cheap else v.strong) for v in alts)
            out.append(f"    {name}: [{chain}]")
    else:
        out.append(f"    quick_answer: [{_t(first, first.strong)}]")
        out.append(f"    general_reasoning: [{_t(first, first.cheap)}]")
    if len(vendors) >= 2:
        panels = ["dual_opinion"] + (["triple_review"] if len(vendors) >= 3 else [])
        out += ["", "independence:", "  panels:"]
        out += [f"    {p}: {{mode: blind, enforce: hard}}" for p in panels]
        planner, worker_first = vendors[0], vendors[1]
        verifier = vendors[2] if len(vendors) >= 3 else vendors[0]
        workers = [worker_first] + [v for v in vendors if v is not worker_first]
        out += [
            "",
            "roles:",
            "  candidates:",
            "    planner:",
            f"      - {_t(planner, planner.strong)}",
            "    worker:                 # rotated to another vendor on re-plan",
            *[f"      - {_t(v, v.strong)}" for v in workers],
            "    verifier:",
            f"      - {_t(verifier, verifier.strong)}",
        ]
    return "\n".join(out) + "\n"


def write_starter(path: Path, env: Mapping[str, str], *, include_all: bool = False) -> list[str]:
    """Write the starter file; returns the vendor names used. Never overwrites."""
    if path.exists():
        raise InitError(f"{path} already exists; move it away or pass another --config path")
    vendors = list(VENDORS) if include_all else present_vendors(env)
    if not vendors:
        keys = ", ".join(v.key_env for v in VENDORS)
        raise InitError(
            f"no provider key is set ({keys}); set at least one, or pass --all to write a "
            "config for every provider"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("x", encoding="utf-8") as f:  # "x": fail rather than overwrite
        f.write(render(vendors))
    return [v.name for v in vendors]
