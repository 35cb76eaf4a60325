"""``llmgw serve`` with the MCP SDK's stdio transport instead of the gateway's pipes.

A bench column only: it shows how much of the MCP figure is the transport. This is the
server's fallback for files, terminals and one socket on both ends: the SDK's
``stdio_server`` writes and flushes each frame through a worker thread, and a reader
thread hands it each line; on pipes ``llmgw serve`` uses asyncio instead, see
``kernel/server.py``. Run as ``python bench/serve_sdk_stdio.py serve ...``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from llmgw.kernel import server
from llmgw.kernel.cli import main


@asynccontextmanager
async def _no_pipes() -> AsyncIterator[None]:
    yield None  # run_stdio then falls back to the SDK's transport


server._pipe_stdio = _no_pipes

if __name__ == "__main__":
    sys.exit(main())
