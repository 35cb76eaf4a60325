"""MCP input robustness: generated and malformed arguments and frames never crash or hang."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmgw.kernel.testing import FakeProvider, gateway_from_yaml, mcp_session

YAML = """
plugins: [router, fake]
task_classes:
  quick_answer: {provider: fake, model: m1, max_tokens: 50}
  duo:
    members: [{provider: fake, model: m1}, {provider: fake2, model: m2}]
"""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
route_args = st.fixed_dictionaries(
    {},
    optional={
        "task_class": st.sampled_from(["quick_answer", "duo", "", "QUICK", "../x"]) | json_values,
        "prompt": st.text(max_size=200) | json_values,
        "system": st.text(max_size=50) | json_values,
        "max_tokens": st.integers(min_value=-(2**40), max_value=2**40) | json_values,
        "override_model": st.text(max_size=20) | json_values,
    },
) | st.dictionaries(st.text(max_size=10), json_values, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    calls=st.lists(
        st.tuples(st.sampled_from(["llm_route", "llm_routing_info"]), route_args),
        min_size=1,
        max_size=4,
    )
)
def test_generated_arguments_never_crash_or_hang(calls: list[tuple[str, dict[str, Any]]]) -> None:
    async def run() -> None:
        gw = gateway_from_yaml(YAML, providers=[FakeProvider(), FakeProvider(name="fake2")])
        async with mcp_session(gw) as client:
            for name, args in calls:
                with anyio.fail_after(10):
                    r = await client.call_tool(name, args)
                if r.is_error:  # every error is an envelope, argument errors included
                    assert r.structured_content is not None, r.content
                    assert r.structured_content["status"] == "error"
                    assert r.structured_content["meta"]["error_class"]
            with anyio.fail_after(10):
                ok = await client.call_tool(
                    "llm_route", {"task_class": "quick_answer", "prompt": "k"}
                )
            assert ok.structured_content["status"] == "success"
        await gw.aclose()

    anyio.run(run)


def test_malformed_stdio_frames_do_not_kill_the_server(tmp_path: Path) -> None:
    (tmp_path / "fakes.py").write_text(
        textwrap.dedent("""
        from llmgw.kernel.testing import FakeProvider, FakeProviderPlugin
        plugin = lambda ctx: FakeProviderPlugin(FakeProvider(), FakeProvider(name="fake2"))
    """)
    )
    (tmp_path / "routing.yaml").write_text(textwrap.dedent(YAML).replace("fake]", "fakes.py]"))
    frames = [
        "this is not json",
        "{",
        "[]",
        '{"jsonrpc": "2.0"}',
        '{"jsonrpc": "2.0", "id": 1, "method": 42}',
        '{"jsonrpc": "1.0", "id": 2, "method": "initialize"}',
        "\x00\x01\x02",
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"},
                },
            }
        ),
        json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 4,
                "method": "tools/call",
                "params": {"name": "llm_route", "arguments": "not a dict"},
            }
        ),
        '{"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "llm_route", '
        '"arguments": {"task_class": "\\ud800", "prompt": "\\udfff"}}}',
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 5,
                "method": "tools/call",
                "params": {
                    "name": "llm_route",
                    "arguments": {"task_class": "quick_answer", "prompt": "alive?"},
                },
            }
        ),
    ]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmgw.kernel.cli",
            "serve",
            "--config",
            str(tmp_path / "routing.yaml"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n".join(frames) + "\n")
    proc.stdin.flush()
    replies: list[dict[str, Any]] = []
    try:
        while True:
            line = proc.stdout.readline()
            if not line:
                break
            replies.append(json.loads(line))
            if {5, 6} <= {r.get("id") for r in replies}:
                break
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    by_id = {r.get("id"): r for r in replies}
    assert "result" in by_id[3]
    # a lone surrogate in the arguments still gets an answer (an error envelope)
    assert by_id[6]["result"]["isError"] is True
    final = by_id[5]["result"]["structuredContent"]
    assert final["data"]["text"] == "echo[m1]: alive?"
    # stdout carried nothing but JSON-RPC
    assert all(r.get("jsonrpc") == "2.0" for r in replies)


@pytest.mark.anyio
async def test_huge_and_odd_prompts_are_handled() -> None:
    gw = gateway_from_yaml(YAML, providers=[FakeProvider(), FakeProvider(name="fake2")])
    async with mcp_session(gw) as client:
        for prompt in ("x" * 2_000_000, "\u202e\u0000emoji 😀", "a\r\nb"):
            r = await client.call_tool(
                "llm_route", {"task_class": "quick_answer", "prompt": prompt}
            )
            assert r.structured_content["status"] in {"success", "error"}
    await gw.aclose()


@pytest.mark.anyio
async def test_bad_arguments_get_an_envelope_that_names_the_fix_and_send_nothing() -> None:
    """Typed, missing, misspelled, empty and oversized arguments: each a bad_argument
    envelope saying what was wrong, the value never echoed back, nothing sent or billed
    (a misspelled override_model used to be ignored and the call sent with the default)."""
    fake = FakeProvider()
    gw = gateway_from_yaml(YAML, providers=[fake, FakeProvider(name="fake2")])
    base = {"task_class": "quick_answer", "prompt": "hi"}
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("llm_route", {"task_class": "quick_answer", "prompt": 5}, "prompt: Input should be"),
        ("llm_route", {"task_class": "quick_answer"}, "prompt: Field required"),
        ("llm_route", {**base, "max_tokens": True}, "max_tokens: Input should be a valid int"),
        ("llm_route", {**base, "max_tokens": "10"}, "max_tokens: Input should be a valid int"),
        ("llm_route", {**base, "max_tokens": 10.0}, "max_tokens: Input should be a valid int"),
        ("llm_route", {**base, "overide_model": "m1"}, "did you mean 'override_model'?"),
        ("llm_route", {**base, "max_token": 5}, "did you mean 'max_tokens'?"),
        ("llm_route", {**base, "override_model": " "}, "override_model is empty"),
        ("llm_route", {**base, "override_model": "m" * 5000}, "override_model is longer"),
        ("llm_route", {"task_class": "q" * 5_000_000, "prompt": "hi"}, "at most 200 char"),
        ("llm_route", {"task_class": "quick_answer", "prompt": "\u200b \ufeff"}, "prompt is empty"),
        ("llm_routing_info", {"verbose": True}, "unknown argument for llm_routing_info"),
    ]
    async with mcp_session(gw) as client:
        for tool, args, needle in cases:
            r = await client.call_tool(tool, args)
            body = r.structured_content
            assert r.is_error and body is not None, (args, r.content)
            assert body["status"] == "error" and body["meta"]["error_class"] == "bad_argument"
            assert needle in body["error"], (args, body["error"])
            assert len(r.content[0].text) < 2_000  # nothing long echoed back
        ok = await client.call_tool("llm_route", {**base, "max_tokens": 10})
        assert ok.structured_content["status"] == "success"
    assert len(fake.received) == 1  # the last call only
    await gw.aclose()
