"""A local hook: append one JSON line per upstream attempt to an audit file.

List it first in ``plugins:`` to make it the outermost layer: its ``after_call`` runs
last, after the ledger has settled and the breaker has counted, and it sees every
attempt, including refused and cancelled ones.

    plugins:
      - examples/hooks/audit_log.py
      - kill_switch
      - ...
    audit_log:
      path: audit.jsonl          # relative to routing.yaml
      include_prompt_digest: true

Lines carry metadata only (no prompt or answer text): time (UTC), request id, task
class, provider, model, attempt, outcome, error class, whether it was sent, latency,
tokens and cost. With ``include_prompt_digest`` a SHA-256 of the prompt is added so an
auditor can match a line to a known prompt without the log holding the text.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from llmgw.kernel import Outcome, hookimpl
from llmgw.kernel.config import Model


class AuditLog:
    """Writes one line per attempt in ``after_call``; never changes the outcome."""

    class Config(Model):
        path: str = "audit.jsonl"
        include_prompt_digest: bool = False

    def __init__(self, ctx: Any) -> None:
        config: AuditLog.Config = ctx.config
        path = Path(config.path).expanduser()
        self.path = path if path.is_absolute() else ctx.settings.base_dir / path
        self.digest = config.include_prompt_digest
        self.clock = ctx.clock
        self._lock = threading.Lock()

    @hookimpl
    def after_call(self, call: Any, outcome: Outcome) -> None:
        if call.is_panel:
            return None
        target = call.target
        usage = outcome.usage
        line: dict[str, Any] = {
            "ts": self.clock.now().isoformat(),
            "request_id": call.request.request_id,
            "task_class": call.task_class,
            "provider": target.provider if target else None,
            "model": target.model if target else None,
            "attempt": call.attempt,
            "ok": outcome.ok,
            "error_class": outcome.error_class.value if outcome.error_class else None,
            "sent": outcome.sent,
            "latency_ms": round(outcome.latency_ms, 2),
            "input_tokens": usage.input_tokens if usage else None,
            "output_tokens": usage.output_tokens if usage else None,
            "cost_micro_usd": outcome.cost_micro_usd,
        }
        if self.digest:
            line["prompt_sha256"] = hashlib.sha256(call.request.prompt.encode()).hexdigest()
        data = (json.dumps(line, sort_keys=True) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)  # one write per line: whole lines even across processes
            finally:
                os.close(fd)
        return None


plugin = AuditLog
