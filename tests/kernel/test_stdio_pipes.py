"""``llmgw serve`` over stdio: asyncio pipes on POSIX pipes, the SDK's transport otherwise.

Each test runs the server as a subprocess and speaks raw JSON-RPC lines to it, so what is
checked is what a client sees on the wire: nothing but JSON-RPC on stdout, stray output
on stderr, a frame too long dropped without losing the next one, the standard
descriptors restored after serving.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest
from test_server import INIT
from test_server import route_call as call

from llmgw.kernel import server

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
        if request.messages[-1].content.startswith("B"):  # bulk calls stay quiet
            return await super().complete(request)
        print("provider noise on stdout", flush=True)
        subprocess.run([sys.executable, "-c", "print('child noise on stdout')"], check=True)
        child = "import sys; print('child stdin:', repr(sys.stdin.read()), file=sys.stderr)"
        subprocess.run([sys.executable, "-c", child], check=True, timeout=20)
        return await super().complete(request)

plugin = lambda ctx: FakeProviderPlugin(Noisy())
"""

INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


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


def _default_sigint() -> None:
    # A test run started in the background of a non-interactive shell (`pytest &`) has
    # SIGINT ignored, and a child inherits that: the server is then deaf to Ctrl-C by its
    # parent's choice. The tests below are about a terminal's Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def serve(config: Path, stdin: Any = subprocess.PIPE, stdout: Any = subprocess.PIPE) -> Any:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmgw.kernel.cli", "serve", "--config", str(config)],
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    # A server that hangs is killed, so a read sees EOF and the test fails, not hangs.
    watchdog = threading.Timer(60, proc.kill)
    watchdog.daemon = True
    watchdog.start()
    return proc


def transport(stderr: str) -> str:
    """Which stdio transport the server said it used."""
    for line in stderr.splitlines():
        if '"stdio.serving"' in line:
            return str(json.loads(line)["transport"])
    raise AssertionError(f"no stdio.serving log line in {stderr[-500:]!r}")


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
    assert transport(err) == "pipes"
    assert err.count("provider noise on stdout") == 2
    assert err.count("child noise on stdout") == 2
    assert err.count("child stdin: ''") == 2  # fd 0 reads the null device, not the frames
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
    assert transport(proc.stderr.read()) == "pipes"


@pytest.mark.parametrize("calls", [1, 10])
def test_no_frame_is_torn_when_the_client_reads_only_after_closing_stdin(
    config: Path, calls: int
) -> None:
    # Replies larger than a pipe holds are written while the client does not read, then
    # stdin closes and the server stops: what it wrote must be whole frames, the one it
    # was in the middle of included.
    size = 200_000 if calls == 1 else 10_000
    proc = serve(config)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    send(proc.stdin, INIT)
    answer(proc.stdout, 1)
    send(proc.stdin, INITIALIZED, *(call(i, "B" * size) for i in range(2, 2 + calls)))
    time.sleep(1.5)
    proc.stdin.close()
    time.sleep(0.5)
    lines = proc.stdout.read().splitlines()
    proc.wait(timeout=30)
    ids = [json.loads(line)["id"] for line in lines]  # a torn frame fails to parse
    assert ids == sorted(ids) and ids[:1] == [2]
    assert transport(proc.stderr.read()) == "pipes"


def test_a_server_interrupted_mid_frame_finishes_it_first(config: Path) -> None:
    # Ctrl-C while a reply larger than a pipe holds is half-written: the server waits
    # (a while) for the client to take the rest rather than leave half a frame.
    proc = serve(config)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    send(proc.stdin, INIT)
    answer(proc.stdout, 1)
    send(proc.stdin, INITIALIZED, call(2, "B" * 200_000))
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    out = proc.stdout.read()
    proc.wait(timeout=30)
    assert [json.loads(line)["id"] for line in out.splitlines()] == [2]
    assert transport(proc.stderr.read()) == "pipes"


