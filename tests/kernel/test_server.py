"""The MCP surface through a real MCP client: in memory, over stdio and over HTTP."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters

from llmgw.kernel import __version__
from llmgw.kernel.testing import FakeProvider, gateway_from_yaml, mcp_session

YAML = """
plugins: [router, fake]
version: policy-2026-11
task_classes:
  quick_answer: {provider: fake, model: m1, max_tokens: 100, description: Short answers}
  dual_opinion:
    members:
      - {provider: fake, model: m1}
      - {provider: fake2, model: m2}
"""


def _gateway() -> Any:
    return gateway_from_yaml(YAML, providers=[FakeProvider(), FakeProvider(name="fake2")])


@pytest.mark.anyio
async def test_tools_and_schemas_are_generated_from_the_config() -> None:
    async with mcp_session(_gateway()) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {"llm_route", "llm_routing_info"}  # no roles plugin: no orchestrate
        props = tools["llm_route"].input_schema["properties"]
        assert props["task_class"]["enum"] == ["dual_opinion", "quick_answer"]
        assert "Short answers" in props["task_class"]["description"]
        assert set(props) == {"task_class", "prompt", "system", "max_tokens", "override_model"}
        assert tools["llm_route"].input_schema["required"] == ["task_class", "prompt"]


@pytest.mark.anyio
async def test_llm_route_returns_the_envelope() -> None:
    async with mcp_session(_gateway()) as client:
        r = await client.call_tool("llm_route", {"task_class": "quick_answer", "prompt": "hi"})
        assert not r.is_error
        env = r.structured_content
        assert env == json.loads(r.content[0].text)
        assert env["status"] == "success"
        assert env["data"]["text"] == "echo[m1]: hi"
        meta = env["meta"]
        for key in ("provider", "model", "latency_ms", "tokens", "cost_usd_approx", "task_class"):
            assert key in meta
        assert set(meta["tokens"]) >= {"input", "output", "total"}


@pytest.mark.anyio
async def test_panel_reports_progress_per_member() -> None:
    got: list[tuple[float, float | None, str | None]] = []

    async def on_progress(p: float, total: float | None, msg: str | None) -> None:
        got.append((p, total, msg))

    async with mcp_session(_gateway()) as client:
        r = await client.call_tool(
            "llm_route",
            {"task_class": "dual_opinion", "prompt": "hi"},
            progress_callback=on_progress,
        )
        assert r.structured_content["status"] == "success"
        assert len(r.structured_content["data"]["members"]) == 2
    assert [g[0] for g in got] == [1, 2]
    assert all(g[1] == 2 for g in got)


@pytest.mark.anyio
async def test_bad_calls_get_errors_and_the_server_keeps_serving() -> None:
    async with mcp_session(_gateway()) as client:
        r = await client.call_tool("llm_route", {"task_class": "nope", "prompt": "hi"})
        assert r.is_error
        env = r.structured_content
        assert env["meta"]["error_class"] == "unknown_task_class"
        assert "dual_opinion, quick_answer" in env["error"]
        for bad in (
            {"task_class": "quick_answer"},
            {"task_class": "quick_answer", "prompt": "x", "max_tokens": -1},
            {"task_class": "quick_answer", "prompt": "x", "max_tokens": "many"},
            {"task_class": 7, "prompt": None},
            {"task_class": "quick_answer", "prompt": "   "},
            {"task_class": "quick_answer", "prompt": "x", "override_model": "gpt-9"},
        ):
            r = await client.call_tool("llm_route", bad)
            assert r.is_error, bad
        r = await client.call_tool("no_such_tool", {})
        assert r.is_error
        r = await client.call_tool("llm_route", {"task_class": "quick_answer", "prompt": "ok"})
        assert r.structured_content["status"] == "success"


@pytest.mark.anyio
async def test_routing_info_lists_classes_providers_and_plugins() -> None:
    async with mcp_session(_gateway()) as client:
        r = await client.call_tool("llm_routing_info", {})
        info = r.structured_content["data"]
        assert set(info["task_classes"]) == {"quick_answer", "dual_opinion"}
        assert info["panels"] == ["dual_opinion"]
        assert info["providers"]["fake"]["available"] is True
        assert "router" in info["plugins"]
        # The policy's own version (routing.yaml), as the seed's llm_routing_info shows it;
        # the gateway's release apart.
        assert info["version"] == "policy-2026-11"
        assert info["gateway_version"] == __version__


# --- real transports ------------------------------------------------------------------

HOOK = """
from llmgw.kernel.testing import FakeProvider, FakeProviderPlugin
plugin = lambda ctx: FakeProviderPlugin(FakeProvider(), FakeProvider(name="fake2"))
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "fakes.py").write_text(HOOK)
    (tmp_path / "routing.yaml").write_text(textwrap.dedent(YAML).replace("fake]", "fakes.py]"))
    return tmp_path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(extra)
    return env


