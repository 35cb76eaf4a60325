"""What a request's content is, and its digest: shared by ``independence`` and ``roles``.

Both plugins certify *content*: the system prompt and the messages a model was sent,
plus the list of earlier outputs the request includes (its access set). The provider,
model and ``max_tokens`` are not content: a fallback to another model sends the same
content under a different request digest.

Forms a client can rebuild from what it sent (all hashed as
:data:`llmgw.kernel.types.CANONICAL_FORM` says):

- request: ``{"provider", "model", "system", "messages": [{"role", "content"}],
  "max_tokens"}`` (:meth:`ProviderRequest.canonical`);
- content: ``{"system", "messages": [{"role", "content"}]}``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from llmgw.kernel import Call, Message
from llmgw.kernel.types import CANONICAL_FORM, canonical_request, digest

REQUEST_FORM = (
    '{"provider": str, "model": str, "system": str | null, '
    '"messages": [{"role": str, "content": str}], "max_tokens": int}'
)
CONTENT_FORM = '{"system": str | null, "messages": [{"role": str, "content": str}]}'

__all__ = [
    "CANONICAL_FORM",
    "CONTENT_FORM",
    "REQUEST_FORM",
    "Digests",
    "call_content_sha256",
    "call_request_sha256",
    "content",
    "content_sha256",
]


def content(system: str | None, messages: Sequence[Message]) -> dict[str, Any]:
    """The content form of a request: what a model reads, whatever model it is."""
    return {
        "system": system,
        "messages": [{"role": m.role, "content": m.content} for m in messages],
    }


def content_sha256(system: str | None, messages: Sequence[Message]) -> str:
    """SHA-256 of :func:`content` in the canonical JSON encoding."""
    return digest(content(system, messages))


def call_content_sha256(call: Call) -> str:
    """The content digest of a call as it stands now (after any rewrites so far)."""
    return content_sha256(call.system, call.messages)


def call_request_sha256(call: Call) -> str:
    """The request digest of a call as it stands now: provider, model, content, bound."""
    assert call.target is not None
    return digest(
        canonical_request(
            call.target.provider, call.target.model, call.system, call.messages, call.max_tokens
        )
    )


class Digests:
    """The digests of one panel, each computed once.

    A blind panel hashes the same content for every member, and each member's request
    again where it is checked before sending and where the kernel's record of what was
    sent is certified. Keyed by exactly what the canonical forms hold, with the type of
    ``max_tokens`` (a request that a plugin rewrote is a new key, so it is hashed anew),
    and kept no longer than the certificate that holds them.
    """

    __slots__ = ("_memo",)

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, ...], str] = {}

    def content(self, system: str | None, messages: Sequence[Message]) -> str:
        messages = tuple(messages)
        key = ("content", system, *((m.role, m.content) for m in messages))
        return self._get(key, lambda: content_sha256(system, messages))

    def request(
        self,
        provider: str,
        model: str,
        system: str | None,
        messages: Sequence[Message],
        max_tokens: int,
    ) -> str:
        messages = tuple(messages)
        key = (
            "request",
            provider,
            model,
            # Equal in Python, written apart in JSON (256 and 256.0, 1 and True): a plugin
            # that changed only the type still changed what is sent.
            type(max_tokens),
            max_tokens,
            system,
            *((m.role, m.content) for m in messages),
        )
        return self._get(
            key, lambda: digest(canonical_request(provider, model, system, messages, max_tokens))
        )

    def _get(self, key: tuple[Any, ...], compute: Callable[[], str]) -> str:
        try:
            found = self._memo.get(key)
        except TypeError:  # a value that cannot be a key (a plugin's list as content)
            return compute()
        if found is None:
            found = self._memo[key] = compute()
        return found

    def of_call(self, call: Call) -> str:
        """:func:`call_request_sha256`, memoised."""
        assert call.target is not None
        t = call.target
        return self.request(t.provider, t.model, call.system, call.messages, call.max_tokens)