@pytest.mark.parametrize("shared", [False, True])
def test_sockets_for_stdin_and_stdout(config: Path, shared: bool) -> None:
    # Node-based clients connect a server with sockets; inetd and socat EXEC with one
    # socket for both ends, which asyncio's write transport cannot serve (SDK's then).
    ours_in, theirs_in = socket.socketpair()
    ours_out, theirs_out = (ours_in, theirs_in) if shared else socket.socketpair()
    proc = serve(config, stdin=theirs_in.fileno(), stdout=theirs_out.fileno())
    theirs_in.close()
    theirs_out.close()
    to_server = ours_in.makefile("w", encoding="utf-8")
    from_server = ours_out.makefile("r", encoding="utf-8")
    send(to_server, INIT)
    assert "result" in answer(from_server, 1)
    # The noisy path of the provider: with either transport, the wire is on private
    # descriptors while serving, so the child reads the null device, not the client's
    # socket, and stray output goes to stderr, not into the replies.
    send(to_server, INITIALIZED, call(2, "over a socket"))
    got = answer(from_server, 2)["result"]["structuredContent"]
    assert got["data"]["text"] == "echo[m1]: over a socket"
    ours_in.shutdown(socket.SHUT_WR)  # EOF for the server's stdin
    proc.wait(timeout=30)
    for f in (to_server, from_server, ours_in, ours_out):
        f.close()
    err = proc.stderr.read()
    assert transport(err) == ("sdk" if shared else "pipes")
    assert "child stdin: ''" in err and "child noise on stdout" in err
    assert proc.returncode == 0


@pytest.mark.parametrize("shared", [False, True])
def test_ctrl_c_ends_the_server_without_waiting_for_the_client(config: Path, shared: bool) -> None:
    # Ctrl-C in a terminal brings no EOF: a reader waiting for the next line must not keep
    # the server up (the SDK's transport waited for it; one socket on both ends uses it).
    ours, theirs = socket.socketpair()
    proc = serve(
        config, stdin=theirs.fileno(), stdout=theirs.fileno() if shared else subprocess.PIPE
    )
    theirs.close()
    to_server, from_server = ours.makefile("w", encoding="utf-8"), None
    if shared:
        from_server = ours.makefile("r", encoding="utf-8")
    else:
        assert proc.stdout is not None
    send(to_server, INIT)
    assert "result" in answer(from_server or proc.stdout, 1)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)  # the client neither writes nor closes meanwhile
    finally:
        for f in (to_server, from_server, ours):
            if f is not None:
                f.close()
    assert proc.stderr is not None
    assert transport(proc.stderr.read()) == ("sdk" if shared else "pipes")
    assert proc.returncode == 1


def test_a_file_on_stdin_is_served_by_the_sdk_transport(config: Path, tmp_path: Path) -> None:
    frames = tmp_path / "frames.jsonl"
    frames.write_text(json.dumps(INIT) + "\n")
    with frames.open() as stdin:
        proc = serve(config, stdin=stdin)
        out, err = proc.communicate(timeout=30)
    replies = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in replies] == [1]
    assert replies[0]["result"]["serverInfo"]["name"] == "llm-gateway-mcp"
    assert transport(err) == "sdk"
    assert "stdio.pipes_unavailable" not in err  # not tried: a file is not a pipe


