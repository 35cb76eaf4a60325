"""The measured columns: one client each, all calling the same fake upstream model.

Every client exposes ``setup()``, ``call() -> None`` (raises on a wrong answer) and
``aclose()``, plus ``stack``: which HTTP stack it sends over, shown in the report.
"""

from __future__ import annotations

import json
import os
from contextlib import AsyncExitStack
from typing import Any

from .configs import MAX_TOKENS, MODEL, PROMPT, TASK_CLASS


class BenchError(Exception):
    """A call returned something other than the expected answer."""


def _expect(text: Any, model: str = MODEL) -> None:
    if not isinstance(text, str) or not text.startswith(f"echo[{model}]"):
        raise BenchError(f"unexpected answer: {str(text)[:200]!r}")


def _body(model: str) -> dict[str, Any]:
    # What the gateway's openai provider sends for quick_answer.
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_completion_tokens": MAX_TOKENS,
        "stream": False,
    }


class Direct:
    """A plain ``httpx2.AsyncClient`` POST to /chat/completions: the floor."""

    stack = "httpx2 (direct POST)"

    def __init__(self, spec: dict[str, Any]) -> None:
        self.base = spec["base_url"]
        self.model = spec.get("model", MODEL)

    async def setup(self) -> None:
        import httpx2

        self.http = httpx2.AsyncClient(
            timeout=httpx2.Timeout(60.0, connect=10.0),
            limits=httpx2.Limits(max_connections=100, max_keepalive_connections=20),
        )
        self.headers = {
            "authorization": f"Bearer {os.environ['OPENAI_API_KEY']}",
            "content-type": "application/json",
            "accept": "application/json",
        }

    async def call(self) -> None:
        resp = await self.http.post(
            f"{self.base}/chat/completions", json=_body(self.model), headers=self.headers
        )
        resp.raise_for_status()
        _expect(resp.json()["choices"][0]["message"]["content"], self.model)

    async def aclose(self) -> None:
        await self.http.aclose()


class OpenAISDK:
    """The official SDK, ``AsyncOpenAI(max_retries=0)``."""

    stack = "httpx2 (openai SDK)"

    def __init__(self, spec: dict[str, Any]) -> None:
        self.base = spec["base_url"]

    async def setup(self) -> None:
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(
            base_url=self.base, api_key=os.environ["OPENAI_API_KEY"], max_retries=0
        )

    async def call(self) -> None:
        r = await self.client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            max_completion_tokens=MAX_TOKENS,
        )
        _expect(r.choices[0].message.content)

    async def aclose(self) -> None:
        await self.client.close()


class LiteLLMCompletion:
    """``litellm.acompletion`` (no router)."""

    stack = "httpx 0.28 + aiohttp transport (litellm default)"

    def __init__(self, spec: dict[str, Any]) -> None:
        self.base = spec["base_url"]

    async def setup(self) -> None:
        import litellm

        self.litellm = litellm
        if litellm.disable_aiohttp_transport:
            self.stack = "httpx 0.28 (litellm, aiohttp transport disabled)"

    async def call(self) -> None:
        r = await self.litellm.acompletion(
            model=f"openai/{MODEL}",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=MAX_TOKENS,
            api_base=self.base,
            api_key=os.environ["OPENAI_API_KEY"],
            num_retries=0,
            max_retries=0,
        )
        _expect(r.choices[0].message.content)

    async def aclose(self) -> None:
        return None


class LiteLLMRouter(LiteLLMCompletion):
    """LiteLLM ``Router.acompletion``, retries and fallbacks off."""

    async def setup(self) -> None:
        await super().setup()
        self.router = self.litellm.Router(
            model_list=[
                {
                    "model_name": TASK_CLASS,
                    "litellm_params": {
                        "model": f"openai/{MODEL}",
                        "api_base": self.base,
                        "api_key": os.environ["OPENAI_API_KEY"],
                        "max_retries": 0,
                    },
                }
            ],
            num_retries=0,
            fallbacks=[],
            timeout=60,
        )

    async def call(self) -> None:
        r = await self.router.acompletion(
            model=TASK_CLASS,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=MAX_TOKENS,
        )
        _expect(r.choices[0].message.content)


class InProcessGateway:
    """``Gateway.route`` in this process, built from a routing.yaml file."""

    stack = "httpx2 (gateway openai provider)"

    def __init__(self, spec: dict[str, Any]) -> None:
        self.config = spec["config"]
        self.unregister = spec.get("unregister")
        self.task_class = spec.get("task_class", TASK_CLASS)

    async def setup(self) -> None:
        from llmgw.kernel.build import build_gateway
        from llmgw.kernel.config import load_settings
        from llmgw.kernel.types import Request

        self.Request = Request
        settings = load_settings(self.config, env=dict(os.environ))
        self.gateway = build_gateway(settings)
        if self.unregister:
            # An essential plugin cannot be removed by config; take it out after loading
            # (before any call, so the facade's caches never saw it) to price it.
            self.gateway.pm.unregister(name=self.unregister)
            self.gateway.hooks.plugin_order.remove(self.unregister)

    async def route(self, task_class: str | None = None) -> Any:
        request = self.Request(task_class=task_class or self.task_class, prompt=PROMPT)
        envelope = await self.gateway.route(request)
        if envelope.status != "success":
            raise BenchError(f"{envelope.status}: {envelope.error} {envelope.meta}")
        return envelope

    async def call(self) -> None:
        _expect((await self.route()).text)

    async def aclose(self) -> None:
        await self.gateway.aclose()


class McpStdio:
    """An MCP client (``mcp.Client``) over stdio to a server subprocess, one tool call."""

    stack = "MCP stdio -> server -> httpx2"

    def __init__(self, spec: dict[str, Any]) -> None:
        self.command: list[str] = spec["command"]
        self.tool: str = spec["tool"]
        self.arguments: dict[str, Any] = spec["arguments"]
        self.cwd: str | None = spec.get("cwd")

    async def setup(self) -> None:
        from mcp import Client, StdioServerParameters

        self.stack_ = AsyncExitStack()
        params = StdioServerParameters(
            command=self.command[0], args=self.command[1:], env=dict(os.environ), cwd=self.cwd
        )
        self.client = await self.stack_.enter_async_context(Client(params))
        await self.client.list_tools()

    async def call(self) -> None:
        r = await self.client.call_tool(self.tool, self.arguments)
        text: Any = getattr(r.content[0], "text", None)
        if r.is_error:
            raise BenchError(f"tool error: {str(text)[:300]!r}")
        if self.tool == "llm_route":
            body = json.loads(text)
            if body["status"] != "success":
                raise BenchError(f"{body['status']}: {body.get('error')}")
            text = body["data"]["text"]
        _expect(text)

    async def aclose(self) -> None:
        await self.stack_.aclose()


KINDS: dict[str, type[Any]] = {
    "direct": Direct,
    "openai_sdk": OpenAISDK,
    "litellm": LiteLLMCompletion,
    "litellm_router": LiteLLMRouter,
    "gateway": InProcessGateway,
    "mcp": McpStdio,
}