@pytest.mark.anyio
async def test_stdio_serve_subprocess(config_dir: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "llmgw.kernel.cli", "serve", "--config", str(config_dir / "routing.yaml")],
        env=_env(),
    )
    async with Client(params) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert names == {"llm_route", "llm_routing_info"}
        r = await client.call_tool("llm_route", {"task_class": "quick_answer", "prompt": "hi"})
        assert r.structured_content["data"]["text"] == "echo[m1]: hi"
        r = await client.call_tool("llm_route", {"task_class": "bad", "prompt": "hi"})
        assert r.is_error
        r = await client.call_tool("llm_route", {"task_class": "dual_opinion", "prompt": "x"})
        assert r.structured_content["status"] == "success"


GC_HOOK = """
import gc
from llmgw.kernel import Outcome, Usage
from llmgw.kernel.testing import FakeProvider, FakeProviderPlugin

def plugin(ctx):
    paused = not gc.isenabled()
    def report(request):
        text = f"{paused} {gc.isenabled()} {gc.get_freeze_count()}"
        return Outcome.success(text, Usage(input_tokens=1, output_tokens=1), finish_reason="stop")
    return FakeProviderPlugin(FakeProvider().then(report), FakeProvider(name="fake2"))
"""


@pytest.mark.anyio
async def test_serve_starts_with_the_collector_paused_and_serves_with_it_on(
    config_dir: Path,
) -> None:
    """``llmgw serve`` builds the gateway with the cyclic collector paused, then freezes
    what the start built and collects again while it serves."""
    (config_dir / "fakes.py").write_text(GC_HOOK)
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "llmgw.kernel.cli", "serve", "--config", str(config_dir / "routing.yaml")],
        env=_env(),
    )
    async with Client(params) as client:
        r = await client.call_tool("llm_route", {"task_class": "quick_answer", "prompt": "hi"})
        paused_at_build, collecting, frozen = r.structured_content["data"]["text"].split()
    assert paused_at_build == "True"
    assert collecting == "True"
    assert int(frozen) > 10_000  # the modules, classes and validators of the start


LIGHT_CLI = """
import json, sys
import llmgw.kernel.cli
heavy = ("pydantic", "yaml", "mcp", "pluggy", "llmgw.kernel.config", "llmgw.kernel.gateway")
print(json.dumps([m for m in heavy if m in sys.modules]))
"""


def test_the_command_line_loads_the_gateway_inside_the_paused_start() -> None:
    """``import llmgw.kernel.cli`` (what the console script does first) loads none of the
    gateway's heavy modules: they load in ``cmd_serve``, with the collector paused."""
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_CLI], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout) == []


def test_the_kernel_exports_every_public_name_on_first_use() -> None:
    import llmgw.kernel as kernel

    for name in kernel.__all__:
        assert getattr(kernel, name) is not None, name
        assert name in dir(kernel)
    assert kernel.Outcome.__module__ == "llmgw.kernel.types"
    assert kernel.errors.ConfigError is kernel.ConfigError  # a submodule, as an attribute
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        kernel.Nope  # noqa: B018
    assert not hasattr(kernel, "no.such.module")
    assert not hasattr(kernel, "__wrapped__")