SCRIPT = """
import os, sys, anyio
from llmgw.kernel import server
from llmgw.kernel.testing import FakeProvider, gateway_from_yaml

server.MAX_FRAME_BYTES = int(sys.argv[1])
yaml = "plugins: [router, fake]\\ntask_classes:\\n  q: {provider: fake, model: m1}\\n"
srv = server.build_server(gateway_from_yaml(yaml, providers=[FakeProvider()]))
def fds():
    ident = [(s.st_dev, s.st_ino) for s in map(os.fstat, (0, 1))]
    return ident, [os.get_blocking(0), os.get_blocking(1)], len(os.listdir("/proc/self/fd"))
limit_s = float(sys.argv[2]) if len(sys.argv) > 2 else None
async def serve():
    if limit_s is None:
        await server.run_stdio(srv)  # until stdin's EOF
    else:
        with anyio.move_on_after(limit_s):  # stopped while the client is quiet (no EOF)
            await server.run_stdio(srv)
before = fds()
anyio.run(serve)
# fd 0 and fd 1 are the wire again, as blocking as before; the descriptors left open
# that were not before (none, but for a reader thread still blocked reading).
after = fds()
print("after", after[:2] == before[:2], after[2] - before[2], flush=True)
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
    for frame in frames:  # one write each, with a pause: a long frame arrives in parts
        proc.stdin.write(frame if isinstance(frame, str) else json.dumps(frame) + "\n")
        proc.stdin.flush()
        time.sleep(0.2)
    seen = []
    while not seen or json.loads(seen[-1]).get("id") != 1:  # answered before stdin closes
        seen.append(proc.stdout.readline())
        assert seen[-1], "the server closed stdout before answering"
    proc.stdin.close()
    out = "".join(seen) + proc.stdout.read()
    err = proc.stderr.read() if proc.stderr else ""
    proc.wait(timeout=30)
    return out, err


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_the_standard_descriptors_are_restored_after_serving(tmp_path: Path) -> None:
    out, err = run_script(tmp_path, 1 << 20, INIT)
    assert out.splitlines()[1:] == ["after True 0"]
    assert transport(err) == "pipes"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
@pytest.mark.parametrize("ended_by", ["eof", "cancel"])
def test_the_sdk_transport_restores_the_descriptors_too(tmp_path: Path, ended_by: str) -> None:
    script = tmp_path / "serve_once.py"
    script.write_text(textwrap.dedent(SCRIPT))
    ours, theirs = socket.socketpair()  # one socket on both ends: the SDK's transport
    proc = subprocess.Popen(
        [sys.executable, str(script), str(1 << 20), *(["2"] if ended_by == "cancel" else [])],
        stdin=theirs.fileno(),
        stdout=theirs.fileno(),
        stderr=subprocess.PIPE,
        text=True,
    )
    theirs.close()
    to_server, from_server = ours.makefile("w", encoding="utf-8"), ours.makefile("r")
    send(to_server, INIT)
    assert "result" in answer(from_server, 1)
    if ended_by == "eof":
        ours.shutdown(socket.SHUT_WR)
        assert from_server.read() == "after True 0\n"  # printed on fd 1, the socket again
    else:
        # Stopped with the reader thread blocked on the wire: its private descriptor is
        # left open for it (closed, its number could go to the next file opened).
        assert from_server.read() == "after True 1\n"
    assert proc.stderr is not None
    assert transport(proc.stderr.read()) == "sdk"
    assert proc.wait(timeout=30) == 0
    for f in (to_server, from_server, ours):
        f.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_a_frame_over_the_limit_is_dropped_whole_answered_with_an_error_and_the_next_one_served(
    tmp_path: Path,
) -> None:
    # A request over the limit, its id first (as the Python SDK writes it): dropped
    # unread, and answered with an error so that the client does not wait forever.
    long_frame = json.dumps(call(9, "x" * 20_000)) + "\n"
    # The same with its id last (as the TypeScript SDK writes it), a string id.
    request = call(0, "y" * 20_000)
    del request["id"]
    id_last = json.dumps({**request, "id": "req-7"}) + "\n"
    # Over the limit before its newline arrives; its tail is a frame of its own (id 8),
    # which is part of the long line: dropped with it, and not taken for its id.
    head = "x" * 10_000
    tail = json.dumps({"jsonrpc": "2.0", "id": 8, "method": "ping"}) + "\n"
    out, err = run_script(tmp_path, 4096, long_frame, id_last, head, tail, INIT)
    replies = [json.loads(line) for line in out.splitlines()[:-1]]
    assert [r.get("id") for r in replies] == [9, "req-7", 1]
    for r in replies[:2]:
        assert r["error"]["code"] == -32600
        assert "larger than this server reads" in r["error"]["message"]
    assert err.count("stdio.frame_too_long") == 3
    assert err.count('"answered": true') == 2
    assert out.endswith("after True 0\n")


@pytest.mark.parametrize(
    ("head", "tail", "expected"),
    [
        (b'{"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"a', b'a"}}\n', 9),
        (b'{"id": -3, "method": "m", "params": {', b"}}", -3),
        (b'{"method": "m", "params": {"x": "', b'x"}, "jsonrpc": "2.0", "id": "a\\"b"}\n', 'a"b'),
        # An id inside the params is not the frame's, at either end.
        (b'{"method": "m", "params": {"id": 3, "x": "', b'x"}}\n', None),
        (b'{"method": "m", "params": {"x": "', b'x", "id": 4}}\n', None),
        (b'{"meta": {"id": 5}, "method": "m", "params": {', b"}}\n", None),
        # A notification has no id; a null id cannot be answered either.
        (b'{"jsonrpc": "2.0", "method": "n", "params": {"x": "', b'x"}}\n', None),
        (b'{"jsonrpc": "2.0", "id": null, "method": "m", "params": {', b"}}\n", None),
        # An id inside a string is text, not a key.
        (b'{"method": "m", "params": {"x": "', b'x \\"id\\": 6}"}}\n', None),
    ],
)
def test_the_id_of_an_over_long_frame_is_found_only_where_clients_put_it(
    head: bytes, tail: bytes, expected: int | str | None
) -> None:
    assert server._frame_id(head, tail) == expected
    if expected is not None:
        reply = json.loads(server.too_long_reply(expected))
        assert reply["id"] == expected and reply["error"]["code"] == -32600


@pytest.mark.parametrize(
    ("head", "tail"),
    [
        # Not integers: JSON-RPC ids of MCP are strings or integers.
        (b'{"jsonrpc": "2.0", "id": 1.5, "method": "m", "params": {', b"}}\n"),
        (b'{"jsonrpc": "2.0", "id": 2e3, "method": "m", "params": {', b"}}\n"),
        # A client's response to a request of the server: its id is the server's.
        (b'{"jsonrpc": "2.0", "id": 4, "result": {"x": "', b'x"}}\n'),
        # A batch: one id would answer for all of them.
        (b'[{"jsonrpc": "2.0", "id": 5, "method": "m", "params": {', b"}}]\n"),
    ],
)
def test_an_over_long_frame_that_is_not_one_request_gets_no_answer(
    head: bytes, tail: bytes
) -> None:
    assert server._frame_id(head, tail) is None


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
def test_a_frame_nested_too_deep_is_answered_with_an_error_and_the_next_one_served(
    tmp_path: Path,
) -> None:
    """The SDK's parser drops a frame nested ~200 deep without a word, and the client
    would wait forever for its id: the server answers it with an error instead."""
    deep = call(11, "x")
    deep["params"]["arguments"]["prompt"] = json.loads("[" * 300 + "]" * 300)
    out, err = run_script(tmp_path, 1 << 20, deep, INIT)
    replies = [json.loads(line) for line in out.splitlines()[:-1]]
    assert [r.get("id") for r in replies] == [11, 1]
    assert replies[0]["error"]["code"] == -32600
    assert "deeper than 128 levels" in replies[0]["error"]["message"]
    assert err.count("stdio.frame_too_deep") == 1


def test_nesting_is_counted_outside_strings_only() -> None:
    assert server.too_deep("[" * 129 + "]" * 129)
    assert not server.too_deep("[" * 128 + "]" * 128)
    # Brackets in a string (a code prompt), escaped quotes included, are text.
    text = json.dumps({"id": 1, "params": {"prompt": '["\\"' + "[{" * 500 + '"'}})
    assert not server.too_deep(text)
    assert server.too_deep(json.dumps({"p": json.loads("[" * 200 + '"]]"' + "]" * 200)}))


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job of a shell


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_sigterm_finishes_the_frame_being_written_and_exits_0(config: Path, sigint: str) -> None:
    """SIGTERM is how MCP clients (after closing stdin), systemd and docker stop a server:
    it killed the process mid-frame (a torn 64 KiB line, exit -15). It now stops it as
    Ctrl-C does, also when SIGINT is ignored, and exits 0: the stop was asked for."""
    proc = serve(config)
    if sigint == "ignored":
        proc.kill()
        proc.wait()
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmgw.kernel.cli", "serve", "--config", str(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_ignore_sigint,
        )
        threading.Timer(60, proc.kill).start()
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    send(proc.stdin, INIT)
    answer(proc.stdout, 1)
    send(proc.stdin, INITIALIZED, call(2, "B" * 200_000))
    time.sleep(1.5)  # the reply (more than a pipe holds) is half written: nobody reads
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    out = proc.stdout.read()
    assert proc.wait(timeout=30) == 0
    assert [json.loads(line)["id"] for line in out.splitlines()] == [2]
    assert "Traceback" not in proc.stderr.read()


SLOW = """
import anyio
from llmgw.kernel.testing import FakeProvider, FakeProviderPlugin, flat_price

