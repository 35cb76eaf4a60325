"""Paths, the clean environment every benchmark process gets, and the line protocol.

Each measured column runs in a process of its own (a *worker*), driven by the runner
over stdin/stdout with one JSON object per line. Logs of every process go to files in
the run's temporary directory, never to the protocol stream.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

#: Dummy keys: the fake upstream accepts any key; none of these is a real secret.
BENCH_KEYS = {
    "OPENAI_API_KEY": "sk-bench-openai-000000",
    "ANTHROPIC_API_KEY": "sk-bench-anthropic-000000",
    "GEMINI_API_KEY": "bench-gemini-000000",
    "DEEPSEEK_API_KEY": "sk-bench-deepseek-000000",
}

#: Environment prefixes that must not leak from the caller into a measured process.
_SCRUB_PREFIXES = ("LLM_GATEWAY_", "LITELLM_", "OPENAI_", "ANTHROPIC_", "GEMINI_", "DEEPSEEK_")


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without gateway/provider settings, plus the bench keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)}
    env.update(BENCH_KEYS)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    # LiteLLM would fetch a remote price list at import (5 s timeout) and log at INFO.
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["LITELLM_LOG"] = "ERROR"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def llmgw_command() -> list[str]:
    """How a user starts the server: the ``llmgw`` console script beside this Python."""
    script = Path(sys.executable).with_name("llmgw")
    if script.exists():
        return [str(script)]
    found = shutil.which("llmgw")
    return [found] if found else [sys.executable, "-m", "llmgw.kernel.cli"]


def send(stream: TextIO, obj: Any) -> None:
    stream.write(json.dumps(obj) + "\n")
    stream.flush()


def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a live process, in kB (``ru_maxrss`` can carry a parent's peak)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in {"VmRSS", "VmHWM"}:
                out[key] = int(rest.split()[0])
    return out
