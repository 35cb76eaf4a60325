"""``llmgw demo``: the whole gateway against the fake upstream, no keys, no network.

It starts :class:`~llmgw.kernel.fake_upstream.FakeUpstream`, builds a gateway from a
routing.yaml string (the shipped task classes, every provider's ``base_url`` at the fake,
dummy ``demo-key-…`` keys), then shows a single route, a blind panel, an orchestration
when the ``roles`` plugin provides ``llm_orchestrate``, and a fault: the primary answers
503 and the route falls back.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from .build import build_gateway
from .config import load_settings
from .envelope import Envelope
from .fake_upstream import FakeUpstream
from .types import Request

#: The plugins the demo enables, in order (adjust to what is installed).
DEMO_PLUGINS: tuple[str, ...] = (
    "kill_switch",
    "cost",
    "breaker",
    "ledger",
    "retry",
    "fallback",
    "independence",
    "roles",
    "router",
    "openai",
    "anthropic",
    "gemini",
    "deepseek",
)

_PROVIDERS = ("openai", "anthropic", "gemini", "deepseek")

_TASK_CLASSES = """
task_classes:
  quick_answer:
    description: Short factual answers and small rewrites; cheapest adequate model.
    provider: openai
    model: gpt-4o-mini
    max_tokens: 512
  general_reasoning:
    description: Multi-step reasoning, planning and explanations.
    provider: anthropic
    model: claude-sonnet-4-6
    max_tokens: 2048
  long_context:
    description: Long documents.
    provider: gemini
    model: gemini-2.5-pro
    max_tokens: 4096
  deep_audit:
    description: Careful review of code or arguments.
    provider: deepseek
    model: deepseek-reasoner
    max_tokens: 4096
  dual_opinion:
    description: Two independent answers from two vendors.
    members:
      - {provider: anthropic, model: claude-sonnet-4-6}
      - {provider: openai, model: gpt-4o}
    max_tokens: 1024
    quorum: 2
    min_distinct_providers: 2
  triple_review:
    description: Three independent reviews; succeeds when at least two answer.
    members:
      - {provider: anthropic, model: claude-sonnet-4-6}
      - {provider: openai, model: gpt-4o}
      - {provider: gemini, model: gemini-2.5-pro}
    max_tokens: 1024
    quorum: 2
    min_distinct_providers: 3
"""

# Policy sections, as in the shipped routing.yaml (shorter retry delays for a demo).
_SECTIONS: dict[str, str] = {
    "kill_switch": "kill_switch:\n  expensive_threshold_usd: 1.00\n",
    "cost": "cost:\n  warn_usd: 0.05\n  block_usd: 1.00\n",
    "breaker": (
        "breaker:\n  consecutive_failures: 5\n  failure_rate: 0.5\n  window_s: 60\n"
        "  min_calls: 10\n  open_s: 30\n  max_open_s: 300\n"
    ),
    "ledger": "ledger:\n  path: {ledger}\n  caps:\n    total_monthly_usd: 5.0\n",
    "retry": "retry:\n  max_attempts: 2\n  base_delay_s: 0.01\n  max_delay_s: 0.05\n",
    "fallback": (
        "fallback:\n  chains:\n"
        "    quick_answer:\n      - {provider: gemini, model: gemini-2.5-flash}\n"
        "      - {provider: deepseek, model: deepseek-chat}\n"
        "    general_reasoning:\n      - {provider: openai, model: gpt-4o}\n"
        "    triple_review:\n      - {provider: deepseek, model: deepseek-chat}\n"
    ),
    "independence": (
        "independence:\n  panels:\n    dual_opinion: {mode: blind, enforce: hard}\n"
        "    triple_review: {mode: blind, enforce: hard}\n"
    ),
    "roles": """roles:
  candidates:
    planner:
      - {provider: anthropic, model: claude-sonnet-4-6}
    worker:
      - {provider: openai, model: gpt-4o}
      - {provider: gemini, model: gemini-2.5-pro}
    verifier:
      - {provider: gemini, model: gemini-2.5-pro}
      - {provider: anthropic, model: claude-sonnet-4-6}
  max_tokens: {planner: 1024, worker: 2048, verifier: 512}
  instructions:
    planner: Write a short numbered plan for the task below.
    worker: Carry out the task following the plan. Return only the result.
    verifier: 'Answer with JSON only: {"verdict": "ACCEPT" or "REVISE", "reasons": []}'
  depth:
    trivial: [work]
    standard: [work, verify]
    complex: [plan, work, verify]
  default_depth: standard
  max_replans: 1