class Slow(FakeProvider):
    async def complete(self, request):
        await anyio.sleep({seconds})
        return await super().complete(request)

plugin = lambda ctx: FakeProviderPlugin(Slow(prices={{"m1": flat_price("1", "1")}}))
"""


def _slow_config(tmp_path: Path, seconds: float, *, ledger: bool = False) -> Path:
    """routing.yaml with a provider that answers after ``seconds`` (with the ledger and a
    cap: the reservations can be looked at)."""
    (tmp_path / "slow.py").write_text(SLOW.format(seconds=seconds))
    plugins = "kill_switch, ledger, router, slow.py" if ledger else "router, slow.py"
    ledger_section = (
        f"ledger: {{path: '{tmp_path / 'ledger.db'}', caps: {{total_monthly_usd: 5}}}}\n"
        if ledger
        else ""
    )
    config = tmp_path / "routing.yaml"
    config.write_text(
        f"plugins: [{plugins}]\n{ledger_section}"
        "task_classes:\n  quick_answer: {provider: fake, model: m1, max_tokens: 50}\n"
    )
    return config


def test_sigterm_during_a_call_settles_it_before_exiting(tmp_path: Path) -> None:
    """Killed by SIGTERM, a call in flight stayed `reserved` for the whole lease (600 s),
    held against every cap; stopped like Ctrl-C, it is charged as `unknown` at once."""
    import sqlite3

    proc = serve(_slow_config(tmp_path, 30, ledger=True))
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    send(proc.stdin, INIT)
    answer(proc.stdout, 1)
    send(proc.stdin, INITIALIZED, call(2, "slow one"))
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        states = db.execute("SELECT attempt, state FROM entries ORDER BY attempt").fetchall()
    # The attempt stays charged; the hold its reservation took is given back (attempt 0).
    assert states == [(0, "released"), (1, "unknown")]


def test_a_client_that_goes_away_mid_call_is_not_a_crash(tmp_path: Path) -> None:
    """Both pipes closed while a call ran: an ExceptionGroup[BrokenPipeError] traceback
    and exit 1."""
    proc = serve(_slow_config(tmp_path, 1))
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    send(proc.stdin, INIT)
    answer(proc.stdout, 1)
    send(proc.stdin, INITIALIZED, call(2, "bye"))
    time.sleep(0.3)
    proc.stdout.close()  # the client process died: both pipes close
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    err = proc.stderr.read()
    assert "Traceback" not in err, err[-1500:]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        # Valid JSON (RFC 8259 sets no limit on a number's size) the SDK cannot read.
        (
            '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"llm_route",'
            '"arguments":{"task_class":"quick_answer","prompt":"x","max_tokens":1'
            + "0" * 4300
            + "}}}",
            -32700,
        ),
        (
            '{"jsonrpc":"2.0","id":7,"method":"ping","params":{"_meta":{"n":1' + "0" * 4300 + "}}}",
            -32700,
        ),
        # JSON, but no JSON-RPC 2.0 request: answered -32600 with its id.
        ('{"jsonrpc":"2.0","id":7,"method":42}', -32600),
        ('{"jsonrpc":"1.0","id":7,"method":"ping"}', -32600),
        ('{"jsonrpc":"2.0","id":7,"method":"ping"', -32700),  # cut short
    ],
)
def test_a_frame_the_sdk_would_drop_is_answered(config: Path, frame: str, code: int) -> None:
    """The SDK's reader drops a frame it cannot validate without a word: the client
    waited forever for request 7."""
    proc = serve(config)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        send(proc.stdin, INIT)
        answer(proc.stdout, 1)
        send(proc.stdin, INITIALIZED, "", frame)
        assert answer(proc.stdout, 7)["error"]["code"] == code
        send(proc.stdin, {"jsonrpc": "2.0", "id": 8, "method": "ping"})
        assert answer(proc.stdout, 8)["result"] == {}
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert '"stdio.frame_refused"' in proc.stderr.read()


@pytest.mark.parametrize("calls", [1, 2])
def test_the_calls_in_flight_at_the_end_of_stdin_are_answered(tmp_path: Path, calls: int) -> None:
    """Closing stdin is how MCP asks a stdio server to stop; the calls in flight were
    cancelled, their answers lost although paid for, and a piped client
    (`... | llmgw serve`) never got any."""
    proc = serve(_slow_config(tmp_path, 1))
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    prompts = {2: "piped", 3: "and another"}
    wanted = dict(list(prompts.items())[:calls])
    # One call alone is the hard case: its handler has not started when stdin ends.
    send(proc.stdin, INIT, INITIALIZED, *(call(i, p) for i, p in wanted.items()))
    proc.stdin.close()  # at once: the calls are read, not answered
    texts: dict[int, str] = {}
    for line in proc.stdout:  # in whichever order the calls end
        msg = json.loads(line)
        if msg.get("id") in wanted:
            texts[msg["id"]] = msg["result"]["structuredContent"]["data"]["text"]
    assert texts == {i: f"echo[m1]: {p}" for i, p in wanted.items()}
    assert proc.wait(timeout=30) == 0
    assert '"stdio.draining"' in proc.stderr.read()
