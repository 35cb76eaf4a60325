"""``llmgw serve`` over stdio: asyncio pipes on POSIX pipes, the SDK's transport otherwise.

Each test runs the server as a subprocess and speaks raw JSON-RPC lines to it, so what is
checked is what a client sees on the wire: nothing but JSON-RPC on stdout, stray output
on stderr, a frame too long dropped without losing the next one, the standard
descriptors restored after serving.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import IO, Any

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")

YAML = """
plugins: [router, noisy.py]
task_classes:
  quick_answer: {provider: fake, model: m1, max_tokens: 50}
"""

# A provider that writes to stdout itself and through a child process on every call.
NOISY = """
import subprocess, sys
from llmgw.kernel.testing import FakeProvider, FakeProviderPlugin

class Noisy(FakeProvider):
    async def complete(self, request):
        print("provider noise on stdout", flush=True)
        subprocess.run([sys.executable, "-c", "print('child noise on stdout')"], check=True)
        return await super().complete(request)

plugin = lambda ctx: FakeProviderPlugin(Noisy())
"""

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def call(msg_id: int, prompt: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": msg_id,
        "method": "tools/call",
        "params": {
            "name": "llm_route",
            "arguments": {"task_class": "quick_answer", "prompt": prompt},
        },
    }


def send(stdin: IO[str], *frames: dict[str, Any] | str) -> None:
    for f in frames:
        stdin.write((f if isinstance(f, str) else json.dumps(f)) + "\n")
    stdin.flush()


def answer(stdout: IO[str], msg_id: int) -> dict[str, Any]:
    """The reply to ``msg_id``; every line on the way must be JSON-RPC."""
    while True:
        line = stdout.readline()
        assert line, "the server closed stdout before answering"
        msg = json.loads(line)  # anything else on stdout would fail here
        assert msg["jsonrpc"] == "2.0"
        if msg.get("id") == msg_id:
            return msg


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "noisy.py").write_text(textwrap.dedent(NOISY))
    (tmp_path / "routing.yaml").write_text(textwrap.dedent(YAML))
    return tmp_path / "routing.yaml"


def serve(config: Path, stdin: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "llmgw.kernel.cli", "serve", "--config", str(config)],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_stray_output_of_a_plugin_and_its_children_stays_off_the_wire(config: Path) -> None:
    proc = serve(config)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        send(proc.stdin, INIT)
        assert "result" in answer(proc.stdout, 1)
        send(proc.stdin, INITIALIZED, call(2, "one"), call(3, "two"))
        for msg_id, prompt in ((2, "one"), (3, "two")):
            got = answer(proc.stdout, msg_id)["result"]["structuredContent"]
            assert got["data"]["text"] == f"echo[m1]: {prompt}"
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.stdout.read() == ""  # EOF on stdin ends the server, nothing after
    err = proc.stderr.read()
    assert err.count("provider noise on stdout") == 2
    assert err.count("child noise on stdout") == 2
    assert proc.returncode == 0


def test_frames_larger_than_the_pipe_buffer_go_both_ways(config: Path) -> None:
    # ~0.9 MB in (under gateway.max_prompt_bytes), ~1.8 MB out (text and structured
    # content): many times a pipe's 64 KiB, so both transports wait for room.
    prompt = "".join(chr(0x41 + i % 26) for i in range(900_000))
    proc = serve(config)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        send(proc.stdin, INIT)
        answer(proc.stdout, 1)
        send(proc.stdin, INITIALIZED, call(2, prompt), call(3, "after"))
        got = answer(proc.stdout, 2)["result"]["structuredContent"]
        assert got["data"]["text"] == f"echo[m1]: {prompt}"
        after = answer(proc.stdout, 3)["result"]["structuredContent"]
        assert after["data"]["text"] == "echo[m1]: after"
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_a_file_on_stdin_is_served_by_the_sdk_transport(config: Path, tmp_path: Path) -> None:
    frames = tmp_path / "frames.jsonl"
    frames.write_text(json.dumps(INIT) + "\n")
    with frames.open() as stdin:
        proc = serve(config, stdin=stdin)
        out, err = proc.communicate(timeout=30)
    replies = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in replies] == [1]
    assert replies[0]["result"]["serverInfo"]["name"] == "llm-gateway-mcp"
    assert "stdio.pipes_unavailable" not in err  # not tried: a file is not a pipe


SCRIPT = """
import os, sys, anyio
from llmgw.kernel import server
from llmgw.kernel.testing import FakeProvider, gateway_from_yaml

server.MAX_FRAME_BYTES = int(sys.argv[1])
yaml = "plugins: [router, fake]\\ntask_classes:\\n  q: {provider: fake, model: m1}\\n"
srv = server.build_server(gateway_from_yaml(yaml, providers=[FakeProvider()]))
anyio.run(server.run_stdio, srv)
# Served until stdin's EOF: fd 0 and fd 1 are the wire again, and blocking.
print("after", os.get_blocking(0), os.get_blocking(1), flush=True)
"""


def run_script(tmp_path: Path, limit: int, *frames: dict[str, Any] | str) -> tuple[str, str]:
    script = tmp_path / "serve_once.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(limit)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    send(proc.stdin, *frames)
    seen = []
    while not seen or json.loads(seen[-1]).get("id") != 1:  # answered before stdin closes
        seen.append(proc.stdout.readline())
        assert seen[-1], "the server closed stdout before answering"
    proc.stdin.close()
    out = "".join(seen) + proc.stdout.read()
    err = proc.stderr.read() if proc.stderr else ""
    proc.wait(timeout=30)
    return out, err


def test_the_standard_descriptors_are_restored_after_serving(tmp_path: Path) -> None:
    out, _ = run_script(tmp_path, 1 << 20, INIT)
    assert out.splitlines()[1:] == ["after True True"]


def test_a_frame_over_the_limit_is_dropped_and_the_next_one_answered(tmp_path: Path) -> None:
    # The long frame is valid JSON-RPC: were it read, its id 9 would be answered.
    long_frame = call(9, "x" * 20_000)
    out, err = run_script(tmp_path, 4096, long_frame, INIT)
    assert '"id": 9' not in out and '"id":9' not in out
    assert "stdio.frame_too_long" in err
    assert out.endswith("after True True\n")