@pytest.mark.anyio
async def test_http_serve_also_collects_while_it_serves(config_dir: Path) -> None:
    from mcp.client.streamable_http import streamable_http_client

    (config_dir / "fakes.py").write_text(GC_HOOK)
    with _running_http(config_dir, _env(LLM_GATEWAY_HTTP_TOKEN=TOKEN)) as (url, _proc):
        hc = httpx2.AsyncClient(headers={"authorization": f"Bearer {TOKEN}"}, timeout=20)
        async with Client(streamable_http_client(url, http_client=hc)) as client:
            r = await client.call_tool("llm_route", {"task_class": "quick_answer", "prompt": "x"})
    paused_at_build, collecting, frozen = r.structured_content["data"]["text"].split()
    assert (paused_at_build, collecting) == ("True", "True")
    assert int(frozen) > 10_000


def test_startup_collector_resumes_without_freezing_when_the_start_fails() -> None:
    from llmgw.kernel.cli import _startup_collector

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    paused: list[bool] = []

    def fail() -> None:
        with _startup_collector():
            paused.append(not gc.isenabled())
            raise RuntimeError("the config was bad")

    with pytest.raises(RuntimeError):
        fail()
    assert paused == [True]
    assert gc.isenabled()
    assert gc.get_freeze_count() == frozen


def test_startup_collector_leaves_a_collector_the_program_turned_off() -> None:
    from llmgw.kernel.cli import _startup_collector

    gc.disable()
    try:
        with _startup_collector() as started:
            started()
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


TOKEN = "test-token-0123456789abcdef"


