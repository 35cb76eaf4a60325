"""The machine's own costs, measured at the start and at the end of a run.

The goals in milliseconds (in-process and MCP added latency) and the panel's ratio move
with the machine as much as with the code: one durable ledger commit per call is one
``fdatasync``, and on a virtual disk that costs 2-4 times more after an idle gap than back
to back; a system call costs more on some virtual machines than on others. Printing these
beside the table says which state the machine was in, and comparing the start with the
end says whether it changed during the run.

- ``fdatasync``: 24 KiB written in place (about one ledger commit's WAL frames) then
  ``os.fdatasync``, back to back and after ``idle_s`` of sleep;
- ``syscall_us``: one ``os.getpid()`` call from Python, the system call included (Python
  3.11's ``asyncio.get_running_loop`` makes this system call each time it is called);
- ``python_ms``: a fixed pure-Python loop, a proxy for the CPU's speed right now.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

_BLOCK = b"\x5a" * (24 * 1024)


def _python_loop() -> float:
    t0 = time.perf_counter()
    acc: dict[int, int] = {}
    for i in range(60_000):
        acc[i & 255] = acc.get(i & 255, 0) + i
    return (time.perf_counter() - t0) * 1000


def probe(
    directory: Path, *, back_to_back: int = 100, idle: int = 10, idle_s: float = 0.05
) -> dict[str, Any]:
    """Measure the disk, the kernel and the interpreter here, now (~1 s with defaults)."""
    if back_to_back < 1 or idle < 1:
        raise ValueError("the probe needs at least one sample of each kind")
    path = directory / "probe.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for i in range(4):  # allocate the blocks first: the writes below overwrite in place
            os.pwrite(fd, _BLOCK, i * len(_BLOCK))
        os.fsync(fd)

        def sync_once(i: int) -> float:
            os.pwrite(fd, _BLOCK, (i % 4) * len(_BLOCK))
            t0 = time.perf_counter()
            os.fdatasync(fd)
            return (time.perf_counter() - t0) * 1000

        hot = [sync_once(i) for i in range(back_to_back)]
        cold = []
        for i in range(idle):
            time.sleep(idle_s)
            cold.append(sync_once(i))
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)

    n = 100_000
    getpid = os.getpid
    t0 = time.perf_counter()
    for _ in range(n):
        getpid()
    syscall_us = (time.perf_counter() - t0) * 1e6 / n

    return {
        "fdatasync_ms": {
            "back_to_back_p50": round(statistics.median(hot), 3),
            "after_idle_p50": round(statistics.median(cold), 3),
            "idle_s": idle_s,
        },
        "syscall_us": round(syscall_us, 3),
        "python_ms": round(min(_python_loop() for _ in range(5)), 2),
    }


def render(start: dict[str, Any], end: dict[str, Any] | None) -> str:
    """One line: the probe at the start of the run, and at its end when there is one."""

    def both(get: Any, nd: int) -> str:
        values = [get(p) for p in (start, end) if p is not None]
        return " -> ".join(f"{v:.{nd}f}" for v in values)

    idle_ms = round(start["fdatasync_ms"]["idle_s"] * 1000)
    when = "start -> end" if end is not None else "start"
    return (
        f"machine probe ({when}): fdatasync of 24 KiB "
        f"{both(lambda p: p['fdatasync_ms']['back_to_back_p50'], 3)} ms back to back, "
        f"{both(lambda p: p['fdatasync_ms']['after_idle_p50'], 3)} ms after {idle_ms} ms idle; "
        f"getpid {both(lambda p: p['syscall_us'], 2)} us; "
        f"python loop {both(lambda p: p['python_ms'], 1)} ms"
    )
