"""The result document, the goals (PASS/MISS with the measured ratio) and the tables."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import TYPE_CHECKING, Any

from .probe import render as render_probe
from .stats import over_rounds

if TYPE_CHECKING:
    from .runner import Run

NAN = float("nan")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            d: _version(d)
            for d in (
                "llm-gateway-mcp",
                "mcp",
                "httpx2",
                "pydantic",
                "structlog",
                "pluggy",
                "litellm",
                "openai",
                "aiohttp",
                "httpx",
            )
        },
    }


def _added(run: Run, key: str, base: str) -> dict[str, Any]:
    """Per round: column percentile minus the baseline's, then median over rounds."""
    col, ref = run.columns[key], run.columns[base]
    out: dict[str, Any] = {}
    for q in ("p50", "p90", "p99"):
        out[q] = over_rounds([a[q] - b[q] for a, b in zip(col.rounds, ref.rounds, strict=True)])
    return out


def assemble(
    run: Run,
    panel: dict[str, Any],
    cold: dict[str, Any] | None,
    ledger: dict[str, Any],
    seconds: float,
    probes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    p = run.profile
    columns: dict[str, Any] = {}
    for key, col in run.columns.items():
        if key == "panel":
            continue
        base = "mcp_bare" if key.startswith("mcp_") else "direct"
        entry: dict[str, Any] = {
            "label": col.label,
            "stack": col.stack,
            "latency_ms": {
                q: over_rounds([r[q] for r in col.rounds]) for q in ("p50", "p90", "p99")
            },
            "cpu_ms_per_call": over_rounds([r["cpu_ms"] for r in col.rounds]),
            "errors": col.errors,
            "first_error": col.first_error,
            "upstream_requests_per_call": over_rounds(col.per_call_requests)["median"],
            "user_agents": col.agents,
        }
        if key not in {"direct", "mcp_bare"}:
            entry["baseline"] = base
            entry["added_ms"] = _added(run, key, base)
        if col.conc:
            entry["calls_per_s"] = over_rounds(col.conc)
        columns[key] = entry
    plugin_cost: dict[str, Any] = {}
    if "gw_full" in run.columns:
        full = run.columns["gw_full"]
        for key in run.columns:
            if key.startswith("gw_no_"):
                other = run.columns[key]
                plugin_cost[key.removeprefix("gw_no_")] = over_rounds(
                    [a["p50"] - b["p50"] for a, b in zip(full.rounds, other.rounds, strict=True)]
                )
    doc: dict[str, Any] = {
        "profile": p.name,
        "settings": {
            "rounds": p.rounds,
            "sequential_calls_per_round": p.seq_n,
            "slices_per_round": p.chunks,
            "warmup_calls": p.warmup,
            "throughput_calls": p.conc_n,
            "in_flight": p.inflight,
            "throughput_rounds": p.conc_rounds,
            "panel_calls_per_round": p.panel_n,
            "cold_start_rounds": p.cold_rounds,
            "ledger_seconds": p.ledger_s,
            "ledger_rounds": p.ledger_rounds,
        },
        "machine": machine(),
        "machine_probe": probes,
        "wall_s": round(seconds, 1),
        "columns": columns,
        "plugin_cost_p50_ms": plugin_cost,
        "panel": panel,
        "cold_start": cold,
        "ledger": ledger,
    }
    doc["goals"] = goals(doc)
    return doc


def _goal(
    name: str, measured: float, limit: float, unit: str, higher: bool = False
) -> dict[str, Any]:
    ok = measured == measured and (measured >= limit if higher else measured <= limit)
    return {
        "goal": name,
        "measured": round(measured, 3) if measured == measured else None,
        "limit": limit,
        "unit": unit,
        "higher": higher,
        "pass": ok,
    }


def goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    cols = doc["columns"]
    out: list[dict[str, Any]] = []

    def med(key: str, *path: str) -> float:
        node: Any = cols.get(key)
        for part in path:
            if node is None:
                return NAN
            node = node.get(part)
        return float(node["median"]) if node else NAN

    ours = med("gw_full", "added_ms", "p50")
    out.append(_goal("in-process added p50, full stack + ledger", ours, 1.0, "ms"))
    if "litellm_router" in cols:
        router = med("litellm_router", "added_ms", "p50")
        out.append(_goal("added p50 ours / LiteLLM Router", ours / router, 0.25, "x"))
    if "mcp_gw" in cols:
        out.append(
            _goal("MCP stdio added p50 over bare MCP tool", med("mcp_gw", "added_ms", "p50"),
                  1.0, "ms")
        )  # fmt: skip
    tput = med("gw_full", "calls_per_s")
    if "litellm_router" in cols:
        out.append(
            _goal("throughput ours / LiteLLM Router (50 in flight)",
                  tput / med("litellm_router", "calls_per_s"), 3.0, "x", higher=True)
        )  # fmt: skip
    out.append(
        _goal("throughput ours / direct (50 in flight)", tput / med("direct", "calls_per_s"),
              0.6, "x", higher=True)
    )  # fmt: skip
    out.append(_goal("panel wall / slowest member", doc["panel"]["ratio"]["median"], 1.05, "x"))
    cold = doc["cold_start"]
    if cold:
        out.append(_goal("cold start llmgw serve / bare MCPServer", cold["time_ratio"], 1.2, "x"))
        out.append(_goal("RSS llmgw serve / bare MCPServer", cold["rss_ratio"], 1.3, "x"))
    led = doc["ledger"]
    out.append(
        _goal("ledger reservations/s, 4 processes", led["procs_4"]["reservations_per_s"]["median"],
              500, "/s", higher=True)
    )  # fmt: skip
    inv = (
        led["procs_1"]["invariant_ok"] and led["procs_4"]["invariant_ok"] and led["cap_race"]["ok"]
    )
    out.append(_goal("ledger cap invariant (and cap race overshoot 0)", 1.0 if inv else 0.0, 1.0,
                     "ok", higher=True))  # fmt: skip
    return out


# --- rendering ---------------------------------------------------------------------------


def _f(x: Any, nd: int = 2) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.{nd}f}"


