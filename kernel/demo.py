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

import yaml

from .build import build_gateway
from .config import load_settings
from .envelope import Envelope
from .fake_upstream import FakeUpstream
from .gateway import Gateway
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


def _redirected(config: Path, up: FakeUpstream) -> str:
    """The user's routing.yaml with every built-in provider pointed at the fake upstream."""
    data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    providers = data.setdefault("providers", {}) or {}
    data["providers"] = providers
    enabled = set(data.get("plugins") or [])
    for name in _PROVIDERS:
        if name not in enabled:
            continue
        spec = providers.get(name) or {}
        spec["base_url"] = up.base_url(name)
        providers[name] = spec
    return yaml.safe_dump(data, sort_keys=False)


def _check_offline(gateway: Gateway) -> str | None:
    """The demo never talks to a real provider: every base URL must be loopback."""
    for name, provider in gateway.providers.items():
        base = provider.status().base_url or ""
        host = base.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        if base and host not in {"127.0.0.1", "localhost", "[::1]"}:
            return f"provider {name!r} points at {base}; the demo only runs against loopback"
    return None


def format_certificate(env: Envelope) -> str:
    vis = env.meta.get("visibility")
    if not isinstance(vis, dict):
        return ""
    lines = [
        f"independence: certified={vis.get('certified')} mode={vis.get('mode')} "
        f"enforce={vis.get('enforce')} original_sha256={str(vis.get('original_sha256'))[:16]}…"
    ]
    for m in vis.get("members") or []:
        lines.append(
            f"  {m.get('provider')}/{m.get('model')}: request_sha256="
            f"{str(m.get('request_sha256'))[:16]}… access={m.get('access')}"
        )
    for reason in vis.get("reasons") or []:
        lines.append(f"  not certified: {reason}")
    return "\n".join(lines) + "\n"


def format_steps(env: Envelope) -> str:
    lines = []
    for step in env.meta.get("steps") or []:
        verdict = step.get("verdict") or {}
        extra = f" verdict={verdict.get('verdict')}" if verdict else ""
        lines.append(
            f"  round {step.get('round')} {step.get('step'):<6} {step.get('role'):<8} "
            f"{step.get('provider')}/{step.get('model')} access={step.get('access')}{extra}"
        )
    return ("steps:\n" + "\n".join(lines) + "\n") if lines else ""


async def run_demo(
    out: TextIO, plugins: Sequence[str] | None = None, config: Path | None = None
) -> int:
    """Run the demo, writing to ``out``; 0 when every step behaved as shown.

    With ``config`` (a routing.yaml), the demo runs that file, its plugins and task
    classes, with every built-in provider redirected to the fake upstream. Without it,
    a built-in configuration of the shipped task classes and ``plugins`` is used.
    """
    ok = True
    with tempfile.TemporaryDirectory(prefix="llmgw-demo-") as tmp, FakeUpstream() as up:
        env_vars = demo_env()
        env_vars["LLM_GATEWAY_LEDGER_PATH"] = str(Path(tmp) / "ledger.db")
        if config is not None:
            settings = load_settings(config, text=_redirected(config, up), env=env_vars)
            source = str(config)
        else:
            names = tuple(plugins or DEMO_PLUGINS)
            text = demo_yaml(up, names, Path(tmp) / "ledger.db")
            settings = load_settings(text=text, env=env_vars)
            source = "built-in demo configuration"
        # Not testing.gateway_from_yaml: that module needs pytest, which users may lack.
        gateway = build_gateway(settings)
        try:
            problem = _check_offline(gateway)
            if problem:
                out.write(f"llmgw demo: {problem}\n")
                return 1
            classes = settings.task_classes
            loaded = ", ".join(p.name for p in gateway.plugins)
            out.write(f"config: {source}\nfake upstream at {up.root}; plugins: {loaded}\n\n")
            single = (
                "quick_answer"
                if "quick_answer" in classes
                else next(n for n, c in classes.items() if not c.members)
            )
            env = await gateway.route(Request(single, "What is the capital of France?"))
            out.write(format_envelope(f"single route: {single}", env) + "\n")
            ok = ok and env.ok

            panels = [n for n, c in classes.items() if c.members]
            panel = "triple_review" if "triple_review" in panels else next(iter(panels), "")
            if panel:
                env = await gateway.route(Request(panel, "Review: def add(a, b): return a - b"))
                out.write(format_envelope(f"blind panel: {panel}", env))
                out.write(format_certificate(env) + "\n")
                ok = ok and env.ok

            tool = next((t for t in gateway.tools if t.name == "llm_orchestrate"), None)
            if tool is not None:
                result = await tool.fn(task="Write a haiku about routers", depth="complex")
                out.write(format_envelope("orchestrate (complex)", result))
                out.write(format_steps(result) + "\n")
                ok = ok and result.status != "error"

            spec = classes[single]
            primary = spec.model or ""
            up.fail_model(primary, "overloaded")
            env = await gateway.route(Request(single, "Is 17 prime?"))
            up.fail_model(primary, None)
            title = f"fault: {spec.provider}/{primary} answers 503"
            if any(p.name == "fallback" for p in gateway.plugins):
                title += ", then falls back"
                ok = ok and env.ok and bool(env.meta.get("fallback_from"))
            out.write(format_envelope(title, env))
        finally:
            await gateway.aclose()
    return 0 if ok else 1
