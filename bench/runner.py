"""The benchmark run: start the upstream and the workers, measure in rounds, judge the goals.

Every figure compared with another comes from the same run, measured in interleaved
rounds (the column order rotates each round), reported as the median over rounds with
the spread (min..max): these machines are noisy and only ratios from one run count.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import configs
from .coldstart import cold_start, compile_gateway
from .common import REPO, clean_env, llmgw_command
from .ledger_bench import check_invariant, prepare
from .stats import over_rounds, summary


@dataclass(frozen=True)
class Profile:
    """How much to measure."""

    name: str
    rounds: int
    seq_n: int
    warmup: int
    conc_n: int
    inflight: int
    panel_n: int
    cold_rounds: int
    ledger_s: float
    ledger_rounds: int
    #: Throughput rounds: a burst of 200 calls lasts 0.1-0.7 s, so more rounds than the
    #: latency phase are needed for a steady median.
    conc_rounds: int = 5
    #: Slices of a latency round taken in turn by every column (see latency_phase).
    chunks: int = 8
    #: Calls each column makes unmeasured before each slice after the first.
    rewarm: int = 5
    #: Samples of the machine probe's fdatasync after an idle gap (bench/probe.py).
    probe_idle: int = 10
    variants: bool = True  # one gateway column per policy switched off
    litellm: bool = True
    mcp: bool = True


PROFILES = {
    "full": Profile("full", 5, 400, 100, 200, 50, 40, 15, 2.0, 3, conc_rounds=15),
    "quick": Profile("quick", 2, 160, 40, 200, 50, 8, 2, 1.0, 1, conc_rounds=3, chunks=4),
    "smoke": Profile(
        "smoke",
        1,
        6,
        2,
        20,
        5,
        2,
        1,
        0.3,
        1,
        conc_rounds=1,
        chunks=2,
        rewarm=1,
        probe_idle=2,
        variants=False,
        litellm=False,
    ),
}


class Proc:
    """A child process spoken to in JSON lines."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: IO[Any]) -> None:
        self.name = name
        self.p = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            cwd=REPO,
            text=True,
        )

    def read(self, timeout_s: float = 120) -> dict[str, Any]:
        assert self.p.stdout is not None
        ready, _, _ = select.select([self.p.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"{self.name}: no answer within {timeout_s} s")
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: exited (code {self.p.poll()}); see its log")
        out: dict[str, Any] = json.loads(line)
        return out

    def ask(self, cmd: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self.read(timeout_s)

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                assert self.p.stdin is not None
                self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.p.stdin.close()
                self.p.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait()


@dataclass
class Column:
    """One measured client, in its own worker process."""

    key: str
    label: str
    spec: dict[str, Any]
    proc: Proc | None = None
    stack: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    conc: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    per_call_requests: list[float] = field(default_factory=list)
    agents: dict[str, int] = field(default_factory=dict)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


class Run:
    """One benchmark run in a temporary directory."""

    def __init__(self, profile: Profile, tmp: Path, out: IO[str]) -> None:
        self.profile = profile
        self.tmp = tmp
        self.out = out
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.env = clean_env()
        self.upstream: Proc | None = None
        self.columns: dict[str, Column] = {}
        self.result: dict[str, Any] = {}

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def log(self, name: str) -> IO[Any]:
        return open(self.logs / f"{name}.log", "a", encoding="utf-8")

    # --- set-up ----------------------------------------------------------------------

    def start_upstream(self) -> str:
        self.upstream = Proc(
            "upstream",
            [sys.executable, "-m", "bench.upstream_proc"],
            self.env,
            self.log("upstream"),
        )
        port = self.upstream.read(30)["port"]
        for _, model, seconds in configs.PANEL_MEMBERS:
            self.upstream.ask({"op": "latency", "model": model, "seconds": seconds})
        return f"http://127.0.0.1:{port}"

    def upstream_stats(self) -> dict[str, Any]:
        assert self.upstream is not None
        return self.upstream.ask({"op": "stats"})

    def config(self, name: str, **kwargs: Any) -> str:
        cfg = configs.gateway_config(self.root, self.tmp / f"ledger-{name}.db", **kwargs)
        return str(configs.write_config(self.tmp / f"routing-{name}.yaml", cfg))

    def plan_columns(self) -> None:
        p = self.profile
        base = f"{self.root}/v1"
        cols: list[Column] = [
            Column("direct", "direct httpx2 POST", {"kind": "direct", "base_url": base})
        ]
        if p.litellm and _importable("openai"):
            cols.append(
                Column("openai_sdk", "openai SDK", {"kind": "openai_sdk", "base_url": base})
            )
        if p.litellm and _importable("litellm"):
            cols.append(
                Column("litellm", "litellm.acompletion", {"kind": "litellm", "base_url": base})
            )
            cols.append(
                Column(
                    "litellm_router",
                    "LiteLLM Router.acompletion",
                    {"kind": "litellm_router", "base_url": base},
                )
            )
        cols.append(
            Column(
                "gw_full",
                "gateway, full stack + ledger",
                {"kind": "gateway", "config": self.config("full")},
            )
        )
        if p.variants:
            for name in configs.POLICIES:
                spec: dict[str, Any] = {
                    "kind": "gateway",
                    "config": self.config(f"no-{name}", without=name),
                }
                if name == "kill_switch":
                    spec["unregister"] = name
                cols.append(Column(f"gw_no_{name}", f"gateway without {name}", spec))
            cols.append(
                Column(
                    "gw_minimal",
                    "gateway, router + openai only",
                    {"kind": "gateway", "config": self.config("minimal", minimal=True)},
                )
            )
        if p.mcp:
            serve = [*llmgw_command(), "serve", "--config", self.config("mcp")]
            cols.append(
                Column(
                    "mcp_gw",
                    "MCP stdio: llmgw serve, llm_route",
                    {
                        "kind": "mcp",
                        "command": serve,
                        "tool": "llm_route",
                        "arguments": {"task_class": configs.TASK_CLASS, "prompt": configs.PROMPT},
                    },
                )
            )
            cols.append(
                Column(
                    "mcp_gw_sdk",
                    "MCP stdio: llmgw serve, SDK transport",
                    {
                        "kind": "mcp",
                        "command": [
                            sys.executable,
                            str(REPO / "bench" / "serve_sdk_stdio.py"),
                            *serve[1:],
                        ],
                        "tool": "llm_route",
                        "arguments": {"task_class": configs.TASK_CLASS, "prompt": configs.PROMPT},
                    },
                )
            )
            cols.append(
                Column(
                    "mcp_bare",
                    "MCP stdio: bare MCPServer tool",
                    {
                        "kind": "mcp",
                        "command": [sys.executable, str(REPO / "bench" / "bare_server.py")],
                        "tool": "ask",
                        "arguments": {"prompt": configs.PROMPT},
                    },
                )
            )
        slowest = max(configs.PANEL_MEMBERS, key=lambda m: m[2])
        cols.append(
            Column(
                "panel",
                "3-member panel",
                {
                    "kind": "panel",
                    "config": self.config("panel", panel=True),
                    "task_class": configs.PANEL_CLASS,
                    "slowest_class": configs.PANEL_SLOWEST_CLASS,
                    "base_url": base,
                    "slowest_model": slowest[1],
                },
            )
        )
        self.columns = {c.key: c for c in cols}

    def start_workers(self) -> None:
        env = clean_env(OPENAI_BASE_URL=f"{self.root}/v1")
        for col in self.columns.values():
            col.proc = Proc(
                col.key,
                [sys.executable, "-m", "bench.worker", json.dumps(col.spec)],
                env,
                self.log(col.key),
            )
        for col in self.columns.values():
            assert col.proc is not None
            ready = col.proc.read(180)
            col.stack = ready["stack"]
        self.upstream_stats()  # forget the set-up requests

    def stop_workers(self) -> None:
        for col in self.columns.values():
            if col.proc is not None:
                col.proc.stop()
                col.proc = None

    # --- phases ----------------------------------------------------------------------

    def _note(self, col: Column, reply: dict[str, Any], calls: int) -> None:
        col.errors += int(reply.get("errors", 0))
        if reply.get("error") and col.first_error is None:
            col.first_error = reply["error"][0]
        stats = self.upstream_stats()
        if calls:
            col.per_call_requests.append(stats["requests"] / calls)
        for agent, n in stats["by_agent"].items():
            col.agents[agent] = col.agents.get(agent, 0) + n

    def latency_phase(self) -> None:
        """Each round measures every column ``seq_n`` times, in ``chunks`` slices taken in
        turn (the order rotated each round, reversed every other slice), so columns
        compared with each other are measured over the same stretch of the round: the
        machine's slow spells (seconds long here) land on all of them alike."""
        p = self.profile
        keys = [k for k in self.columns if k != "panel"]
        per_chunk = max(1, p.seq_n // p.chunks)
        for r in range(p.rounds):
            order = keys[r % len(keys) :] + keys[: r % len(keys)]
            self.say(f"  latency round {r + 1}/{p.rounds}")
            lat: dict[str, list[float]] = {k: [] for k in keys}
            cpu: dict[str, list[float]] = {k: [] for k in keys}
            for c in range(p.chunks):
                for key in order if c % 2 == 0 else order[::-1]:
                    col = self.columns[key]
                    assert col.proc is not None
                    # The first slice warms up; later ones re-warm after the others' turns.
                    warm = p.warmup * (2 if r == 0 else 1) if c == 0 else p.rewarm
                    reply = col.proc.ask({"op": "seq", "n": per_chunk, "warmup": warm}, 300)
                    self._note(col, reply, per_chunk + warm)
                    lat[key] += reply["lat_ms"]
                    cpu[key].append(reply["cpu_ms_per_call"])
            for key in keys:
                self.columns[key].rounds.append(
                    {**summary(lat[key]), "cpu_ms": sum(cpu[key]) / len(cpu[key])}
                )

    def throughput_phase(self) -> None:
        p = self.profile
        keys = [
            k for k in ("direct", "openai_sdk", "litellm_router", "gw_full") if k in self.columns
        ]
        for r in range(p.conc_rounds):
            self.say(f"  throughput round {r + 1}/{p.conc_rounds}")
            for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                col = self.columns[key]
                assert col.proc is not None
                reply = col.proc.ask({"op": "conc", "n": p.conc_n, "inflight": p.inflight}, 300)
                self._note(col, reply, 0)
                col.conc.append(reply["calls_per_s"])

    def panel_phase(self) -> dict[str, Any]:
        p = self.profile
        col = self.columns["panel"]
        assert col.proc is not None
        ratios, walls, slowest = [], [], []
        alone, alone_direct, alone_ratios, over_alone = [], [], [], []
        for r in range(p.rounds):
            self.say(f"  panel round {r + 1}/{p.rounds}")
            reply = col.proc.ask({"op": "panel", "n": p.panel_n}, 300)
            self._note(col, reply, 0)
            w, s = summary(reply["wall_ms"])["p50"], summary(reply["slowest_ms"])["p50"]
            a = summary(reply["alone_ms"])["p50"]
            ad = summary(reply["alone_direct_ms"])["p50"]
            walls.append(w)
            slowest.append(s)
            ratios.append(w / s)
            alone.append(a)
            alone_direct.append(ad)
            alone_ratios.append(a / ad)
            over_alone.append(w / a)
        return {
            "members": [
                {"provider": pr, "model": m, "upstream_latency_ms": sec * 1000}
                for pr, m, sec in configs.PANEL_MEMBERS
            ],
            "wall_p50_ms": over_rounds(walls),
            "slowest_direct_p50_ms": over_rounds(slowest),
            "ratio": over_rounds(ratios),
            # No goal: the slowest member alone through the same gateway (its own pairs
            # with a direct call, after the panel's), and the panel over it.
            "slowest_alone_p50_ms": over_rounds(alone),
            "slowest_alone_direct_p50_ms": over_rounds(alone_direct),
            "slowest_alone_ratio": over_rounds(alone_ratios),
            "ratio_over_alone": over_rounds(over_alone),
            "errors": col.errors,
            "first_error": col.first_error,
        }

    def cold_phase(self) -> dict[str, Any]:
        p = self.profile
        env = clean_env(OPENAI_BASE_URL=f"{self.root}/v1")
        serve = [*llmgw_command(), "serve", "--config", self.config("cold")]
        bare = [sys.executable, str(REPO / "bench" / "bare_server.py")]
        # No goal: the bare server started as llmgw serve starts (collector paused, then
        # frozen), so the gateway's own code is all that differs.
        bare_paused = [*bare, "--collector-paused"]
        procs = [("llmgw", serve), ("bare", bare), ("bare_paused", bare_paused)]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in procs}
        compile_gateway(env)
        with self.log("coldstart") as errlog:
            # One unmeasured start each first: the page cache, not the code, would win.
            for _, cmd in procs:
                cold_start(cmd, env, cwd=str(self.tmp), stderr=errlog)
            for r in range(p.cold_rounds):
                self.say(f"  cold start round {r + 1}/{p.cold_rounds}")
                # Each process takes each place in a round in turn (rotated, and the
                # rotation reversed every third round): none always starts first or next
                # to the same one.
                k = r % len(procs)
                order = procs[k:] + procs[:k]
                for name, cmd in order if (r // len(procs)) % 2 == 0 else order[::-1]:
                    runs[name].append(cold_start(cmd, env, cwd=str(self.tmp), stderr=errlog))
        out: dict[str, Any] = {}
        for name, rs in runs.items():
            out[name] = {
                "seconds": over_rounds([x["seconds"] for x in rs]),
                "rss_mb": over_rounds([x["rss_mb"] for x in rs]),
                "hwm_mb": over_rounds([x["hwm_mb"] for x in rs]),
                "tools": rs[0]["tools"],
            }
        out["time_ratio"] = out["llmgw"]["seconds"]["median"] / out["bare"]["seconds"]["median"]
        out["time_ratio_same_collector"] = (
            out["llmgw"]["seconds"]["median"] / out["bare_paused"]["seconds"]["median"]
        )
        out["rss_ratio"] = out["llmgw"]["rss_mb"]["median"] / out["bare"]["rss_mb"]["median"]
        return out

    def ledger_phase(self) -> dict[str, Any]:
        p = self.profile
        big_total, big_provider = 10**12, 10**12 // 2  # caps set, far above the run's spend
        out: dict[str, Any] = {}
        for procs in (1, 4):
            rates: list[float] = []
            p50s: list[float] = []
            p99s: list[float] = []
            checks: list[dict[str, Any]] = []
            for r in range(p.ledger_rounds):
                self.say(f"  ledger {procs} process(es), round {r + 1}/{p.ledger_rounds}")
                path = self.tmp / f"ledger-bench-{procs}-{r}.db"
                prepare(str(path))
                replies = self._ledger_procs(path, procs, p.ledger_s, big_total, big_provider)
                cycles = sum(x["cycles"] for x in replies)
                rates.append(cycles / p.ledger_s)
                p50s.append(max(x["p50_ms"] or 0 for x in replies))
                p99s.append(max(x["p99_ms"] or 0 for x in replies))
                check = check_invariant(str(path))
                if check["entries"] != cycles:
                    check["ok"] = False
                    check["problems"].append(f"{check['entries']} entries, {cycles} cycles")
                checks.append(check)
            out[f"procs_{procs}"] = {
                "reservations_per_s": over_rounds(rates),
                "cycle_p50_ms": over_rounds(p50s),
                "cycle_p99_ms": over_rounds(p99s),
                "invariant_ok": all(c["ok"] for c in checks),
                "problems": [x for c in checks for x in c["problems"]],
            }
        out["cap_race"] = self._cap_race()
        return out

    def _ledger_procs(
        self, path: Path, procs: int, seconds: float, total: int, provider: int, settle: bool = True
    ) -> list[dict[str, Any]]:
        start = time.time() + 0.5  # every process open and waiting before the clock starts
        argv = [
            sys.executable, "-m", "bench.ledger_bench", "run", str(path),
            str(start), str(start + seconds), str(total), str(provider),
        ] + ([] if settle else ["nosettle"])  # fmt: skip
        with self.log("ledger") as errlog:
            ps = [
                subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=errlog, env=self.env, cwd=REPO, text=True
                )
                for _ in range(procs)
            ]
            outs = [pr.communicate(timeout=seconds + 60)[0] for pr in ps]
        return [json.loads(o.strip().splitlines()[-1]) for o in outs]

    def _cap_race(self) -> dict[str, Any]:
        """4 processes reserve (never settle) against room for exactly 10 reservations."""
        from .ledger_bench import AMOUNT_MICRO

        path = self.tmp / "ledger-cap-race.db"
        prepare(str(path))
        room = 10
        replies = self._ledger_procs(
            path, 4, 5.0, room * AMOUNT_MICRO, room * AMOUNT_MICRO, settle=False
        )
        accepted = sum(x["cycles"] for x in replies)
        check = check_invariant(str(path))
        ok = (
            accepted == room
            and check["overshoot_micro"] == 0
            and not [x for x in check["problems"] if "totals" in x or "integrity" in x]
        )
        return {
            "room": room,
            "accepted": accepted,
            "overshoot_micro": check["overshoot_micro"],
            "ok": ok,
        }

    # --- the whole run -----------------------------------------------------------------

    def machine_probe(self) -> dict[str, Any]:
        from .probe import probe

        n = self.profile.probe_idle
        return probe(self.tmp, back_to_back=10 * n, idle=n)

    def execute(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.say("machine probe ...")
        probes = {"start": self.machine_probe()}
        self.root = self.start_upstream()
        try:
            self.plan_columns()
            self.say(f"starting {len(self.columns)} workers ...")
            self.start_workers()
            self.latency_phase()
            self.throughput_phase()
            panel = self.panel_phase()
            self.stop_workers()
            cold = self.cold_phase() if self.profile.mcp else None
            ledger = self.ledger_phase()
        finally:
            self.stop_workers()
            if self.upstream is not None:
                self.upstream.stop()
        probes["end"] = self.machine_probe()
        from .report import assemble

        return assemble(self, panel, cold, ledger, time.perf_counter() - t0, probes)


def run_bench(profile_name: str, out: IO[str], keep: Path | None = None) -> dict[str, Any]:
    """Run one profile and return the result document (see bench/README.md)."""
    profile = PROFILES[profile_name]
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        return Run(profile, keep, out).execute()
    with tempfile.TemporaryDirectory(prefix="llmgw-bench-") as tmp:
        return Run(profile, Path(tmp), out).execute()
