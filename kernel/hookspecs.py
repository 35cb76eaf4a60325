"""The hooks a plugin may implement: the whole contract between the kernel and plugins.

Every spec below follows one template: what it is for, when it is called, its
parameters, what it returns, whether it stops at the first result, sync or async, and
its order. Implement a hook with ``@hookimpl`` from :mod:`llmgw.kernel` and the same
parameter names (a subset is fine).

Order is the order of ``plugins:`` in ``routing.yaml``: the first listed plugin is
called first (and, for ``before_call``/``after_call``, is the outermost layer). An
``async def`` implementation is awaited by the kernel; ``wrapper=True`` and
``hookwrapper=True`` are refused on async hooks, because pluggy finishes a wrapper
before an async body runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

from .types import Call, Disposition, Outcome, Provider, Rejection, Request, Route, Verdict

if TYPE_CHECKING:
    from .config import Settings
    from .envelope import Envelope
    from .tools import ToolSpec

PROJECT = "llmgw"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Hooks whose implementations may be coroutines; the facade awaits them.
ASYNC_HOOKS = frozenset({"preflight", "before_call", "after_call", "verify", "shutdown"})


@hookspec
def register_providers(register: Callable[[Provider], None]) -> None:
    """Register provider objects with the gateway.

    When: once, while the gateway is built, before any request.

    :param register: call it with each provider object (an object with ``name``,
        ``status()``, ``price(model)``, ``async complete(request) -> Outcome`` and
        ``async aclose()``; see :class:`llmgw.kernel.Provider`). Registering two
        providers with the same name is a start-up error naming both plugins.
    :returns: nothing.

    All implementations are called; sync; config order.
    """


@hookspec
def register_tools(register: Callable[[ToolSpec], None]) -> None:
    """Add MCP tools to the server (the roles plugin adds ``llm_orchestrate`` here).

    When: once, when the MCP server is built.

    :param register: call it with a :class:`llmgw.kernel.ToolSpec` (name, description,
        an ``async`` function whose typed parameters become the input schema, and an
        optional ``schema_hints`` mapping of parameter name to allowed values).
    :returns: nothing.

    All implementations are called; sync; config order.
    """


@hookspec(firstresult=True)
def resolve_route(request: Request, settings: Settings) -> Route | None:
    """Turn a request into a route: the targets to try, or the members of a panel.

    When: once per tool call, before anything else.

    :param request: the caller's request (task class, prompt, optional overrides).
    :param settings: the validated gateway settings (task classes, providers).
    :returns: a :class:`Route`, or None to let a later plugin decide. Raise
        :class:`llmgw.kernel.RouteError` for a request that cannot be routed (unknown
        task class, undeclared override model): the caller sees its message.

    Stops at the first non-None result; sync and pure (no I/O, no state). The built-in
    ``router`` is ``trylast`` so any plugin listed may pre-empt it. A sync
    ``wrapper=True`` implementation may amend the route (the ``fallback`` plugin appends
    fallback targets this way).
    """


@hookspec
def preflight(call: Call) -> Awaitable[Rejection | None] | Rejection | None:
    """Decide whether a target may be tried at all, before anything is sent or reserved.

    When: once per target in a route, before its first attempt, and again before each
    retry of that target (before the retry delay is slept); for a panel, first once
    with the panel-level call (``call.is_panel``: ``call.members`` holds each member's
    first call, final and complete), then per member target.

    :param call: the prospective first attempt (``call.target``, ``call.price``,
        ``call.max_tokens`` are final).
    :returns: a :class:`Rejection` to refuse, or None. Must have no side effects.

    The first rejection wins and later plugins are not called; async (or sync);
    config order.
    """


@hookspec
def before_call(call: Call) -> Awaitable[None] | None:
    """Run just before a provider is called; the place to reserve, count and rewrite.

    When: before every attempt (each retry and each fallback target is an attempt);
    for a panel, also once with the panel-level call after its preflight passed and
    before any member starts.

    :param call: the attempt. Keep per-attempt state in ``call.stash[<plugin name>]``.
        Rewrites of ``call.system``/``call.messages``/``call.max_tokens`` are what the
        provider receives. Raise :class:`llmgw.kernel.CallRefused` to stop the attempt
        before anything is sent.
    :returns: nothing.

    All implementations are called; async (or sync); config order, so the first listed
    plugin is the outermost layer.
    """


@hookspec
def after_call(call: Call, outcome: Outcome) -> Awaitable[Disposition | None] | Disposition | None:
    """See how an attempt ended: settle money, count health, advise retry or fallback.

    When: after every attempt, for exactly the plugin layers the attempt passed (those
    whose ``before_call`` completed, and those without a ``before_call`` listed before
    the point where it stopped), always: also when the provider raised, the caller
    cancelled, or a later ``before_call`` refused. Runs inside a shielded ``finally``.

    :param call: the attempt, as ``before_call`` left it.
    :param outcome: what happened (``outcome.sent`` says whether it may be billed).
    :returns: a :class:`Disposition` (``retry`` after N seconds, ``fallback``, ``stop``)
        or None. The kernel takes ``stop`` over ``retry`` over ``fallback``.

    All implementations are called; async (or sync); reverse config order (innermost
    first). An exception in one implementation is logged and does not skip the others.
    """


@hookspec
def verify(request: Request, result: Envelope) -> Awaitable[Verdict | None] | Verdict | None:
    """Judge a finished result before it is returned.

    When: once per tool call that produced a successful envelope.

    :param request: the caller's request.
    :param result: the envelope about to be returned.
    :returns: a :class:`Verdict` or None. Any REVISE turns the status into
        ``needs_human_review``; all verdicts are listed in ``meta.verdicts``.

    All implementations are called; async (or sync); config order.
    """


@hookspec
def report_info() -> Mapping[str, Any] | None:
    """Contribute a section to ``llm_routing_info`` and ``llmgw info``.

    When: each time routing info is requested.

    :returns: a JSON-serialisable mapping shown under the plugin's name, or None.
        Never include a key or other secret. Two keys have a meaning of their own:
        ``error`` (a string: the plugin cannot work, e.g. a ledger it cannot open;
        ``llmgw check-config`` fails) and ``warnings`` (a list of strings: something in
        the config is ignored or suspicious; ``check-config`` prints each one).

    All implementations are called; sync; config order.
    """


@hookspec
def shutdown() -> Awaitable[None] | None:
    """Release what the plugin holds (HTTP clients, database connections).

    When: once, when the gateway closes (the MCP server's lifespan ends).

    :returns: nothing. All implementations are called, errors are logged; async (or
        sync); reverse config order.
    """
