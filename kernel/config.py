"""Reading ``routing.yaml``: the kernel's own sections, interpolation and clear errors.

The kernel validates the sections it owns (``plugins``, ``task_classes``,
``providers``, ``prices``, ``gateway``). Every other top-level section belongs to the
plugin of the same name, which validates it with its own model when it is loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError, ConfigErrors

CONFIG_ENV = "LLM_GATEWAY_CONFIG"
DEFAULT_CONFIG = "routing.yaml"
KERNEL_SECTIONS = frozenset(
    {"version", "plugins", "task_classes", "providers", "prices", "gateway"}
)

_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]*$"


#: Bounds that keep every amount the ledger stores in range (integer micro-dollars in a
#: SQLite INTEGER): no real cap, price or output bound comes near them.
MAX_USD = Decimal(1_000_000_000)
MAX_PRICE_PER_MTOK = Decimal(1_000_000)
MAX_TOKENS_BOUND = 10_000_000
#: The most values a config file may expand to (its aliases counted as often as used).
MAX_YAML_VALUES = 200_000


class Model(BaseModel):
    """Base of every config model: frozen, unknown keys refused."""

    # Field docstrings document each key (docs/configuration.md is generated from them by
    # llmgw.kernel.configdoc). They are not loaded at run time: pydantic's
    # use_attribute_docstrings reads source files and costs ~3 ms per model at start-up.
    model_config = ConfigDict(frozen=True, extra="forbid")


class TargetSpec(Model):
    """A provider and model, with an optional output bound."""

    provider: str = Field(pattern=_NAME)
    """Provider name, as registered by a provider plugin."""
    model: str = Field(min_length=1)
    """Model name, as the provider spells it."""
    max_tokens: PositiveInt | None = Field(default=None, le=MAX_TOKENS_BOUND)
    """Output bound for this target; default: the task class's max_tokens."""


