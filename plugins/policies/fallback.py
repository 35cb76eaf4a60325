"""Fallback chains per task class: other targets to try when the primary fails.

``resolve_route`` is a sync ``wrapper=True`` hook: it takes the route the router built
and appends the class's chain (``fallback.chains.<task_class>`` in routing.yaml) as
targets labelled ``fallback[i]``. For a panel it appends the chain to each member,
skipping models already in the panel (the kernel also keeps two members from landing
on the same fallback at runtime). Without this plugin a route has only its primary.

``after_call`` advises ``fallback`` for the classes that allow it
(``errors.FALLBACK_OK``); ``content_refused`` only with ``on_content_refused: true``;
``context_length_exceeded`` only when a later target of the route is listed in
``larger_context`` (and then ``preflight`` skips the targets in between). The kernel
ranks ``retry`` over ``fallback``, so the retry plugin wins while attempts remain.

Within one request, after a provider answered ``quota_exhausted`` or ``auth_error``,
later targets of the same provider are skipped: they share the account and the key.
Across requests the provider is then marked (exhausted, or misconfigured) for
``provider_hold_s``: a new route puts that provider's targets after every other
provider's, in their order. They are never skipped: tried only if nothing before them
answered (a circuit open, a panel's other members holding the rest), each such attempt
is the probe that renews or clears the mark. ``llm_routing_info`` shows the marks.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import replace
from typing import Any

from pydantic import Field, ValidationInfo, model_validator

from llmgw.kernel import (
    FALLBACK_OK,
    Call,
    ConfigError,
    Disposition,
    ErrorClass,
    Outcome,
    PluginContext,
    Rejection,
    Request,
    Route,
    Settings,
    Target,
    hookimpl,
)
from llmgw.kernel.config import Model

#: Provider-wide failures: the next target of the same provider would fail the same way.
_PROVIDER_WIDE = {
    ErrorClass.QUOTA_EXHAUSTED: "has no quota left",
    ErrorClass.AUTH_ERROR: "rejected the API key",
}


class ChainEntry(Model):
    """One fallback target."""

    provider: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    """Provider of the fallback target."""
    model: str = Field(min_length=1)
    """Model of the fallback target."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Output bound for this target (default: the primary's; a caller's max_tokens wins)."""

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.model}"