@contextlib.contextmanager
def _running_http(config_dir: Path, env: dict[str, str]) -> Iterator[tuple[str, Any]]:
    """``llmgw serve --http`` on a free port; yields its /mcp URL, once it accepts, and
    its process."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmgw.kernel.cli",
            "serve",
            "--http",
            "--port",
            str(port),
            "--config",
            str(config_dir / "routing.yaml"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(
                    proc.stderr.read().decode() if proc.stderr else "exited"
                ) from None
            time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/mcp", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def http_server(config_dir: Path) -> Iterator[str]:
    with _running_http(config_dir, _env(LLM_GATEWAY_HTTP_TOKEN=TOKEN)) as (url, _proc):
        yield url


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
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def route_call(msg_id: int, prompt: str) -> dict[str, Any]:
    """A raw JSON-RPC tools/call of llm_route for quick_answer."""
    return {
        "jsonrpc": "2.0",
        "id": msg_id,
        "method": "tools/call",
        "params": {
            "name": "llm_route",
            "arguments": {"task_class": "quick_answer", "prompt": prompt},
        },
    }


def test_http_refuses_what_it_must(http_server: str) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    with httpx2.Client(timeout=10) as c:
        r = c.post(http_server, json=INIT, headers=ACCEPT)
        assert r.status_code == 401
        r = c.post(http_server, json=INIT, headers={**ACCEPT, "authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = c.post(
            http_server, json=INIT, headers={**ACCEPT, **auth, "origin": "http://evil.example"}
        )
        assert r.status_code == 403
        r = c.post(http_server, json=INIT, headers={**ACCEPT, **auth, "host": "evil.example"})
        assert r.status_code == 421
        big = json.dumps({**INIT, "pad": "x" * (5 * 1024 * 1024)})
        r = c.post(http_server, content=big, headers={**ACCEPT, **auth})
        assert r.status_code == 413
        r = c.post(http_server, json=INIT, headers={**ACCEPT, **auth})
        assert r.status_code == 200
        # Stateless: no stream of its own. A GET opened one that never sent nor ended.
        r = c.get(http_server, headers={"accept": "text/event-stream", **auth})
        assert r.status_code == 405 and r.headers["allow"] == "POST"


@pytest.mark.anyio
async def test_http_client_session_and_duplicate_ids(http_server: str) -> None:
    from mcp.client.streamable_http import streamable_http_client

    hc = httpx2.AsyncClient(headers={"authorization": f"Bearer {TOKEN}"}, timeout=20)
    async with Client(streamable_http_client(http_server, http_client=hc)) as client:
        r = await client.call_tool(
            "llm_route", {"task_class": "quick_answer", "prompt": "over http"}
        )
        assert r.structured_content["data"]["text"] == "echo[m1]: over http"

    # Two raw calls with the same JSON-RPC id at once each get their own answer.
    def call(prompt: str) -> dict[str, Any]:
        body = route_call(7, prompt)
        headers = {
            **ACCEPT,
            "authorization": f"Bearer {TOKEN}",
            "mcp-protocol-version": "2025-11-25",
        }
        with httpx2.Client(timeout=20) as c:
            r = c.post(http_server, json=body, headers=headers)
        assert r.status_code == 200, r.text
        for line in r.text.splitlines():
            if line.startswith("data:"):
                return json.loads(line[5:])  # type: ignore[no-any-return]
        return json.loads(r.text)  # type: ignore[no-any-return]

    results: dict[str, dict[str, Any]] = {}

    async def run(prompt: str) -> None:
        results[prompt] = await anyio.to_thread.run_sync(call, prompt)

    async with anyio.create_task_group() as tg:
        for p in ("alpha", "beta", "gamma"):
            tg.start_soon(run, p)
    for p, msg in results.items():
        text = msg["result"]["structuredContent"]["data"]["text"]
        assert text == f"echo[m1]: {p}"
    await hc.aclose()


def test_http_token_from_the_dotenv_beside_the_config(config_dir: Path) -> None:
    """The README: the .env beside routing.yaml holds unset variables. serve --http read
    its token from the process environment only ("LLM_GATEWAY_HTTP_TOKEN is not set")."""
    (config_dir / ".env").write_text(f"LLM_GATEWAY_HTTP_TOKEN={TOKEN}\n")
    with _running_http(config_dir, _env()) as (url, _proc):
        ok = httpx2.post(url, json=INIT, headers={**ACCEPT, "authorization": f"Bearer {TOKEN}"})
        refused = httpx2.post(url, json=INIT, headers=ACCEPT)
    assert ok.status_code == 200 and refused.status_code == 401


def test_http_refuses_to_start_without_token_or_on_a_public_bind(config_dir: Path) -> None:
    cfg = str(config_dir / "routing.yaml")
    r = subprocess.run(
        [sys.executable, "-m", "llmgw.kernel.cli", "serve", "--http", "--config", cfg],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "LLM_GATEWAY_HTTP_TOKEN is not set" in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmgw.kernel.cli",
            "serve",
            "--http",
            "--host",
            "0.0.0.0",
            "--config",
            cfg,
        ],
        env=_env(LLM_GATEWAY_HTTP_TOKEN=TOKEN),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "not a loopback address" in r.stderr


def test_wildcard_bind_needs_named_hosts() -> None:
    from llmgw.kernel.server import HttpConfigError, http_server

    gw = _gateway()
    with pytest.raises(HttpConfigError, match="--allowed-host"):
        http_server(gw, token=TOKEN, host="0.0.0.0", port=8765, allow_remote=True)
    _server, kwargs = http_server(
        gw,
        token=TOKEN,
        host="0.0.0.0",
        port=8765,
        allow_remote=True,
        extra_hosts=["gw.example:8765"],
    )
    allowed = kwargs["transport_security"].allowed_hosts
    assert "gw.example:8765" in allowed
    assert "0.0.0.0:8765" not in allowed
    with pytest.raises(HttpConfigError, match="too short"):
        http_server(gw, token="short", host="127.0.0.1", port=8765)


def test_sanitize_frame_replaces_only_lone_surrogates() -> None:
    from llmgw.kernel.server import sanitize_frame

    ok = '{"a": "\\ud83d\\ude00 fine"}\n'
    assert sanitize_frame(ok) == ok
    out = json.loads(sanitize_frame('{"a": "x\\ud800y", "b": ["\\udfff"]}\n'))
    assert out == {"a": "x\ufffdy", "b": ["\ufffd"]}
    assert sanitize_frame("not json \\ud800") == "not json \\ud800"


def test_a_loopback_address_other_than_127_0_0_1_is_an_allowed_host() -> None:
    """--host 127.0.0.2 needs no --allow-remote, but every request to it got 421."""
    from llmgw.kernel.server import http_server

    _server, kwargs = http_server(_gateway(), token=TOKEN, host="127.0.0.2", port=8766)
    security = kwargs["transport_security"]
    assert "127.0.0.2:8766" in security.allowed_hosts
    assert "http://127.0.0.2:8766" in security.allowed_origins
    _server, kwargs = http_server(
        _gateway(), token=TOKEN, host="fd00::1", port=8766, allow_remote=True
    )
    assert "[fd00::1]:8766" in kwargs["transport_security"].allowed_hosts


def _serve_http(config_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cfg = str(config_dir / "routing.yaml")
    return subprocess.run(
        [sys.executable, "-m", "llmgw.kernel.cli", "serve", "--http", *args, "--config", cfg],
        env=_env(LLM_GATEWAY_HTTP_TOKEN=TOKEN),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_http_serve_reports_a_bad_or_busy_port_plainly(config_dir: Path) -> None:
    r = _serve_http(config_dir, "--port", "99999")
    assert r.returncode == 2
    assert "'99999' is not a port (1-65535)" in r.stderr and "Traceback" not in r.stderr
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        r = _serve_http(config_dir, "--port", str(port))
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "serving MCP" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.anyio
async def test_an_unknown_tool_is_named_briefly_with_the_tools_there_are() -> None:
    """The SDK's answer echoed the whole name asked for (100 KB of it)."""
    async with mcp_session(_gateway()) as client:
        r = await client.call_tool("x" * 100_000, {})
        typo = await client.call_tool("llm_rout", {})
    text = r.content[0].text
    assert r.is_error and len(text) < 300
    assert "llm_route, llm_routing_info" in text
    assert typo.is_error and "'llm_rout'" in typo.content[0].text


