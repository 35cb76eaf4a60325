"""The ``ledger`` section of routing.yaml and the environment variables that override it.

Kept apart from the plugin so that ``llmgw spend`` and the loader's ``essential`` check
can resolve the path and caps without building a gateway.

- ``LLM_GATEWAY_LEDGER``: 1/true/yes/on (default) or 0/false/no/off; or, as the original
  product read it, a file path (a value with a ``/`` or ending ``.db``): the ledger is
  on, in that file.
- ``LLM_GATEWAY_LEDGER_PATH`` > a path in ``LLM_GATEWAY_LEDGER`` > ``ledger.path``
  (relative to routing.yaml) > ``platformdirs.user_data_dir("llm-gateway-mcp")/ledger.db``.
- ``LLM_GATEWAY_CAP_TOTAL_MONTHLY`` > ``ledger.caps.total_monthly_usd``;
  ``LLM_GATEWAY_CAP_<PROVIDER>_MONTHLY`` > ``ledger.caps.providers.<provider>``
  (``<PROVIDER>`` is the provider name upper-cased, other characters as ``_``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from llmgw.kernel import ConfigError, Settings
from llmgw.kernel.config import MAX_USD, Model

from .ledger_store import Caps

APP_NAME = "llm-gateway-mcp"
LEDGER_ENV = "LLM_GATEWAY_LEDGER"
PATH_ENV = "LLM_GATEWAY_LEDGER_PATH"
TOTAL_CAP_ENV = "LLM_GATEWAY_CAP_TOTAL_MONTHLY"
_CAP_ENV = re.compile(r"^LLM_GATEWAY_CAP_([A-Z0-9_]+)_MONTHLY$")
_ON = frozenset({"1", "true", "yes", "on"})
_OFF = frozenset({"0", "false", "no", "off"})
MICRO = 1_000_000


def env_name(provider: str) -> str:
    """``LLM_GATEWAY_CAP_<PROVIDER>_MONTHLY`` for a provider name."""
    return f"LLM_GATEWAY_CAP_{re.sub(r'[^A-Z0-9]', '_', provider.upper())}_MONTHLY"


def known_providers(settings: Settings) -> set[str]:
    """Every provider named in the file (task classes, providers:, prices:, sections)."""
    return {p for p, _ in settings.declared_models()} | set(settings.providers)


class CapsConfig(Model):
    """``ledger.caps``: monthly caps in USD (UTC months)."""

    total_monthly_usd: Decimal | None = Field(default=None, ge=0, le=MAX_USD)
    """Cap in USD on everything spent in a UTC month; LLM_GATEWAY_CAP_TOTAL_MONTHLY wins."""
    providers: dict[str, Decimal] = Field(default_factory=dict)
    """Cap in USD per provider and UTC month, e.g. {openai: 20};
    LLM_GATEWAY_CAP_<PROVIDER>_MONTHLY wins."""

    @field_validator("providers")
    @classmethod
    def _providers(cls, caps: dict[str, Decimal], info: ValidationInfo) -> dict[str, Decimal]:
        for name, cap in caps.items():
            if not cap.is_finite() or not 0 <= cap <= MAX_USD:
                raise ValueError(f"providers.{name} must be between 0 and {MAX_USD:,}, got {cap}")
        settings = (info.context or {}).get("settings")
        if settings is not None:
            known = known_providers(settings)
            for name in caps:
                if name not in known:
                    raise ValueError(
                        f"caps.providers names {name!r}, which no task class or provider "
                        f"section uses; known providers: {', '.join(sorted(known))}"
                    )
        return caps


class LedgerConfig(Model):
    """Section ``ledger`` of routing.yaml."""

    path: str | None = None
    """The SQLite ledger file (relative to routing.yaml); LLM_GATEWAY_LEDGER_PATH wins.
    Default: the user data dir of llm-gateway-mcp (platformdirs), ledger.db."""
    caps: CapsConfig = Field(default_factory=CapsConfig)
    """Monthly spend caps; any cap makes the ledger essential (it cannot be removed)."""
    lease_s: float = Field(default=600.0, gt=0, validate_default=True)
    """Seconds a reservation is held; at start, older open reservations (a crashed
    process) become unknown and stay charged. Must exceed gateway.deadline_s."""
    busy_timeout_s: float = Field(default=5.0, gt=0, le=120)
    """How long to wait for another process's write lock before refusing the call."""
    hold_ahead: int = Field(default=8, ge=0, le=1000)
    """How many more attempts' worst cases a reservation also holds for its provider: the
    next attempts to it are then covered by money already reserved on disk and go out
    without a disk write of their own (each gets its entry right after, drawn from the
    hold). A hold takes at most a quarter of what a cap leaves, is given back when unused
    for hold_idle_s and at shutdown, and a process that dies keeps it charged as unknown,
    as any reservation. 0: every attempt waits for its own reservation's commit."""
    hold_idle_s: float = Field(default=30.0, gt=0)
    """Seconds without an attempt after which this gateway gives a hold back. With
    busy_timeout_s, must be shorter than lease_s."""

    @field_validator("lease_s")
    @classmethod
    def _lease(cls, lease: float, info: ValidationInfo) -> float:
        settings = (info.context or {}).get("settings")
        if settings is not None and lease <= settings.gateway.deadline_s:
            raise ValueError(
                f"lease_s ({lease}) must be longer than gateway.deadline_s "
                f"({settings.gateway.deadline_s}): a live call's reservation must not expire"
            )
        return lease

    @model_validator(mode="after")
    def _idle_within_lease(self) -> LedgerConfig:
        if self.hold_idle_s + self.busy_timeout_s >= self.lease_s:
            raise ValueError(
                f"hold_idle_s ({self.hold_idle_s}) plus busy_timeout_s "
                f"({self.busy_timeout_s}) must be shorter than lease_s ({self.lease_s}): a "
                "hold kept past its lease would be charged as unknown"
            )
        return self