class FallbackPlugin:
    """Appends fallback targets to routes and advises the kernel to use them."""

    class Config(Model):
        """The ``fallback:`` section."""

        chains: dict[str, list[ChainEntry]] = Field(default_factory=dict)
        """Per task class, the targets tried in order after its primary (each panel member's
        own chain, skipping the panel's models)."""
        on_content_refused: bool = False
        """Fall back when a model refuses or a provider filters the content."""
        larger_context: list[str] = Field(default_factory=list)
        """`provider/model` keys, among a route's targets (a primary or a `chains` entry),
        worth trying after `context_length_exceeded`; the route's other targets are then
        skipped. A key no route holds is never tried: add it to the class's chain
        (check-config warns). Default: none."""
        provider_hold_s: float = Field(default=60.0, ge=0, le=86_400)
        """After a provider answered quota_exhausted or auth_error, seconds during which
        new routes try its targets after every other provider's (0: only within one
        request)."""

        @model_validator(mode="after")
        def _check(self, info: ValidationInfo) -> FallbackPlugin.Config:
            settings = (info.context or {}).get("settings")
            check_chains(self, settings if isinstance(settings, Settings) else None)
            return self

    def __init__(self, ctx: PluginContext) -> None:
        self.ctx = ctx
        self.cfg: FallbackPlugin.Config = ctx.config or FallbackPlugin.Config()
        self.larger_context = frozenset(self.cfg.larger_context)
        self._warned: set[str] = set()
        #: Provider -> (monotonic time the mark ends, the class that set it).
        self._held: dict[str, tuple[float, ErrorClass]] = {}

    # --- routes -------------------------------------------------------------------------

    @hookimpl(wrapper=True)
    def resolve_route(
        self, request: Request, settings: Settings
    ) -> Generator[None, Route | None, Route | None]:
        route = yield
        if route is None:
            return None
        return self.amend(route, request)

    def amend(self, route: Route, request: Request | None = None) -> Route:
        """``route`` with its class's chain appended (to each member, for a panel), and
        the targets of a provider held by an earlier request (quota, key) moved last."""
        chain = self.cfg.chains.get(route.task_class)
        held = self._held_now()
        if not chain and not held:
            return route
        explicit = request.max_tokens if request is not None else None

        def amended(targets: tuple[Target, ...], skip: set[str]) -> tuple[Target, ...]:
            if chain:
                targets = self._extend(targets, chain, explicit, skip)
            return _defer(targets, held) if held else targets

        if not route.is_panel:
            return replace(route, targets=amended(route.targets, set()))
        panel_keys = {t.key for m in route.members for t in m.targets}
        members = tuple(replace(m, targets=amended(m.targets, panel_keys)) for m in route.members)
        return replace(route, members=members)

    def _held_now(self) -> set[str]:
        """Providers marked by an earlier request whose mark has not run out."""
        if not self._held:
            return set()
        now = self.ctx.clock.monotonic()
        for provider in [p for p, (until, _) in self._held.items() if until <= now]:
            del self._held[provider]
        return set(self._held)

    def _extend(
        self,
        targets: tuple[Target, ...],
        chain: list[ChainEntry],
        explicit_max_tokens: int | None,
        skip: set[str],
    ) -> tuple[Target, ...]:
        if not targets:
            return targets
        primary = targets[0]
        taken = skip | {t.key for t in targets}
        registered = self._registered()
        added: list[Target] = []
        for i, entry in enumerate(chain):
            if entry.key in taken:
                continue
            if registered is not None and entry.provider not in registered:
                self._warn_inactive(entry)
                continue
            taken.add(entry.key)
            max_tokens = explicit_max_tokens or entry.max_tokens or primary.max_tokens
            added.append(Target(entry.provider, entry.model, max_tokens, label=f"fallback[{i}]"))
        return (*targets, *added)

    def _registered(self) -> set[str] | None:
        try:
            return set(self.ctx.gateway().providers)
        except RuntimeError:
            return None

    def _warn_inactive(self, entry: ChainEntry) -> None:
        if entry.key not in self._warned:
            self._warned.add(entry.key)
            self.ctx.log.warning(
                "fallback.inactive_target",
                target=entry.key,
                why=f"provider {entry.provider!r} is not enabled in plugins:; skipped",
            )

    # --- per attempt --------------------------------------------------------------------

    @hookimpl
    def preflight(self, call: Call) -> Rejection | None:
        target = call.target
        if target is None or not call.history:
            return None
        for earlier, outcome in call.history:
            if outcome.refused_here:
                continue  # never answered: says nothing of the account
            why = _PROVIDER_WIDE.get(outcome.error_class) if outcome.error_class else None
            if why and earlier.provider == target.provider:
                return Rejection(
                    outcome.error_class or ErrorClass.PROVIDER_UNAVAILABLE,
                    f"skipped {target.key}: provider {target.provider} {why} "
                    "earlier in this request",
                    fallback=True,
                )
        overflowed = any(
            o.error_class is ErrorClass.CONTEXT_LENGTH_EXCEEDED for _, o in call.history
        )
        if overflowed and target.key not in self.larger_context:
            return Rejection(
                ErrorClass.CONTEXT_LENGTH_EXCEEDED,
                f"skipped {target.key}: not listed in fallback.larger_context",
                fallback=True,
            )
        return None

    @hookimpl
    def after_call(self, call: Call, outcome: Outcome) -> Disposition | None:
        if call.target is None:
            return None
        if outcome.ok:
            self._held.pop(call.target.provider, None)  # it answered: the account works
        if outcome.ok or outcome.error_class is None:
            return None
        cls = outcome.error_class
        if cls in _PROVIDER_WIDE and self.cfg.provider_hold_s > 0:
            until = self.ctx.clock.monotonic() + self.cfg.provider_hold_s
            self._held[call.target.provider] = (until, cls)
        if cls in FALLBACK_OK:
            return Disposition("fallback", reason=cls.value)
        if cls is ErrorClass.CONTENT_REFUSED and self.cfg.on_content_refused:
            return Disposition("fallback", reason="content refused; on_content_refused is on")
        if cls is ErrorClass.CONTEXT_LENGTH_EXCEEDED and any(
            t.key in self.larger_context for t in call.route.targets[call.target_index + 1 :]
        ):
            return Disposition("fallback", reason="context too long; a larger window follows")
        return None

    @hookimpl
    def report_info(self) -> dict[str, Any]:
        registered = self._registered()
        chains = {
            name: [
                {
                    "target": e.key,
                    **({"max_tokens": e.max_tokens} if e.max_tokens else {}),
                    **(
                        {"inactive": "provider not enabled"}
                        if registered is not None and e.provider not in registered
                        else {}
                    ),
                }
                for e in chain
            ]
            for name, chain in sorted(self.cfg.chains.items())
        }
        now = self.ctx.clock.monotonic()
        held = {
            provider: {"reason": cls.value, "skipped_for_s": round(until - now, 1)}
            for provider, (until, cls) in sorted(self._held.items())
            if until > now
        }
        info: dict[str, Any] = {
            "chains": chains,
            "on_content_refused": self.cfg.on_content_refused,
            "larger_context": sorted(self.larger_context),
            "provider_hold_s": self.cfg.provider_hold_s,
            "held_providers": held,
        }
        warnings = self._inactive_warnings(registered) if registered is not None else []
        warnings += self._unreachable_larger()
        if warnings:
            info["warnings"] = warnings
        return info

    def _unreachable_larger(self) -> list[str]:
        """larger_context entries that no route holds (no task class, member or chain
        names them): they are never tried, whatever overflows."""
        try:
            settings = self.ctx.gateway().settings
        except RuntimeError:
            return []
        held = {key for chain in self.cfg.chains.values() for key in (e.key for e in chain)}
        for spec in settings.task_classes.values():
            held.update(f"{m.provider}/{m.model}" for m in spec.members or ())
            if spec.provider and spec.model:
                held.add(f"{spec.provider}/{spec.model}")
        return [
            f"fallback.larger_context[{i}]: {key} is in no task class and no chain, so it "
            "is never tried; add it to the chain of each class that may overflow"
            for i, key in enumerate(self.cfg.larger_context)
            if key not in held
        ]

    def _inactive_warnings(self, registered: set[str]) -> list[str]:
        """One line per chain or larger_context entry whose provider no enabled plugin
        registers: such an entry is skipped, so the chain is shorter than it reads."""
        entries = [
            (f"fallback.chains.{name}[{i}]", e.provider)
            for name, chain in sorted(self.cfg.chains.items())
            for i, e in enumerate(chain)
        ]
        entries += [
            (f"fallback.larger_context[{i}]", key.split("/", 1)[0])
            for i, key in enumerate(self.cfg.larger_context)
        ]
        out = []
        for path, provider in entries:
            if provider in registered:
                continue
            import difflib  # only for this report: not part of every start

            close = difflib.get_close_matches(provider, sorted(registered), n=1)
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else "enable its plugin in plugins: or remove the entry"
            )
            out.append(
                f"{path}: provider {provider!r} is not registered by any enabled plugin, "
                f"so this entry is skipped; {hint}"
            )
        return out


