"""A bare MCP server doing what ``llm_route`` does at the wire: one httpx2 POST.

The baseline for the MCP columns and for cold start: ``MCPServer`` from the same ``mcp``
package, one tool, one long-lived ``httpx2.AsyncClient``, no gateway. Run as a file
(``python bench/bare_server.py``); the upstream's base URL comes from ``OPENAI_BASE_URL``.

``--collector-paused`` starts it as ``llmgw serve`` starts: the cyclic garbage collector
paused (here from the first line, before any import), the objects frozen and collecting
resumed just before serving. Cold start over this variant (no goal) is what the gateway's
own code adds, with the collector's share taken out of both sides.
"""

from __future__ import annotations

import gc
import sys

PAUSED = "--collector-paused" in sys.argv[1:]
if PAUSED:
    gc.disable()

import os  # noqa: E402

import httpx2  # noqa: E402
from mcp.server.mcpserver import MCPServer  # noqa: E402

server = MCPServer("bare-hello")
_client: list[httpx2.AsyncClient] = []


@server.tool()
async def ask(prompt: str, max_tokens: int = 512) -> str:
    """Send the prompt to gpt-4o-mini at OPENAI_BASE_URL and return the answer text."""
    if not _client:
        _client.append(
            httpx2.AsyncClient(
                timeout=httpx2.Timeout(60.0, connect=10.0),
                limits=httpx2.Limits(max_connections=100, max_keepalive_connections=20),
            )
        )
    resp = await _client[0].post(
        f"{os.environ['OPENAI_BASE_URL']}/chat/completions",
        json={
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": prompt}],
            "max_completion_tokens": max_tokens,
            "stream": False,
        },
        headers={"authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"},
    )
    resp.raise_for_status()
    text: str = resp.json()["choices"][0]["message"]["content"]
    return text


if __name__ == "__main__":
    if PAUSED:
        gc.freeze()
        gc.enable()
    server.run()
