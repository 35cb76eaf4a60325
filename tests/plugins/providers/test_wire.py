"""What the fake upstream received: path, headers, model, max_tokens, system placement."""

from __future__ import annotations

import pytest
from provider_support import KEYS, PROVIDERS, Stack, request

from llmgw.kernel.fake_upstream import ReceivedRequest


def _only(stack: Stack) -> ReceivedRequest:
    assert len(stack.up.requests) == 1
    return stack.up.requests[0]


def _key_nowhere_but_headers(req: ReceivedRequest, key: str, header: str) -> None:
    assert key not in req.url  # never in the path or the query string
    assert key.encode() not in req.raw  # nor in the body
    holders = [name for name, value in req.headers.items() if key in value]
    assert holders == [header]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("provider", "field"),
    [("openai", "max_completion_tokens"), ("deepseek", "max_tokens"), ("local", "max_tokens")],
)
async def test_chat_completions_shape(stack: Stack, provider: str, field: str) -> None:
    await stack.provider(provider).complete(
        request(provider, "hi", system="be brief", max_tokens=77)
    )
    req = _only(stack)
    assert req.method == "POST"
    assert req.path == "/v1/chat/completions"
    assert req.body == {
        "model": PROVIDERS[provider][0],
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ],
        field: 77,
        "stream": False,
    }
    key = KEYS[PROVIDERS[provider][1]]
    assert req.headers["authorization"] == f"Bearer {key}"
    _key_nowhere_but_headers(req, key, "authorization")


@pytest.mark.anyio
async def test_anthropic_shape(stack: Stack) -> None:
    await stack.provider("anthropic").complete(
        request("anthropic", "hi", system="be brief", max_tokens=77)
    )
    req = _only(stack)
    assert req.path == "/v1/messages"
    assert req.body == {
        "model": "claude-haiku-4-5",
        "max_tokens": 77,
        "system": "be brief",  # top level, not a message
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert "anthropic-version" in req.headers
    assert req.headers.get("x-stainless-retry-count", "0") == "0"
    key = KEYS["ANTHROPIC_API_KEY"]
    header = "x-api-key" if "x-api-key" in req.headers else "authorization"
    _key_nowhere_but_headers(req, key, header)


@pytest.mark.anyio
async def test_anthropic_without_system_sends_none(stack: Stack) -> None:
    await stack.provider("anthropic").complete(request("anthropic", "hi"))
    assert "system" not in _only(stack).body


@pytest.mark.anyio
async def test_gemini_shape(stack: Stack) -> None:
    await stack.provider("gemini").complete(
        request("gemini", "hi", system="be brief", max_tokens=77)
    )
    req = _only(stack)
    assert req.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert req.query == ""  # the key is not a ?key= parameter
    assert req.body["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]
    assert req.body["systemInstruction"]["parts"] == [{"text": "be brief"}]
    assert req.body["generationConfig"] == {"maxOutputTokens": 77}
    key = KEYS["GEMINI_API_KEY"]
    assert req.headers["x-goog-api-key"] == key
    _key_nowhere_but_headers(req, key, "x-goog-api-key")


@pytest.mark.anyio
async def test_deepseek_reasoning_is_counted_but_not_in_the_answer(stack: Stack) -> None:
    outcome = await stack.provider("deepseek").complete(
        request("deepseek", "why?", model="deepseek-reasoner")
    )
    assert outcome.ok
    assert outcome.text == "echo[deepseek-reasoner]: why?"
    assert "Thinking" not in (outcome.text or "")
    assert outcome.usage is not None
    reasoning = (len("Thinking about: why?") + 3) // 4
    assert outcome.usage.reasoning_tokens == reasoning
    # billed output = answer + reasoning, as DeepSeek reports it
    answer = (len("echo[deepseek-reasoner]: why?") + 3) // 4
    assert outcome.usage.output_tokens == answer + reasoning


@pytest.mark.anyio
async def test_gemini_thoughts_are_billed_as_output(stack: Stack) -> None:
    outcome = await stack.provider("gemini").complete(
        request("gemini", "why?", model="gemini-2.5-pro")
    )
    assert outcome.usage is not None
    assert outcome.usage.reasoning_tokens == 8
    answer = (len("echo[gemini-2.5-pro]: why?") + 3) // 4
    assert outcome.usage.output_tokens == answer + 8


@pytest.mark.anyio
async def test_openai_compatible_without_key_env_sends_no_authorization(upstream) -> None:
    from llmgw.kernel.testing import gateway_from_yaml

    gw = gateway_from_yaml(
        f"""
        plugins: [router, openai_compatible]
        openai_compatible:
          endpoints:
            - {{name: ollama, base_url: "{upstream.base_url("ollama")}", models: [llama3.2]}}
        task_classes:
          local: {{provider: ollama, model: llama3.2}}
        """
    )
    try:
        p = gw.providers["ollama"]
        assert p.status().available
        outcome = await p.complete(request("local", model="llama3.2"))
    finally:
        await gw.aclose()
    assert outcome.ok
    assert "authorization" not in upstream.requests[0].headers