def check_chains(cfg: FallbackPlugin.Config, settings: Settings | None) -> None:
    """Refuse unknown task classes, repeated entries and entries equal to a primary.

    Raised as :class:`ConfigError` (pydantic lets it through) so the message names the
    exact entry, e.g. ``fallback.chains.quick_answer[1]``.
    """
    file = settings.file_label if settings is not None else None
    for key in cfg.larger_context:
        if key.count("/") != 1:
            raise ConfigError(
                f"{key!r} is not a provider/model key",
                file=file,
                path="fallback.larger_context",
                fix="write entries as provider/model",
            )
    for name, chain in cfg.chains.items():
        base = f"fallback.chains.{name}"
        primaries: set[str] = set()
        if settings is not None:
            spec = settings.task_classes.get(name)
            if spec is None:
                valid = ", ".join(sorted(settings.task_classes))
                raise ConfigError(
                    f"unknown task class {name!r}",
                    file=file,
                    path=base,
                    fix=f"use one of the task classes: {valid}",
                )
            if spec.members:
                primaries = {f"{m.provider}/{m.model}" for m in spec.members}
            else:
                primaries = {f"{spec.provider}/{spec.model}"}
        seen: dict[str, int] = {}
        for i, entry in enumerate(chain):
            path = f"{base}[{i}]"
            if entry.key in primaries:
                what = "a member of this panel" if len(primaries) > 1 else "the class's primary"
                raise ConfigError(
                    f"{entry.key} is {what}; a chain that falls back to it is a cycle",
                    file=file,
                    path=path,
                    fix="remove this entry or pick another model",
                )
            if entry.key in seen:
                raise ConfigError(
                    f"{entry.key} is listed twice in this chain (first at [{seen[entry.key]}])",
                    file=file,
                    path=path,
                    fix="remove the repeated entry",
                )
            seen[entry.key] = i


def _defer(targets: tuple[Target, ...], held: set[str]) -> tuple[Target, ...]:
    """``targets`` with those of a held provider last, in their order, when another
    provider's target can go first: tried only if nothing before them answers (the probe
    that clears the mark), never skipped."""
    first = tuple(t for t in targets if t.provider not in held)
    if not first or len(first) == len(targets):
        return targets
    return first + tuple(t for t in targets if t.provider in held)
