"""Canary keys through the whole product: no artifact holds any 8-character piece of a key.

`llmgw serve` runs the shipped routing.yaml (every built-in plugin, DEBUG logs) against the
fake upstream, which echoes the key back in some error bodies. Artifacts checked: the
stdout transcript, stderr (logs, including the HTTP clients'), the ledger database and its
WAL, and every envelope.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from llmgw.kernel.fake_upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[1]


def _canaries() -> dict[str, str]:
    u = uuid.uuid4().hex
    return {
        "OPENAI_API_KEY": f"sk-CANARY{u}",
        "ANTHROPIC_API_KEY": f"sk-ant-CANARY{uuid.uuid4().hex}",
        "GEMINI_API_KEY": f"AIzaCANARY{uuid.uuid4().hex[:25]}",
        "DEEPSEEK_API_KEY": f"sk-CANARY{uuid.uuid4().hex}",
    }


def _pieces(secret: str) -> set[str]:
    return {secret[i : i + 8] for i in range(len(secret) - 7)}


def _frames(calls: list[tuple[str, dict[str, Any]]]) -> str:
    lines = [
        {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "canary", "version": "1"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
    ]
    for i, (tool, args) in enumerate(calls, start=1):
        lines.append(
            {
                "jsonrpc": "2.0",
                "id": i,
                "method": "tools/call",
                "params": {"name": tool, "arguments": args},
            }
        )
    return "".join(json.dumps(line) + "\n" for line in lines)


def test_no_artifact_contains_any_piece_of_any_key(tmp_path: Path) -> None:
    keys = _canaries()
    calls: list[tuple[str, dict[str, Any]]] = [
        ("llm_route", {"task_class": c, "prompt": f"hello {c}"})
        for c in (
            "quick_answer",
            "general_reasoning",
            "long_context",
            "deep_audit",
            "batch_classification",
            "dual_opinion",
            "triple_review",
        )
    ]
    for fault in ("echo_key", "auth_error", "model_not_found", "safety", "non_json"):
        for c in ("quick_answer", "general_reasoning", "long_context", "deep_audit"):
            calls.append(("llm_route", {"task_class": c, "prompt": f"x [[fault:{fault}]]"}))
    calls += [
        ("llm_routing_info", {}),
        ("llm_orchestrate", {"task": "write a haiku", "depth": "complex"}),
    ]
    with FakeUpstream() as up:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        env.update(keys)
        env.update(
            {
                "OPENAI_BASE_URL": up.base_url("openai"),
                "ANTHROPIC_BASE_URL": up.base_url("anthropic"),
                "GEMINI_BASE_URL": up.base_url("gemini"),
                "DEEPSEEK_BASE_URL": up.base_url("deepseek"),
                "LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "ledger.db"),
                "LLM_GATEWAY_LOG_LEVEL": "DEBUG",
            }
        )
        err_path = tmp_path / "stderr.log"
        err_file = err_path.open("wb")  # a file, not a pipe: DEBUG logs would fill a pipe
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llmgw.kernel.cli",
                "serve",
                "--config",
                str(ROOT / "routing.yaml"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err_file,
            env=env,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(_frames(calls).encode())
        proc.stdin.flush()
        transcript: list[bytes] = []
        answered: set[int] = set()
        while len(answered) < len(calls) + 1:
            line = proc.stdout.readline()
            if not line:
                break
            transcript.append(line)
            msg = json.loads(line)
            if isinstance(msg.get("id"), int):
                answered.add(msg["id"])
        proc.stdin.close()
        rest_out = proc.stdout.read()
        proc.wait(timeout=60)
        err_file.close()
        stderr = err_path.read_bytes()
        received = list(up.requests)
    stdout = b"".join(transcript) + rest_out
    assert len(answered) == len(calls) + 1, stderr.decode()[-2000:]
    # the upstream did receive the keys (so the test is not vacuous) ...
    sent_headers = json.dumps([r.headers for r in received])
    assert all(v in sent_headers for v in keys.values())
    # ... and the upstream echoed one back at least once
    artifacts = {
        "stdout": stdout,
        "stderr": stderr,
        "ledger": (tmp_path / "ledger.db").read_bytes(),
    }
    wal = tmp_path / "ledger.db-wal"
    if wal.exists():
        artifacts["ledger-wal"] = wal.read_bytes()
    assert b"DEBUG" in stderr or b'"debug"' in stderr
    hits = [
        (name, where)
        for name, key in keys.items()
        for piece in _pieces(key)
        for where, blob in artifacts.items()
        if piece.encode() in blob
    ]
    assert hits == [], f"key pieces found: {hits[:10]}"
    # every URL the gateway used is free of keys too
    for r in received:
        assert not any(p in r.path for k in keys.values() for p in _pieces(k))