SLOW_HOOK = """
import anyio
from llmgw.kernel.testing import FakeProvider, FakeProviderPlugin

class Slow(FakeProvider):
    async def complete(self, request):
        await anyio.sleep(2)
        return await super().complete(request)

plugin = lambda ctx: FakeProviderPlugin(Slow(), FakeProvider(name="fake2"))
"""


def test_sigterm_lets_an_http_call_in_flight_finish(config_dir: Path) -> None:
    """sse-starlette ended every response stream at SIGTERM: the call in flight lost its
    answer ("incomplete chunked read"), charged as unknown. uvicorn's graceful shutdown
    now waits for it."""
    import signal
    import threading

    (config_dir / "fakes.py").write_text(SLOW_HOOK)
    got: list[httpx2.Response] = []
    with _running_http(config_dir, _env(LLM_GATEWAY_HTTP_TOKEN=TOKEN)) as (url, proc):
        body = route_call(7, "last")
        headers = {**ACCEPT, "authorization": f"Bearer {TOKEN}"}
        worker = threading.Thread(
            target=lambda: got.append(httpx2.post(url, json=body, headers=headers, timeout=30))
        )
        worker.start()
        time.sleep(0.7)  # the call is with the provider
        proc.send_signal(signal.SIGTERM)
        worker.join(30)
        # uvicorn raises the signal again once it has shut down (the conventional exit).
        assert proc.wait(timeout=30) in {0, -signal.SIGTERM}
    (reply,) = got
    assert reply.status_code == 200
    data = next(
        json.loads(line[len("data: ") :])
        for line in reply.text.splitlines()
        if line.startswith("data: ")
    )
    assert data["id"] == 7
    assert data["result"]["structuredContent"]["data"]["text"] == "echo[m1]: last"