def ledger_enabled(env: Mapping[str, str]) -> bool:
    """``LLM_GATEWAY_LEDGER``; raises :class:`ConfigError` on a value it cannot read."""
    raw = env.get(LEDGER_ENV, "").strip().lower()
    if not raw or raw in _ON or _env_path(env) is not None:
        return True
    if raw in _OFF:
        return False
    raise ConfigError(
        f"{LEDGER_ENV}={env[LEDGER_ENV]!r} is not understood",
        file="environment",
        path=LEDGER_ENV,
        fix=f"use 1 (ledger on, the default), 0 (off), or a file path ({PATH_ENV} also "
        "sets the file)",
    )


def _env_path(env: Mapping[str, str]) -> Path | None:
    """A file path given in ``LLM_GATEWAY_LEDGER`` (the original product's form)."""
    raw = env.get(LEDGER_ENV, "").strip()
    if "/" in raw or "\\" in raw or raw.lower().endswith((".db", ".sqlite", ".sqlite3")):
        return Path(raw).expanduser()
    return None


def ledger_path(settings: Settings, config: LedgerConfig | None) -> Path:
    """Where the ledger lives (see the module docstring for the order)."""
    raw = settings.env.get(PATH_ENV, "").strip()
    if raw:
        return Path(raw).expanduser()
    from_switch = _env_path(settings.env)
    if from_switch is not None:  # read as LLM_GATEWAY_LEDGER_PATH is
        return from_switch
    if config is not None and config.path:
        p = Path(config.path).expanduser()
        return p if p.is_absolute() else settings.base_dir / p
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME)) / "ledger.db"


def _usd_env(env: Mapping[str, str], var: str) -> int | None:
    raw = env.get(var, "").strip()
    if not raw:
        return None
    try:
        value = Decimal(raw.removeprefix("$"))
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or value < 0 or value > MAX_USD:
        raise ConfigError(
            f"{var}={raw!r} is not a dollar amount between 0 and {MAX_USD:,}",
            file="environment",
            path=var,
            fix=f"set {var} to a number of US dollars >= 0 (e.g. 25 or 12.50), or unset it",
        )
    return int(value * MICRO)


def resolve_caps(settings: Settings, config: LedgerConfig | None) -> tuple[Caps, dict[str, str]]:
    """The caps in force (env over config) and, per scope, where each came from.

    Raises :class:`ConfigError` naming the variable for an unreadable value or a
    variable naming no configured provider (a typo must not leave a cap unenforced).
    """
    env = settings.env
    caps_cfg = config.caps if config is not None else CapsConfig()
    origin: dict[str, str] = {}
    total = _usd_env(env, TOTAL_CAP_ENV)
    if total is not None:
        origin["total"] = TOTAL_CAP_ENV
    elif caps_cfg.total_monthly_usd is not None:
        total = int(caps_cfg.total_monthly_usd * MICRO)
        origin["total"] = "ledger.caps.total_monthly_usd"
    providers: dict[str, int] = {}
    for name, cap in caps_cfg.providers.items():
        providers[name] = int(cap * MICRO)
        origin[f"provider:{name}"] = f"ledger.caps.providers.{name}"
    known = known_providers(settings)
    by_env: dict[str, str] = {}
    for p in sorted(known):
        other = by_env.setdefault(env_name(p), p)
        if other != p and env_name(p) in env:
            # One variable, two providers: whichever it capped, the other would run
            # uncapped, and which one would depend on the hash seed.
            raise ConfigError(
                f"{env_name(p)} names two providers, {other!r} and {p!r}",
                file="environment",
                path=env_name(p),
                fix="cap them in routing.yaml (ledger.caps.providers) instead, or rename "
                "one of the providers",
            )
    for var in sorted(env):
        m = _CAP_ENV.match(var)
        if m is None or var == TOTAL_CAP_ENV:
            continue
        value = _usd_env(env, var)
        if value is None:
            continue
        provider = by_env.get(var)
        if provider is None:
            raise ConfigError(
                f"{var} sets a cap for provider {m.group(1).lower()!r}, which routing.yaml "
                "does not use",
                file="environment",
                path=var,
                fix="fix the provider part of the name (known: "
                + ", ".join(env_name(p) for p in sorted(known))
                + ") or unset it",
            )
        providers[provider] = value
        origin[f"provider:{provider}"] = var
    return Caps(total, providers), origin


def caps_hint(settings: Settings, raw_section: Any) -> str | None:
    """A reason when any cap is set, without raising (for the loader's essential check)."""
    env = settings.env
    for var, value in env.items():
        if _CAP_ENV.match(var) and value.strip():
            return f"a monthly spend cap is set ({var})"
    caps = raw_section.get("caps") if isinstance(raw_section, Mapping) else None
    if isinstance(caps, Mapping):
        if caps.get("total_monthly_usd") is not None:
            return "a monthly spend cap is set (ledger.caps.total_monthly_usd)"
        if caps.get("providers"):
            return "a monthly spend cap is set (ledger.caps.providers)"
    return None