def _spread(node: dict[str, Any], nd: int = 2) -> str:
    return f"{_f(node['median'], nd)} [{_f(node['min'], nd)}..{_f(node['max'], nd)}]"


def render(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    s = doc["settings"]
    v = m["versions"]
    lines = [
        f"llm-gateway-mcp benchmark, profile {doc['profile']}: {m['cores']} cores, "
        f"Python {m['python']}, {m['cpu']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"{s['rounds']} rounds x {s['sequential_calls_per_round']} sequential calls "
        f"in {s.get('slices_per_round', 1)} slices (+{s['warmup_calls']} warm-up); "
        f"medians over rounds [min..max]; wall {doc['wall_s']} s",
    ]
    probes = doc.get("machine_probe")
    if probes:
        lines.append(render_probe(probes["start"], probes.get("end")))
    lines += [
        "",
        "Sequential latency (ms), fake upstream answering at once",
        f"{'column':<36} {'p50':>7} {'p90':>7} {'p99':>7}  {'added p50 [spread]':<24} "
        f"{'add p90':>8} {'add p99':>8} {'cpu/call':>8} {'req/call':>8} {'err':>4}  stack",
    ]
    for col in doc["columns"].values():
        lat = col["latency_ms"]
        added = col.get("added_ms")
        lines.append(
            f"{col['label']:<36} {_f(lat['p50']['median']):>7} {_f(lat['p90']['median']):>7} "
            f"{_f(lat['p99']['median']):>7}  "
            f"{(_spread(added['p50']) if added else '(baseline)'):<24} "
            f"{_f(added['p90']['median']) if added else '':>8} "
            f"{_f(added['p99']['median']) if added else '':>8} "
            f"{_f(col['cpu_ms_per_call']['median']):>8} "
            f"{_f(col['upstream_requests_per_call'], 2):>8} {col['errors']:>4}  {col['stack']}"
        )
    lines.append("  (added: over direct httpx2; MCP columns: over the bare MCP tool)")
    if doc["plugin_cost_p50_ms"]:
        lines += ["", "Cost of each plugin: full stack p50 minus the stack without it (ms)"]
        for name, node in doc["plugin_cost_p50_ms"].items():
            lines.append(f"  {name:<14} {_spread(node, 3)}")
    tput = [(c["label"], c["calls_per_s"]) for c in doc["columns"].values() if "calls_per_s" in c]
    if tput:
        lines += [
            "",
            f"Throughput, {s['throughput_calls']} calls with {s['in_flight']} in flight, "
            f"{s.get('throughput_rounds', s['rounds'])} rounds",
        ]
        for label, node in tput:
            lines.append(f"  {label:<36} {_spread(node, 0)} calls/s")
    pn = doc["panel"]
    members = ", ".join(
        f"{x['provider']}/{x['model']} {x['upstream_latency_ms']:.0f} ms" for x in pn["members"]
    )
    lines += [
        "",
        f"Panel ({members}): wall p50 {_spread(pn['wall_p50_ms'])} ms, slowest member direct "
        f"p50 {_spread(pn['slowest_direct_p50_ms'])} ms, ratio {_spread(pn['ratio'], 3)}",
    ]
    if "ratio_over_alone" in pn:
        lines.append(
            f"  (no goal) the slowest member alone through the gateway: p50 "
            f"{_spread(pn['slowest_alone_p50_ms'])} ms, {_spread(pn['slowest_alone_ratio'], 3)} x "
            f"its direct call; the panel over it {_spread(pn['ratio_over_alone'], 3)} x"
        )
    cold = doc["cold_start"]
    if cold:
        lines += ["", "Cold start to the first tools/list answer, RSS after it"]
        for name in ("llmgw", "bare", "bare_paused"):
            if name not in cold:
                continue
            c = cold[name]
            lines.append(
                f"  {name:<12} {_spread(c['seconds'], 3)} s   VmRSS {_spread(c['rss_mb'], 1)} MB"
                f"   VmHWM {_f(c['hwm_mb']['median'], 1)} MB"
            )
        if "time_ratio_same_collector" in cold:
            lines.append(
                f"  (no goal) llmgw / bare_paused, the bare server with the collector paused "
                f"as llmgw serve pauses it: {_f(cold['time_ratio_same_collector'], 3)} x"
            )
    led = doc["ledger"]
    lines += ["", "Ledger (SQLite WAL, synchronous=FULL, caps set): reserve + settle cycles"]
    for key in ("procs_1", "procs_4"):
        x = led[key]
        lines.append(
            f"  {key.removeprefix('procs_')} process(es): {_spread(x['reservations_per_s'], 0)}/s, "
            f"cycle p50 {_f(x['cycle_p50_ms']['median'])} ms, p99 "
            f"{_f(x['cycle_p99_ms']['median'])} ms (slowest process), invariant "
            f"{'ok' if x['invariant_ok'] else 'BROKEN'}"
        )
    cr = led["cap_race"]
    lines.append(
        f"  cap race, 4 processes, room for {cr['room']}: accepted {cr['accepted']}, "
        f"overshoot ${cr['overshoot_micro'] / 1e6:.6f}"
    )
    lines += ["", "Goals"]
    for g in doc["goals"]:
        sign = ">=" if g["higher"] else "<="
        lines.append(
            f"  {'PASS' if g['pass'] else 'MISS'}  {g['goal']:<52} {_f(g['measured'], 3):>9} "
            f"{g['unit']:<3} (limit {sign} {g['limit']})"
        )
    errors = {k: c["first_error"] for k, c in doc["columns"].items() if c["errors"]}
    if errors:
        lines += ["", "ERRORS (these columns' figures are not valid):"]
        lines += [f"  {k}: {e}" for k, e in errors.items()]
    return "\n".join(lines)


def write_stdout(text: str) -> None:
    sys.stdout.write(text + "\n")