""",
}


def demo_yaml(up: FakeUpstream, plugins: Sequence[str], ledger_path: Path) -> str:
    """The demo's routing.yaml: the given plugins, providers at the fake upstream."""
    lines = ["version: 1", "plugins:", *(f"  - {p}" for p in plugins), "providers:"]
    for name in _PROVIDERS:
        if name in plugins:
            lines.append(f"  {name}: {{base_url: '{up.base_url(name)}', timeout_s: 10}}")
    text = "\n".join(lines) + "\n" + _TASK_CLASSES
    for name in plugins:
        section = _SECTIONS.get(name)
        if section:
            text += section.replace("{ledger}", json.dumps(str(ledger_path)))
    return text


def demo_env() -> dict[str, str]:
    """Dummy keys: the fake upstream accepts anything, real providers would refuse them."""
    return {f"{name.upper()}_API_KEY": f"demo-key-{name}-0000000000000000" for name in _PROVIDERS}


def format_envelope(title: str, env: Envelope) -> str:
    """An envelope as a few readable lines."""
    meta: dict[str, Any] = dict(env.meta)
    where = f"{meta.get('provider')}/{meta.get('model')}" if meta.get("provider") else "panel"
    tokens = meta.get("tokens") or {}
    cost = meta.get("cost_usd_approx")
    lines = [f"== {title} ==", f"status: {env.status}   {where}   {meta.get('latency_ms')} ms"]
    if env.text is not None:
        lines.append("text: " + env.text.replace("\n", "\n      "))
    if env.error:
        lines.append(f"error: {env.error} [{meta.get('error_class')}]")
    lines.append(
        f"tokens: in {tokens.get('input', 0)} / out {tokens.get('output', 0)}"
        f" / total {tokens.get('total', 0)}   cost: "
        + ("unknown" if cost is None else f"${cost:.6f}")
    )
    attempts = meta.get("attempts") or []
    if attempts:
        shown = ", ".join(
            f"{a['provider']}/{a['model']}#{a['attempt']} "
            + ("ok" if a["ok"] else str(a.get("error_class")))
            for a in attempts
        )
        lines.append(f"attempts: {shown}")
    if meta.get("fallback_from"):
        lines.append(f"fell back from: {meta['fallback_from']}")
    for i, member in enumerate(env.data.get("members") or []):
        m = member["meta"]
        lines.append(
            f"  member {i + 1}: {member['status']} {m.get('provider')}/{m.get('model')}"
            f" -> {member['data'].get('text')!r}"
        )
    return "\n".join(lines) + "\n"


async def run_demo(out: TextIO, plugins: Sequence[str] | None = None) -> int:
    """Run the demo, writing to ``out``; 0 when every step behaved as shown."""
    plugins = tuple(plugins or DEMO_PLUGINS)
    ok = True
    with tempfile.TemporaryDirectory(prefix="llmgw-demo-") as tmp, FakeUpstream() as up:
        text = demo_yaml(up, plugins, Path(tmp) / "ledger.db")
        # Not testing.gateway_from_yaml: that module needs pytest, which users may lack.
        gateway = build_gateway(load_settings(text=text, env=demo_env()))
        try:
            out.write(f"fake upstream at {up.root}; plugins: {', '.join(plugins)}\n\n")
            env = await gateway.route(Request("quick_answer", "What is the capital of France?"))
            out.write(format_envelope("single route: quick_answer", env) + "\n")
            ok = ok and env.ok

            panel = "triple_review" if "gemini" in plugins else "dual_opinion"
            env = await gateway.route(Request(panel, "Review: def add(a, b): return a - b"))
            out.write(format_envelope(f"blind panel: {panel}", env) + "\n")
            ok = ok and env.ok

            tool = next((t for t in gateway.tools if t.name == "llm_orchestrate"), None)
            if "roles" in plugins and tool is not None:
                result = await tool.fn(task="Write a haiku about routers", depth="standard")
                if isinstance(result, Envelope):
                    out.write(format_envelope("orchestrate (standard)", result) + "\n")
                    ok = ok and result.status != "error"
                else:
                    out.write(f"== orchestrate ==\n{result}\n\n")

            up.fail_model("gpt-4o-mini", "overloaded")
            env = await gateway.route(Request("quick_answer", "Is 17 prime?"))
            up.fail_model("gpt-4o-mini", None)
            title = "fault: primary answers 503"
            if "fallback" in plugins:
                title += ", then falls back"
                ok = ok and env.ok and bool(env.meta.get("fallback_from"))
            out.write(format_envelope(title, env))
        finally:
            await gateway.aclose()
    return 0 if ok else 1
