"""Cold start: spawn an MCP stdio server, time it to its first ``tools/list`` answer.

Raw JSON-RPC over the pipes (no client library), so the clock starts at ``Popen`` and the
server's pid is known: RSS is read from ``/proc/<pid>/status`` right after the answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import IO, Any

from .common import read_status

_INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "llmgw-bench", "version": "1"},
    },
}
_INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
_LIST = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}}


def _wait_for(stream: IO[bytes], msg_id: int, deadline: float) -> dict[str, Any]:
    while time.perf_counter() < deadline:
        line = stream.readline()
        if not line:
            raise RuntimeError("the server closed stdout before answering")
        msg = json.loads(line)
        if msg.get("id") == msg_id:
            if "error" in msg:
                raise RuntimeError(f"server answered an error: {msg['error']}")
            return dict(msg["result"])
    raise TimeoutError(f"no answer to request {msg_id}")


_COMPILE = """
import compileall, llmgw.kernel, llmgw.plugins
paths = [*llmgw.kernel.__path__, *llmgw.plugins.__path__]
ok = all(compileall.compile_dir(p, quiet=1) for p in paths)
raise SystemExit(0 if ok else 1)
"""


def compile_gateway(env: dict[str, str]) -> None:
    """Byte-compile the gateway's own modules, as an installed package has them.

    pip compiles what it installs into site-packages (``mcp`` and the rest of the bare
    server's imports) but not an editable checkout, and the bench's processes run with
    ``PYTHONDONTWRITEBYTECODE``: without this, every ``llmgw serve`` start would compile
    the gateway from source (~0.1 s here) and the bare server would not."""
    env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", _COMPILE], env=env, check=True, timeout=120)


def cold_start(
    command: list[str], env: dict[str, str], *, cwd: str, stderr: IO[Any], timeout_s: float = 30
) -> dict[str, Any]:
    """Seconds from spawn to the ``tools/list`` answer, tool names, and VmRSS/VmHWM (MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env, cwd=cwd
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write((json.dumps(_INIT) + "\n").encode())
        proc.stdin.flush()
        deadline = t0 + timeout_s
        _wait_for(proc.stdout, 1, deadline)
        proc.stdin.write((json.dumps(_INITIALIZED) + "\n" + json.dumps(_LIST) + "\n").encode())
        proc.stdin.flush()
        result = _wait_for(proc.stdout, 2, deadline)
        seconds = time.perf_counter() - t0
        mem = read_status(proc.pid)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {
        "seconds": seconds,
        "tools": sorted(t["name"] for t in result.get("tools", [])),
        "rss_mb": mem.get("VmRSS", 0) / 1024,
        "hwm_mb": mem.get("VmHWM", 0) / 1024,
    }
