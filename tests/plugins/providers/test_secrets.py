"""Canary keys: no artifact may contain any 8-character piece of any key.

Logging runs at DEBUG, the HTTP clients' and SDKs' loggers included, and the fake
upstream echoes the key it received in every error body.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator

import pytest
from provider_support import PROVIDERS, gateway_yaml

from llmgw.kernel import Request
from llmgw.kernel.fake_upstream import FakeUpstream
from llmgw.kernel.logs import configure_logging, reset_logging
from llmgw.kernel.testing import gateway_from_yaml

PROMPTS = [
    "hello",
    "[[fault:echo_key]]",
    "[[fault:rate_limited]]",
    "[[fault:context_length]]",
    "[[fault:server_error]]",
    "[[fault:insufficient_quota]]",
    "[[fault:non_json]]",
    "[[fault:reset]]",
]


def canary_keys() -> dict[str, str]:
    u = uuid.uuid4().hex
    return {
        "OPENAI_API_KEY": f"sk-proj-CANARY{u}",
        "DEEPSEEK_API_KEY": f"sk-CANARY{u[::-1]}",
        "ANTHROPIC_API_KEY": f"sk-ant-api03-CANARY{u[5:]}{u[:5]}",
        "GEMINI_API_KEY": f"AIzaSyCANARY{u[10:]}{u[:10]}",
        "LOCAL_LLM_KEY": f"sk-or-v1-CANARY{u[16:]}{u[:16]}",
    }


def pieces(key: str) -> set[str]:
    return {key[i : i + 8] for i in range(len(key) - 7)}


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    configure_logging(level="DEBUG", stream=buf)
    yield buf
    reset_logging()


@pytest.mark.anyio
async def test_no_key_piece_in_logs_output_envelopes_or_info(
    debug_log: io.StringIO, capfd: pytest.CaptureFixture[str]
) -> None:
    keys = canary_keys()
    envelopes: list[str] = []
    with FakeUpstream(echo_key_in_errors=True) as up:
        gw = gateway_from_yaml(gateway_yaml(up), env=keys)
        try:
            for provider in PROVIDERS:
                for prompt in PROMPTS:
                    env = await gw.route(Request(f"ask_{provider}", prompt))
                    envelopes.append(json.dumps(env.to_dict()))
            info = json.dumps(gw.routing_info(), default=str)
            reprs = " ".join(repr(p) + repr(vars(p)) for p in gw.providers.values())
        finally:
            await gw.aclose()
        received = up.requests
    out, err = capfd.readouterr()
    log_text = debug_log.getvalue()

    # The test means something: every key went out, came back in error bodies,
    # and the HTTP clients logged at DEBUG into the captured stream.
    sent_keys = {k for r in received for k in keys.values() if k in json.dumps(r.headers)}
    assert sent_keys == set(keys.values())
    assert any(r.fault == "echo_key" for r in received)
    assert "httpx2" in log_text or "httpcore" in log_text
    assert "llm.attempt" in log_text
    assert len(envelopes) == len(PROVIDERS) * len(PROMPTS)

    artifacts = {
        "log": log_text,
        "stdout": out,
        "stderr": err,
        "envelopes": "\n".join(envelopes),
        "routing_info": info,
        "provider reprs": reprs,
    }
    for name, key in keys.items():
        for piece in pieces(key):
            for where, text in artifacts.items():
                assert piece not in text, f"a piece of {name} leaked into {where}"


@pytest.mark.anyio
async def test_outcome_of_key_echo_carries_no_upstream_text(upstream: FakeUpstream) -> None:
    keys = canary_keys()
    gw = gateway_from_yaml(gateway_yaml(upstream), env=keys)
    try:
        for provider in PROVIDERS:
            upstream.fail_next(1, "echo_key")
            env = await gw.route(Request(f"ask_{provider}", "hi"))
            dumped = json.dumps(env.to_dict())
            assert env.error_class == "auth_error"
            for key in keys.values():
                assert not any(p in dumped for p in pieces(key))
            assert "Incorrect API key" not in dumped
    finally:
        await gw.aclose()
