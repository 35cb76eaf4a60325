"""One measured column in a process of its own: ``python -m bench.worker '<spec json>'``.

It builds its client, prints ``{"ready": true, "stack": ...}`` and then answers commands
(one JSON line each way):

- ``{"op": "seq", "n": N, "warmup": W}``: W untimed calls, then N sequential timed calls;
  answers the latencies (ms) and the process CPU time per call (ms);
- ``{"op": "conc", "n": N, "inflight": C}``: N calls with C in flight; answers calls/s;
- ``{"op": "panel", "n": N}`` (kind ``panel``): N panel routes and N direct calls to the
  slowest member's model, timed each;
- ``{"op": "quit"}``.

A failed call is counted, its first message kept, and never timed.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .clients import KINDS, Direct, InProcessGateway, _expect

_PROTO: list[Any] = []  # the protocol stream (the original stdout), set by main()


def reply(obj: Any) -> None:
    _PROTO[0].write(json.dumps(obj) + "\n")
    _PROTO[0].flush()


async def _seq(client: Any, n: int, warmup: int) -> dict[str, Any]:
    errors: list[str] = []
    for _ in range(warmup):
        try:
            await client.call()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    lat: list[float] = []
    cpu0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            await client.call()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        lat.append((time.perf_counter() - t0) * 1000)
    cpu = (time.process_time() - cpu0) * 1000 / max(1, n)
    return {"lat_ms": lat, "cpu_ms_per_call": cpu, "errors": len(errors), "error": errors[:1]}


async def _conc(client: Any, n: int, inflight: int) -> dict[str, Any]:
    errors: list[str] = []
    sem = asyncio.Semaphore(inflight)

    async def one() -> None:
        async with sem:
            try:
                await client.call()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one() for _ in range(inflight)))  # open the connections
    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    wall = time.perf_counter() - t0
    return {"calls_per_s": n / wall, "errors": len(errors), "error": errors[:1]}


class Panel(InProcessGateway):
    """A panel route, and a direct call to its slowest member for comparison."""

    stack = "httpx2 (gateway chat-completions providers)"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self.slowest_model = spec["slowest_model"]
        self.slowest_class = spec["slowest_class"]
        self.direct = Direct({"base_url": spec["base_url"], "model": self.slowest_model})

    async def setup(self) -> None:
        await super().setup()
        await self.direct.setup()

    async def call(self) -> None:
        envelope = await self.route()
        members = envelope.data.get("members") or []
        if len(members) != 3:
            raise AssertionError(f"expected 3 panel members, got {len(members)}")

    async def panel(self, n: int) -> dict[str, Any]:
        errors: list[str] = []
        await self.call()
        await self.direct.call()
        walls, slowest = await self._pairs(self.call, n, errors)
        # The slowest member alone through this gateway, paired with the same direct call:
        # apart from the loop above, so the panel's pairs are measured as they always were.
        alone, alone_direct = await self._pairs(self.alone, n, errors)
        return {
            "wall_ms": walls,
            "slowest_ms": slowest,
            "alone_ms": alone,
            "alone_direct_ms": alone_direct,
            "errors": len(errors),
            "error": errors[:1],
        }

    async def _pairs(
        self, call: Callable[[], Awaitable[None]], n: int, errors: list[str]
    ) -> tuple[list[float], list[float]]:
        """``n`` times ``call`` then the direct call, each timed (ms); a failed ``call`` is
        counted in ``errors``, never timed."""
        timed: list[float] = []
        direct: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                await call()
                timed.append((time.perf_counter() - t0) * 1000)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            t0 = time.perf_counter()
            await self.direct.call()
            direct.append((time.perf_counter() - t0) * 1000)
        return timed, direct

    async def alone(self) -> None:
        _expect((await self.route(self.slowest_class)).text, self.slowest_model)

    async def aclose(self) -> None:
        await self.direct.aclose()
        await super().aclose()


async def _main(spec: dict[str, Any]) -> int:
    kind = spec["kind"]
    cls = Panel if kind == "panel" else KINDS[kind]
    t0 = time.perf_counter()
    client = cls(spec)
    await client.setup()
    reply({"ready": True, "stack": client.stack, "setup_s": time.perf_counter() - t0})
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "quit":
                break
            if op == "seq":
                reply(await _seq(client, cmd["n"], cmd.get("warmup", 0)))
            elif op == "conc":
                reply(await _conc(client, cmd["n"], cmd["inflight"]))
            elif op == "panel":
                reply(await client.panel(cmd["n"]))
            else:
                reply({"error": [f"unknown op {op!r}"]})
    finally:
        await client.aclose()
    return 0


def main() -> int:
    spec = json.loads(sys.argv[1])
    # stdout is the protocol stream: keep it for replies and point fd 1 at stderr, so
    # nothing else (a library's print, a warning) can corrupt it.
    _PROTO.append(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return asyncio.run(_main(spec))


if __name__ == "__main__":
    raise SystemExit(main())
