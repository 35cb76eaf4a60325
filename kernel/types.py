"""Data that crosses the kernel's boundaries: requests, routes, calls, outcomes, verdicts.

Everything here is a frozen dataclass except :class:`Call`, the one mutable object a
request's plugins share while it is in flight (they keep their per-attempt state in
``call.stash`` and add envelope fields to ``call.meta``).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from .errors import ErrorClass

if TYPE_CHECKING:
    from .config import Settings

_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def new_id() -> str:
    """A 32-hex-character id unique across processes and restarts, without a syscall.

    A random prefix drawn once per process plus a counter: ids for requests, attempts and
    ledger entries are made on every call, and ``uuid4`` costs a ``getrandom`` each time.
    """
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


Role = Literal["system", "user", "assistant"]
Status = Literal["success", "error", "needs_human_review"]


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message as sent upstream (the system prompt travels separately)."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Request:
    """What a caller asked for: a task class and a prompt, never a model."""

    task_class: str
    prompt: str
    system: str | None = None
    max_tokens: int | None = None
    override_model: str | None = None
    request_id: str = field(default_factory=new_id)
    access: tuple[str, ...] = ()
    """Earlier outputs whose text this prompt includes (set by orchestrating plugins,
    e.g. ``("plan",)`` for a worker); empty for a caller's request: a blind request."""


@dataclass(frozen=True, slots=True)
class Target:
    """One (provider, model) the gateway may send a request to, with its output bound."""

    provider: str
    model: str
    max_tokens: int
    label: str = "primary"

    @property
    def key(self) -> str:
        """``provider/model``, the name breakers, prices and ledgers use."""
        return f"{self.provider}/{self.model}"


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes: a chain of targets, or the members of a panel.

    A single route tries ``targets`` in order (primary first, then fallbacks). A panel
    route has ``members``, each a single route of its own, run concurrently.
    """

    task_class: str
    targets: tuple[Target, ...] = ()
    members: tuple[Route, ...] = ()
    quorum: int | None = None
    min_distinct_providers: int = 1
    system: str | None = None

    @property
    def is_panel(self) -> bool:
        return bool(self.members)

    @property
    def primary(self) -> Target:
        return self.targets[0]


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """The exact request handed to a provider: what its digest certifies."""

    provider: str
    model: str
    system: str | None
    messages: tuple[Message, ...]
    max_tokens: int
    timeout_s: float
    request_id: str = ""

    def canonical(self) -> dict[str, Any]:
        """The canonical form hashed by :meth:`sha256` (keys sorted, no timeout or id)."""
        return canonical_request(
            self.provider, self.model, self.system, self.messages, self.max_tokens
        )

    def sha256(self) -> str:
        return digest(self.canonical())


def canonical_request(
    provider: str,
    model: str,
    system: str | None,
    messages: Sequence[Message],
    max_tokens: int,
) -> dict[str, Any]:
    """The canonical request form: a client can rebuild it from what it sent."""
    return {
        "provider": provider,
        "model": model,
        "system": system,
        "messages": [{"role": m.role, "content": m.content} for m in messages],
        "max_tokens": max_tokens,
    }


CANONICAL_FORM = (
    "sha256 of json.dumps(obj, sort_keys=True, separators=(',', ':'), ensure_ascii=False)"
)


def digest(obj: Any) -> str:
    """SHA-256 over the canonical JSON encoding described by :data:`CANONICAL_FORM`."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts as the provider reported them."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens for one model, and where the figure came from."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    source: str
    cached_input_per_mtok: Decimal | None = None

    def cost_micro_usd(self, usage: Usage) -> int:
        """Cost of a reported usage in integer micro-dollars, rounded up."""
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        cached_price = (
            self.cached_input_per_mtok
            if self.cached_input_per_mtok is not None
            else self.input_per_mtok
        )
        # USD per million tokens is micro-dollars per token.
        total = (
            (usage.input_tokens - cached) * self.input_per_mtok
            + cached * cached_price
            + usage.output_tokens * self.output_per_mtok
        )
        return int(total.to_integral_value(rounding=ROUND_CEILING))

    def worst_case_micro_usd(self, input_tokens: int, max_tokens: int) -> int:
        """Upper bound in micro-dollars: full input price and every output token."""
        total = input_tokens * self.input_per_mtok + max_tokens * self.output_per_mtok
        return int(total.to_integral_value(rounding=ROUND_CEILING))