class TaskClassSpec(Model):
    """One task class: a single target, or a panel of ``members``."""

    description: str = ""
    """Shown to MCP clients in the task_class enum's description."""
    provider: str | None = Field(default=None, pattern=_NAME)
    """Provider of a single-target class."""
    model: str | None = Field(default=None, min_length=1)
    """Model of a single-target class."""
    max_tokens: PositiveInt = Field(default=1024, le=MAX_TOKENS_BOUND)
    """Output bound sent with every request of this class (callers may lower or raise it)."""
    system: str | None = None
    """Default system prompt when the caller gives none."""
    members: list[TargetSpec] | None = None
    """Panel members (at least 2); they answer the same prompt in parallel."""
    quorum: PositiveInt | None = None
    """Members that must succeed for a panel to succeed; default: a strict majority, >= 2."""
    min_distinct_providers: PositiveInt = 1
    """A panel must span at least this many providers (checked at load and before dispatch)."""

    @model_validator(mode="after")
    def _shape(self) -> TaskClassSpec:
        if self.members is None:
            if not self.provider or not self.model:
                raise ValueError(
                    "a task class needs `provider` and `model`, or a list of `members` for a panel"
                )
            if self.quorum is not None:
                raise ValueError("`quorum` only applies to a panel (a class with `members`)")
            return self
        if self.provider or self.model:
            raise ValueError("a panel lists `members`; remove `provider`/`model` from it")
        if len(self.members) < 2:
            raise ValueError("a panel needs at least 2 members")
        if self.quorum is not None and self.quorum > len(self.members):
            raise ValueError(
                f"quorum {self.quorum} is larger than the panel ({len(self.members)} members)"
            )
        keys = [f"{m.provider}/{m.model}" for m in self.members]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"a panel lists the same model twice: {', '.join(dupes)}")
        distinct = len({m.provider for m in self.members})
        if distinct < self.min_distinct_providers:
            raise ValueError(
                f"min_distinct_providers is {self.min_distinct_providers} but the members "
                f"use {distinct} provider(s); add members from other providers"
            )
        return self

    @property
    def is_panel(self) -> bool:
        return self.members is not None

    def effective_quorum(self) -> int:
        n = len(self.members or ())
        if self.quorum is not None:
            return self.quorum
        return min(n, max(2, n // 2 + 1))


class ProviderSpec(Model):
    """Connection settings of one provider (keys come from the environment only)."""

    base_url: str | None = None
    """Base URL in the form the provider's SDK documents; overrides <NAME>_BASE_URL."""
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """Per-request timeout in seconds (never beyond the call's remaining deadline)."""
    connect_timeout_s: float = Field(default=10.0, gt=0, le=600)
    """Connection timeout in seconds."""
    key_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    """Name of the environment variable holding the key (default: <NAME>_API_KEY)."""
    models: list[str] = Field(default_factory=list)
    """Extra models that callers may name as override_model."""


class PriceSpec(Model):
    """A price override in USD per million tokens."""

    input_per_mtok: Decimal = Field(ge=0, le=MAX_PRICE_PER_MTOK)
    """USD per million input tokens."""
    output_per_mtok: Decimal = Field(ge=0, le=MAX_PRICE_PER_MTOK)
    """USD per million output tokens (reasoning tokens are billed as output)."""
    cached_input_per_mtok: Decimal | None = Field(default=None, ge=0, le=MAX_PRICE_PER_MTOK)
    """USD per million cached input tokens; default: the input price."""


class GatewaySpec(Model):
    """Kernel-wide limits."""

    deadline_s: float = Field(default=120.0, gt=0, le=3600)
    """One deadline in seconds over all attempts and fallbacks of a tool call."""
    max_attempts_per_target: PositiveInt = Field(default=5, le=20)
    """Hard ceiling on attempts per target, whatever the retry plugin advises."""
    max_prompt_bytes: PositiveInt = Field(default=1_048_576)
    """Largest prompt (and system prompt) accepted, in UTF-8 bytes."""
    max_output_tokens: PositiveInt = Field(default=65_536, le=MAX_TOKENS_BOUND)
    """Largest max_tokens a caller may ask for."""
    max_response_bytes: PositiveInt = Field(default=16 * 1024 * 1024, le=1024 * 1024 * 1024)
    """Largest upstream answer read, in bytes once decompressed (Chat Completions
    providers); a larger one is not read on (an unreadable answer, charged at its worst
    case), so an endpoint cannot fill the gateway's memory."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of `llmgw serve` (LLM_GATEWAY_LOG_LEVEL wins), in any case."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: Any) -> Any:
        # As LLM_GATEWAY_LOG_LEVEL: `debug` is DEBUG.
        return value.strip().upper() if isinstance(value, str) else value


class Settings(Model):
    """The validated kernel part of ``routing.yaml``."""

    version: int | str = 1
    plugins: list[str] = Field(min_length=1)
    task_classes: dict[str, TaskClassSpec] = Field(min_length=1)
    providers: dict[str, ProviderSpec] = Field(default_factory=dict)
    prices: dict[str, PriceSpec] = Field(default_factory=dict)
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)

    _source: Path | None = PrivateAttr(default=None)
    _sections: dict[str, Any] = PrivateAttr(default_factory=dict)
    _env: dict[str, str] = PrivateAttr(default_factory=dict)
    _declared: frozenset[tuple[str, str]] | None = PrivateAttr(default=None)
    _renamed: list[tuple[str, str]] = PrivateAttr(default_factory=list)

    @field_validator("task_classes")
    @classmethod
    def _class_names(cls, value: dict[str, TaskClassSpec]) -> dict[str, TaskClassSpec]:
        for name in value:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_-]*$", name):
                raise ValueError(f"task class name {name!r} must be letters, digits, _ or -")
        return value

    @field_validator("prices")
    @classmethod
    def _price_keys(cls, value: dict[str, PriceSpec]) -> dict[str, PriceSpec]:
        for key in value:
            if key.count("/") != 1:
                raise ValueError(f"price key {key!r} must be 'provider/model'")
        return value

    @field_validator("plugins")
    @classmethod
    def _plugin_list(cls, value: list[str]) -> list[str]:
        dupes = sorted({p for p in value if value.count(p) > 1})
        if dupes:
            raise ValueError(f"plugins lists {', '.join(dupes)} more than once")
        return value

    @property
    def source(self) -> Path | None:
        """The file the settings were read from, if any."""
        return self._source

    @property
    def base_dir(self) -> Path:
        return self._source.parent if self._source else Path.cwd()

    @property
    def env(self) -> Mapping[str, str]:
        """The process environment plus ``.env`` values (which never override it)."""
        return self._env

    def section(self, name: str) -> Any:
        """The raw (interpolated) section owned by plugin ``name``, or None."""
        return self._sections.get(name)

    @property
    def sections(self) -> Mapping[str, Any]:
        return self._sections

    @property
    def renamed(self) -> list[tuple[str, str]]:
        """The original product's section names this file used, each with the name it
        was read as (:func:`original_sections`); logged when a gateway is built."""
        return list(self._renamed)

    def declared_models(self) -> frozenset[tuple[str, str]]:
        """Every (provider, model) named anywhere in the file (computed once)."""
        if self._declared is None:
            self._declared = frozenset(self._collect_declared())
        return self._declared

    def _collect_declared(self) -> set[tuple[str, str]]:
        found: set[tuple[str, str]] = set()
        for spec in self.task_classes.values():
            if spec.members:
                found.update((m.provider, m.model) for m in spec.members)
            elif spec.provider and spec.model:
                found.add((spec.provider, spec.model))
        for pname, pspec in self.providers.items():
            found.update((pname, m) for m in pspec.models)
        for key in self.prices:
            provider, model = key.split("/", 1)
            found.add((provider, model))
        _collect_targets(self._sections, found)
        return found

    @property
    def file_label(self) -> str:
        return str(self._source) if self._source else "<config>"


def _collect_targets(node: Any, found: set[tuple[str, str]]) -> None:
    if isinstance(node, Mapping):
        provider, model = node.get("provider"), node.get("model")
        if isinstance(provider, str) and isinstance(model, str):
            found.add((provider, model))
        for value in node.values():
            _collect_targets(value, found)
    elif isinstance(node, list):
        for value in node:
            _collect_targets(value, found)


# --- locating and reading -------------------------------------------------------------


def config_path(cli_path: str | None, env: Mapping[str, str]) -> Path:
    """``--config PATH``, else ``$LLM_GATEWAY_CONFIG``, else ``./routing.yaml``."""
    if cli_path:
        return Path(cli_path)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return Path(DEFAULT_CONFIG)


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=value`` lines, ``export`` and quotes allowed."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not a name
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the .env file ({type(exc).__name__})",
            file=str(path),
            fix="make it a UTF-8 text file the gateway's user can read, or remove it",
        ) from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        if "=" not in line:
            raise ConfigError(
                "a line is not KEY=value",
                file=str(path),
                path=f"line {lineno}",
                fix="write each variable as NAME=value",
            )
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip()
        quote = value[:1]
        end = value.find(quote, 1) if quote in {"'", '"'} else -1
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif end > 0 and value[end + 1 :].lstrip().startswith("#"):
            value = value[1:end]  # quoted, then a comment
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ConfigError(
                f"{key!r} is not a valid variable name", file=str(path), path=f"line {lineno}"
            )
        values[key] = value
    return values


def effective_env(config_file: Path | None, env: Mapping[str, str] | None) -> dict[str, str]:
    """The environment, plus a ``.env`` beside the config for variables not already set."""
    merged = dict(os.environ if env is None else env)
    if config_file is not None:
        dotenv = config_file.parent / ".env"
        if dotenv.is_file():
            for key, value in read_dotenv(dotenv).items():
                merged.setdefault(key, value)
    return merged


# A literal key in the file is refused: keys live in the environment.
_KEY_PATTERNS = [
    re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{16,}"),
    re.compile(r"\bAIza[0-9A-Za-z_-]{30,}"),
    re.compile(r"\b(?:gsk|xai|pplx|or)-[A-Za-z0-9_-]{20,}"),
]
_SECRET_KEY_NAMES = re.compile(r"(?:^|_)(?:api_?key|key|token|secret|password)$", re.I)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _refuse_literal_secrets(node: Any, path: str, file: str) -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            if (
                isinstance(key, str)
                and _SECRET_KEY_NAMES.search(key)
                and not key.endswith("_env")
                and isinstance(value, str)
                and value
                and not _VAR.fullmatch(value.strip())
            ):
                raise ConfigError(
                    "a literal secret is not allowed in the config file",
                    file=file,
                    path=sub,
                    fix="put the value in the environment (or .env) and write ${VARIABLE}; "
                    "if it is no secret (a pattern, a name), rename the key so it does not "
                    "end in key, token, secret or password",
                )
            _refuse_literal_secrets(value, sub, file)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_literal_secrets(value, f"{path}[{i}]", file)
    elif isinstance(node, str):
        for pattern in _KEY_PATTERNS:
            if pattern.search(node):
                raise ConfigError(
                    "this looks like a literal API key; keys are read from the environment",
                    file=file,
                    path=path,
                    fix="remove it, set the provider's key variable (e.g. OPENAI_API_KEY) "
                    "in the environment or .env",
                )


def interpolate(node: Any, env: Mapping[str, str], path: str, file: str) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string value."""
    if isinstance(node, Mapping):
        return {
            k: interpolate(v, env, f"{path}.{k}" if path else str(k), file) for k, v in node.items()
        }
    if isinstance(node, list):
        return [interpolate(v, env, f"{path}[{i}]", file) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"environment variable {name} is not set",
                file=file,
                path=path,
                fix=f"set {name}, or write ${{{name}:-default}} to give a default",
            )

        return _VAR.sub(sub, node)
    return node


def _check_expansion(data: Any, file: str) -> None:
    """Refuse YAML aliases that refer to themselves or expand past :data:`MAX_YAML_VALUES`
    values (aliases nested in aliases, "billion laughs"): everything that walks the
    config would recurse forever or take hours. Counts every value as often as it is
    reached, without recursion."""
    seen = 0
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(
                f"the file expands to more than {MAX_YAML_VALUES:,} values (YAML aliases "
                "repeated inside aliases)",
                file=file,
                fix="write the repeated parts out, or use fewer nested aliases",
            )
        if isinstance(node, dict | list):
            if id(node) in on_path:
                raise ConfigError(
                    "a YAML alias refers to itself (an anchor used inside its own value)",
                    file=file,
                    fix="remove the alias from inside the anchored value",
                )
            on_path.add(id(node))
            stack.append((node, True))
            stack.extend(
                (child, False) for child in (node.values() if isinstance(node, dict) else node)
            )


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader (libyaml's when present: ~10x faster) refusing a key given twice
    in one mapping: YAML keeps the last silently, so a second ``task_classes:`` dropped
    the first one's classes without a word."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *base``: keys given beside it override the merged ones
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # not hashable: the constructor itself refuses it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, file: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(
            f"invalid YAML: {problem}",
            file=file,
            path=where,
            fix="check indentation and quoting near that line",
        ) from None
    if data is None:
        raise ConfigError("the file is empty", file=file, fix="start from `llmgw init`")
    _check_expansion(data, file)
    if not isinstance(data, dict):
        raise ConfigError(
            f"the top level must be a mapping of sections, not {type(data).__name__}", file=file
        )
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"section name {key!r} must be a string", file=file)
    return data


#: The plugins a config without ``plugins:`` is told to list (the shipped routing.yaml's
#: order, without the roles pipeline, which needs its own section).
SUGGESTED_PLUGINS = (
    "kill_switch, cost, breaker, ledger, retry, fallback, independence, router, "
    "openai, anthropic, gemini, deepseek"
)

#: Keys of the fallback plugin's own section: any other key of an original ``fallback:``
#: section is a task class and its list that class's chain.
_FALLBACK_KEYS = frozenset({"chains", "on_content_refused", "larger_context", "provider_hold_s"})


def original_sections(
    data: dict[str, Any], file: str, renamed: list[tuple[str, str]] | None = None
) -> dict[str, Any]:
    """The original product's section names, read as this gateway's (each appended to
    ``renamed`` as (old, new); a gateway logs them as ``config.original_section``, so its
    routing.yaml keeps working while it is renamed):

    - ``defaults.<task_class>`` is ``task_classes.<task_class>``;
    - ``cost_preflight`` (``warn_usd`` / ``block_usd``) is ``cost``;
    - ``visibility.<task_class>`` (``mode``, ``enforce``) is ``independence.panels``;
    - ``fallback.<task_class>: [alternates]`` is ``fallback.chains.<task_class>``, an
      alternate written ``provider/model`` read as ``{provider, model}``.

    ``orchestration`` is refused with where each of its parts goes (``roles``): its roles
    are this gateway's candidates per step, named differently. A section given under both
    names is refused: which one is meant cannot be guessed."""
    out = dict(data)
    notes = renamed if renamed is not None else []

    def rename(old: str, new: str, value: Any) -> None:
        if new in out:
            raise ConfigError(
                f"both `{old}` (the original product's name) and `{new}` are given",
                file=file,
                path=old,
                fix=f"keep one: move what `{old}` holds into `{new}`",
            )
        del out[old]
        out[new] = value
        notes.append((old, new))

    if "defaults" in out:
        rename("defaults", "task_classes", out["defaults"])
    if "cost_preflight" in out:
        rename("cost_preflight", "cost", out["cost_preflight"])
    if "visibility" in out:
        rename("visibility", "independence", {"panels": out["visibility"]})
    fallback = out.get("fallback")
    if isinstance(fallback, dict) and fallback.keys() - _FALLBACK_KEYS:
        chains = dict(fallback.get("chains") or {})
        moved = sorted(k for k in fallback if k not in _FALLBACK_KEYS)
        for name in moved:
            if name in chains:
                raise ConfigError(
                    f"task class {name!r} has a chain under fallback.chains and another "
                    "directly under fallback (the original product's form)",
                    file=file,
                    path=f"fallback.{name}",
                    fix=f"keep one: fallback.chains.{name}",
                )
            entries = fallback[name]
            chains[name] = (
                [_alternate(e) for e in entries] if isinstance(entries, list) else entries
            )
        out["fallback"] = {
            **{k: v for k, v in fallback.items() if k in _FALLBACK_KEYS},
            "chains": chains,
        }
        notes.extend((f"fallback.{name}", f"fallback.chains.{name}") for name in moved)
    if "orchestration" in out:
        raise ConfigError(
            "`orchestration` is the original product's section; here the pipeline is the "
            "`roles` plugin",
            file=file,
            path="orchestration",
            fix="write it as `roles:` with `candidates: {planner: [...], worker: [...], "
            "verifier: [...]}` ({provider, model} entries; the Thinker is the planner), "
            "`instructions` per role and the `depth` table (docs/configuration.md, roles), "
            "and add `roles` to plugins:",
        )
    return out


def _alternate(entry: Any) -> Any:
    """A fallback alternate written ``provider/model`` as ``{provider, model}``."""
    if isinstance(entry, str) and entry.count("/") == 1:
        provider, model = entry.split("/")
        return {"provider": provider, "model": model}
    return entry


#: The fix for a value of the wrong type, by pydantic's error kind (``int_parsing``:
#: ``int``).
_TYPE_FIXES = {
    "string": "write it as text (quote it if YAML reads it as something else)",
    "int": "write a whole number",
    "float": "write a number",
    "decimal": "write a number",
    "bool": "write true or false",
    "list": "write a list: [a, b] or one `- item` per line",
    "dict": "write a mapping: key: value lines, indented under it",
    "model": "write a mapping: key: value lines, indented under it",
}


def pydantic_errors(
    exc: ValidationError, *, file: str, prefix: str = "", plugin: str | None = None
) -> ConfigErrors:
    """Turn a pydantic error into one line per problem: path, what is wrong, the fix."""
    found: list[ConfigError] = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"] if p != "__root__"]
        parts: list[str] = [prefix] if prefix else []
        for p in loc:
            if p.isdigit() and parts:
                parts[-1] += f"[{p}]"
            else:
                parts.append(p)
        path = ".".join(parts)
        kind = err["type"]
        msg = err["msg"].removeprefix("Value error, ")
        fix = ""
        if kind == "missing" and loc == ["plugins"] and not prefix:
            fix = f"add `plugins: [{SUGGESTED_PLUGINS}]` (config order is call order)"
        elif kind == "missing":
            fix = f"add `{loc[-1] if loc else path}`"
        elif kind == "extra_forbidden":
            msg = "unknown key"
            fix = "remove it or check its spelling against docs/configuration.md"
        elif kind.endswith("_type") or kind.endswith("_parsing"):
            msg = f"{msg} (got {type(err.get('input')).__name__} {err.get('input')!r:.40})"
            fix = _TYPE_FIXES.get(kind.rsplit("_", 1)[0], "")
        elif kind in {"greater_than", "greater_than_equal", "less_than_equal", "less_than"}:
            fix = "use a value in the allowed range"
        elif kind in {"literal_error", "enum"}:
            fix = "use one of the values listed"
        elif kind == "string_pattern_mismatch":
            fix = "write it in the form the pattern shows"
        if not fix:
            fix = f"see `{path or 'the section'}` in docs/configuration.md"
        if plugin:
            msg = f"{msg} (section of plugin {plugin!r})"
        found.append(ConfigError(msg, file=file, path=path, fix=fix))
    return ConfigErrors(found)


def load_settings(
    path: Path | str | None = None,
    *,
    text: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Read and validate the kernel sections of a config file (or YAML text).

    :param path: the file; with ``text`` it only names the source in messages and
        locates ``.env`` and relative plugin paths.
    :param env: the environment to use (default: ``os.environ``); a ``.env`` beside
        the file fills in variables it lacks.
    """
    file_path = Path(path) if path is not None else None
    label = str(file_path) if file_path else "<config>"
    if text is None:
        if file_path is None:
            raise ConfigError("no config file given", fix="pass --config PATH")
        try:
            text = file_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                "file not found",
                file=label,
                fix=f"pass --config PATH, set {CONFIG_ENV}, or run `llmgw init` to write one",
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the file ({type(exc).__name__})", file=label) from None
    merged_env = effective_env(file_path, env)
    raw = parse_yaml(text, label)
    _refuse_literal_secrets(raw, "", label)
    renamed: list[tuple[str, str]] = []
    data = original_sections(interpolate(raw, merged_env, "", label), label, renamed)
    kernel_part = {k: v for k, v in data.items() if k in KERNEL_SECTIONS}
    try:
        settings = Settings.model_validate(kernel_part)
    except ValidationError as exc:
        raise pydantic_errors(exc, file=label) from None
    settings._source = file_path
    settings._sections = {k: v for k, v in data.items() if k not in KERNEL_SECTIONS}
    settings._env = merged_env
    settings._renamed = renamed
    return settings
