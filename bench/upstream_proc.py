"""The fake upstream in a process of its own, driven by lines on stdin.

Run as ``python -m bench.upstream_proc``. It prints ``{"port": N}`` once listening, then
answers each command line with one JSON line:

- ``{"op": "latency", "model": M, "seconds": S}``: delay every answer for model M;
- ``{"op": "stats"}``: requests received since the last ``stats`` (per model and per
  User-Agent family), then forgets them (the upstream records every request);
- ``{"op": "quit"}``.

A process of its own because ``FakeUpstream`` is a threaded server: in the measuring
process its handler threads would take the GIL from the client being measured.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any

from llmgw.kernel.fake_upstream import FakeUpstream

from .common import send


def _family(user_agent: str) -> str:
    return user_agent.split("/")[0].split(" ")[0] or "none"


def main() -> int:
    latencies: dict[str, float] = {}
    with FakeUpstream() as up:
        send(sys.stdout, {"port": up.port})
        for line in sys.stdin:
            cmd: dict[str, Any] = json.loads(line)
            op = cmd.get("op")
            if op == "latency":
                latencies[cmd["model"]] = float(cmd["seconds"])
                up.set_latency(cmd["model"], float(cmd["seconds"]))
                send(sys.stdout, {"ok": True})
            elif op == "stats":
                seen = list(up.requests)
                up.reset()  # also forgets latencies: restore them
                for model, seconds in latencies.items():
                    up.set_latency(model, seconds)
                send(
                    sys.stdout,
                    {
                        "requests": len(seen),
                        "by_model": dict(Counter(r.model or "?" for r in seen)),
                        "by_agent": dict(
                            Counter(_family(r.headers.get("user-agent", "")) for r in seen)
                        ),
                        "connections": len({r.connection_id for r in seen}),
                    },
                )
            elif op == "quit":
                break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