def micro_to_usd(micro: int | None) -> float | None:
    return None if micro is None else micro / 1_000_000


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    """Whether a provider can be called now, and if not, why (never the key itself)."""

    available: bool
    reason: str = ""
    key_env: str | None = None
    base_url: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one upstream attempt produced: an answer or a classified failure.

    ``sent`` is True when bytes may have reached the provider (so it may bill us).
    ``cost_micro_usd`` is filled by the kernel from the provider's price and ``usage``.
    """

    ok: bool
    sent: bool
    text: str | None = None
    usage: Usage | None = None
    error_class: ErrorClass | None = None
    message: str = ""
    status_code: int | None = None
    retry_after_s: float | None = None
    finish_reason: str | None = None
    latency_ms: float = 0.0
    cost_micro_usd: int | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def refused_here(self) -> bool:
        """Refused before sending, by a plugin (preflight ``rejected_by``, before_call
        ``refused_by``) or the kernel: no answer of the upstream."""
        return not self.sent and ("rejected_by" in self.details or "refused_by" in self.details)

    @classmethod
    def success(
        cls,
        text: str,
        usage: Usage | None,
        *,
        finish_reason: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> Outcome:
        return cls(
            ok=True,
            sent=True,
            text=text,
            usage=usage,
            finish_reason=finish_reason,
            details=details or {},
        )

    @classmethod
    def failure(
        cls,
        error_class: ErrorClass,
        message: str,
        *,
        sent: bool,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        usage: Usage | None = None,
        finish_reason: str | None = None,
        text: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> Outcome:
        return cls(
            ok=False,
            sent=sent,
            text=text,
            usage=usage,
            error_class=error_class,
            message=message,
            status_code=status_code,
            retry_after_s=retry_after_s,
            finish_reason=finish_reason,
            details=details or {},
        )


@dataclass(frozen=True, slots=True)
class Rejection:
    """A ``preflight`` refusal: nothing was sent or reserved.

    ``fallback`` lets the kernel try the route's next target (an open breaker); a kill
    switch or a total cap sets it False.
    """

    error_class: ErrorClass
    message: str
    fallback: bool = False
    plugin: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)


Action = Literal["retry", "fallback", "stop"]
DISPOSITION_ACTIONS: frozenset[str] = frozenset(("retry", "fallback", "stop"))


@dataclass(frozen=True, slots=True)
class Disposition:
    """What an ``after_call`` hook advises for a failed attempt.

    The kernel combines them: ``stop`` beats ``retry`` beats ``fallback``; among
    retries the longest delay wins. With no advice a failure ends the route.
    """

    action: Action
    delay_s: float = 0.0
    reason: str = ""

    @staticmethod
    def combine(dispositions: list[Disposition]) -> Disposition | None:
        rank = {"stop": 0, "retry": 1, "fallback": 2}
        best: Disposition | None = None
        for d in dispositions:
            if (
                best is None
                or rank[d.action] < rank[best.action]
                or (d.action == best.action == "retry" and d.delay_s > best.delay_s)
            ):
                best = d
        return best


@dataclass(frozen=True, slots=True)
class Verdict:
    """A ``verify`` judgement of a result; anything but ACCEPT asks for review."""

    verdict: Literal["ACCEPT", "REVISE"]
    reasons: tuple[str, ...] = ()
    source: str = ""
    parse_error: bool = False


@runtime_checkable
class Clock(Protocol):
    """Time, injected so that tests are exact."""

    def monotonic(self) -> float: ...

    def now(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: ``time.monotonic``, UTC wall time and ``asyncio.sleep``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


@runtime_checkable
class Provider(Protocol):
    """A provider adapter: registered through ``register_providers``, not a hook.

    ``complete`` never raises for upstream trouble: it returns a failed
    :class:`Outcome` with the error class, whether the request was sent, and any retry
    hint. It must not retry by itself.
    """

    name: str

    def status(self) -> ProviderStatus: ...

    def price(self, model: str) -> Price | None: ...

    async def complete(self, request: ProviderRequest) -> Outcome: ...

    async def aclose(self) -> None: ...


def input_token_bound(system: str | None, messages: tuple[Message, ...] | list[Message]) -> int:
    """A true upper bound of the input tokens of a request, without a tokenizer.

    Tokenizers used by the supported providers emit at most one token per UTF-8 byte;
    the per-message allowance covers role and framing tokens.
    """
    n = 16
    if system:
        n += len(system.encode("utf-8")) + 8
    for m in messages:
        n += len(m.content.encode("utf-8")) + 8
    return n


@dataclass(eq=False)
class Call:
    """One attempt in flight (or, for a panel, the panel as a whole).

    A fresh ``Call`` is made for every attempt, so ``stash`` is per attempt. ``meta`` is
    shared by every attempt of the same route (or panel member) and is merged into the
    envelope's ``meta``. Before-call hooks may change ``system``, ``messages`` and
    ``max_tokens``; the provider receives :meth:`provider_request` built afterwards.
    """

    request: Request
    route: Route
    settings: Settings
    target: Target | None
    system: str | None
    messages: list[Message]
    max_tokens: int
    deadline: float
    attempt: int = 1
    target_index: int = 0
    access: tuple[str, ...] = ()
    member_index: int | None = None
    members: tuple[Call, ...] = ()
    panel: Call | None = None
    history: tuple[tuple[Target, Outcome], ...] = ()
    stash: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    call_id: str = field(default_factory=new_id)
    timeout_s: float = 60.0
    price: Price | None = None
    cost_ceiling_micro: int | None = None
    """The smallest worst case a plugin has committed to (reserved, checked against a
    threshold). The kernel refuses to send a request whose final worst case exceeds it."""
    origin: tuple[Target | None, Price | None] = field(init=False, repr=False)
    """``target`` and ``price`` as the kernel made them: hooks may rewrite the request,
    never where it goes or what it is priced at (checked before sending)."""

    def __post_init__(self) -> None:
        self.origin = (self.target, self.price)

    def limit_cost(self, micro_usd: int) -> None:
        """Record that this attempt was approved for at most ``micro_usd`` worst case.

        Plugins that reserve money or check a cost threshold call this, so that a plugin
        listed after them cannot enlarge the request (more tokens, a longer prompt)
        beyond what was approved: the kernel refuses such a request before sending.
        """
        if self.cost_ceiling_micro is None or micro_usd < self.cost_ceiling_micro:
            self.cost_ceiling_micro = micro_usd

    @property
    def is_panel(self) -> bool:
        """True for the panel-level call that holds ``members``."""
        return bool(self.members)

    @property
    def task_class(self) -> str:
        return self.request.task_class

    def input_token_bound(self) -> int:
        return input_token_bound(self.system, self.messages)

    def worst_case_micro_usd(self) -> int | None:
        """Upper bound of this attempt's cost, or None when the price is unknown.

        For a panel call, the sum over members (None if any member's price is unknown).
        """
        if self.is_panel:
            total = 0
            for m in self.members:
                w = m.worst_case_micro_usd()
                if w is None:
                    return None
                total += w
            return total
        if self.price is None:
            return None
        return self.price.worst_case_micro_usd(self.input_token_bound(), self.max_tokens)

    def provider_request(self) -> ProviderRequest:
        if self.target is None:
            raise RuntimeError("a panel call is never sent to a provider")
        return ProviderRequest(
            provider=self.target.provider,
            model=self.target.model,
            system=self.system,
            messages=tuple(self.messages),
            max_tokens=self.max_tokens,
            timeout_s=self.timeout_s,
            request_id=self.request.request_id,
        )
