"""The fake upstream itself: routing, fault plans and markers, recording, base URLs."""

from __future__ import annotations

import time

import httpx2
import pytest

from llmgw.kernel.fake_upstream import FAULTS, FakeUpstream, Fault


def chat(up: FakeUpstream, prompt: str, model: str = "gpt-4o") -> httpx2.Response:
    return httpx2.post(
        f"{up.base_url('openai')}/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 50},
        headers={"authorization": "Bearer k"},
    )


def test_base_urls_per_sdk_form(upstream: FakeUpstream) -> None:
    root = f"http://127.0.0.1:{upstream.port}"
    assert upstream.base_url("openai") == f"{root}/v1"
    assert upstream.base_url("deepseek") == f"{root}/v1"
    assert upstream.base_url("anthropic") == root
    assert upstream.base_url("gemini") == root


def test_echo_and_usage(upstream: FakeUpstream) -> None:
    data = chat(upstream, "hi").json()
    assert data["choices"][0]["message"]["content"] == "echo[gpt-4o]: hi"
    assert data["usage"]["prompt_tokens"] > 0
    assert upstream.requests[0].wire == "openai"


def test_plans_apply_in_order_marker_first(upstream: FakeUpstream) -> None:
    upstream.fail_next(1, "server_error")
    upstream.script("gpt-4o", ["rate_limited", None])
    assert chat(upstream, "[[fault:auth_error]]").status_code == 401  # marker wins
    assert chat(upstream, "a").status_code == 429  # then the model's script
    assert chat(upstream, "b").status_code == 200
    assert chat(upstream, "c").status_code == 500  # then the global queue
    assert chat(upstream, "d").status_code == 200
    upstream.fail_model("gpt-4o", "overloaded")
    assert [chat(upstream, "e").status_code for _ in range(2)] == [503, 503]
    assert chat(upstream, "f", model="other").status_code == 200
    upstream.fail_model("gpt-4o", None)
    assert chat(upstream, "g").status_code == 200


def test_slow_marker_and_latency(upstream: FakeUpstream) -> None:
    t0 = time.perf_counter()
    assert chat(upstream, "[[fault:slow:0.05]]").status_code == 200
    upstream.set_latency("gpt-4o", 0.05)
    assert chat(upstream, "x").status_code == 200
    assert time.perf_counter() - t0 >= 0.1


def test_unknown_route_is_404_and_recorded(upstream: FakeUpstream) -> None:
    assert httpx2.get(f"{upstream.root}/v1/models").status_code == 404
    assert upstream.requests[0].wire == "unknown"


def test_unknown_fault_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        Fault("nope")
    assert "rate_limited" in FAULTS


def test_reset_forgets_everything(upstream: FakeUpstream) -> None:
    upstream.fail_next(3, "server_error")
    chat(upstream, "x")
    upstream.reset()
    assert upstream.requests == []
    assert chat(upstream, "y").status_code == 200
