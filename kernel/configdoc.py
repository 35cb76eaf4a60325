"""Generate ``docs/configuration.md`` from the config models, so it cannot drift.

Run ``python -m llmgw.kernel.configdoc > docs/configuration.md``; a test compares the
file with this output. Sections come from the kernel's :class:`Settings` and from the
``Config`` model of every built-in plugin (entry points of this distribution).
"""

from __future__ import annotations

import ast
import inspect
import itertools
import textwrap
import types
import typing
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .config import GatewaySpec, PriceSpec, ProviderSpec, TaskClassSpec

OWN_DISTRIBUTION = "llm-gateway-mcp"

#: Every environment variable the gateway reads, with what it does.
ENV_VARS: list[tuple[str, str, str]] = [
    ("OPENAI_API_KEY", "openai", "API key of OpenAI (sent only in the Authorization header)."),
    ("ANTHROPIC_API_KEY", "anthropic", "API key of Anthropic."),
    ("GEMINI_API_KEY", "gemini", "API key of Google Gemini (sent as x-goog-api-key)."),
    ("DEEPSEEK_API_KEY", "deepseek", "API key of DeepSeek."),
    ("OPENAI_BASE_URL", "openai", "Base URL, including /v1; `providers.openai.base_url` wins."),
    ("ANTHROPIC_BASE_URL", "anthropic", "Base URL (no /v1); `providers.anthropic.base_url` wins."),
    ("GEMINI_BASE_URL", "gemini", "Base URL; `providers.gemini.base_url` wins."),
    ("DEEPSEEK_BASE_URL", "deepseek", "Base URL; `providers.deepseek.base_url` wins."),
    ("LLM_GATEWAY_CONFIG", "kernel", "Path of routing.yaml when --config is not given."),
    (
        "LLM_GATEWAY_LOG_LEVEL",
        "kernel",
        "Log level of the JSON logs on stderr. DEBUG adds the HTTP clients' and SDKs' own "
        "debug lines, which can hold request bodies (prompts); keys are always redacted.",
    ),
    ("LLM_GATEWAY_HTTP_TOKEN", "kernel", "Bearer token required by `llmgw serve --http`."),
    (
        "LLM_GATEWAY_DISABLED",
        "kill_switch",
        "Refuse every call. Any value but 0, false, no, off or empty counts as on; read from "
        "the environment and from the .env beside routing.yaml on every call.",
    ),
    (
        "LLM_GATEWAY_EXPENSIVE_DISABLED",
        "kill_switch",
        "Refuse calls whose worst case exceeds `kill_switch.expensive_threshold_usd` (same "
        "values and sources as LLM_GATEWAY_DISABLED).",
    ),
    (
        "LLM_GATEWAY_LEDGER",
        "ledger",
        "`0` turns the ledger off (refused while a cap is set); a file path (as the "
        "original product took it) turns it on in that file, after LLM_GATEWAY_LEDGER_PATH.",
    ),
    ("LLM_GATEWAY_LEDGER_PATH", "ledger", "Ledger file; overrides `ledger.path`."),
    (
        "LLM_GATEWAY_CAP_TOTAL_MONTHLY",
        "ledger",
        "Monthly cap in USD over all providers; overrides `ledger.caps.total_monthly_usd`.",
    ),
    (
        "LLM_GATEWAY_CAP_<PROVIDER>_MONTHLY",
        "ledger",
        "Monthly cap in USD for one provider (e.g. LLM_GATEWAY_CAP_OPENAI_MONTHLY).",
    ),
]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map of {_type_name(args[1])}" if len(args) == 2 else "map"
    if tp is type(None):
        return "null"
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
    else:
        value = field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(see below)"
    text = repr(value) if not isinstance(value, bool | type(None)) else str(value).lower()
    if value is None:
        text = "null"
    return f"`{text}`"


def _nested_models(tp: Any) -> list[tuple[str, type[BaseModel]]]:
    """Models reachable from a type, with the key suffix they appear under."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _nested_models(args[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in args for m in _nested_models(a)]
    if origin in (list, tuple, set, frozenset) and args:
        return [(f"[]{s}", m) for s, m in _nested_models(args[0])]
    if origin is dict and len(args) == 2:
        return [(f".<name>{s}", m) for s, m in _nested_models(args[1])]
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return [("", tp)]
    return []


def field_docstrings(model: type[BaseModel]) -> dict[str, str]:
    """The string literal under each field of a model class (and its bases), by name."""
    found: dict[str, str] = {}
    for klass in reversed(model.__mro__):
        if not (inspect.isclass(klass) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        if not isinstance(body, ast.ClassDef):
            continue
        stmts = body.body
        for first, second in itertools.pairwise(stmts):
            if (
                isinstance(first, ast.AnnAssign)
                and isinstance(first.target, ast.Name)
                and isinstance(second, ast.Expr)
                and isinstance(second.value, ast.Constant)
                and isinstance(second.value.value, str)
            ):
                found[first.target.id] = inspect.cleandoc(second.value.value)
    return found


def model_rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every field, nested models flattened."""
    rows: list[tuple[str, str, str, str]] = []
    docs = field_docstrings(model)
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        desc = (field.description or docs.get(name, "")).replace("\n", " ").strip()
        rows.append((key, _type_name(field.annotation), _default(field), desc))
        for suffix, sub in _nested_models(field.annotation):
            rows.extend(model_rows(sub, f"{key}{suffix}"))
    return rows


def plugin_models() -> list[tuple[str, type[BaseModel] | None, str]]:
    """(plugin name, Config model or None, docstring) of every built-in plugin."""
    found: list[tuple[str, type[BaseModel] | None, str]] = []
    for ep in sorted(entry_points(group="llmgw"), key=lambda e: e.name):
        if ep.dist is None or ep.dist.metadata["Name"] != OWN_DISTRIBUTION:
            continue
        target = ep.load()
        config = getattr(target, "Config", None)
        doc = inspect.getdoc(target) or ""
        model = config if inspect.isclass(config) and issubclass(config, BaseModel) else None
        found.append((ep.name, model, doc.split("\n\n")[0].replace("\n", " ")))
    return found


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    out = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key, tp, default, desc in rows:
        out.append(f"| `{key}` | {tp} | {default} | {desc} |")
    return out


def render() -> str:
    out: list[str] = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m llmgw.kernel.configdoc > docs/configuration.md`;",
        "     tests/test_docs.py fails when this file and the config models differ. -->",
        "",
        "`routing.yaml` is read from `--config PATH`, else `$LLM_GATEWAY_CONFIG`, else",
        "`./routing.yaml`. A `.env` file beside it fills in environment variables that are not",
        "already set. Any string may use `${VAR}` or `${VAR:-default}`. A literal API key in",
        "the file is refused. Unknown keys are errors, reported with the file, the path inside",
        "it and a fix. `llmgw check-config` validates a file without serving.",
        "",
        "## Kernel sections",
        "",
        "### `plugins`",
        "",
        "Ordered list of plugins to enable: entry-point names in group `llmgw`, or paths to",
        "`.py` files relative to routing.yaml. Config order is call order. Required.",
        "",
        "### `version`",
        "",
        "Free-form version of your policy, shown by `llm_routing_info`. Default `1`.",
        "",
        "### `task_classes`",
        "",
        "Map of task class name to a single target or a panel (`members`). Required.",
        "",
        *_table(model_rows(TaskClassSpec, "task_classes.<name>")),
        "",
        "### `providers`",
        "",
        "Connection settings per provider name. Keys never go here.",
        "",
        *_table(model_rows(ProviderSpec, "providers.<name>")),
        "",
        "### `prices`",
        "",
        "Price overrides, keyed `provider/model`, in USD per million tokens. They win over",
        "the bundled genai-prices data.",
        "",
        *_table(model_rows(PriceSpec, "prices.<provider/model>")),
        "",
        "### `gateway`",
        "",
        *_table(model_rows(GatewaySpec, "gateway")),
        "",
        "## Plugin sections",
        "",
        "Each plugin owns the section named after it. A section for an installed plugin that",
        "`plugins:` does not enable is ignored.",
        "",
    ]
    for name, model, doc in plugin_models():
        out += [f"### `{name}`", ""]
        if doc:
            out += [doc, ""]
        if model is None:
            out += ["No settings.", ""]
        else:
            out += [*_table(model_rows(model, name)), ""]
    out += [
        "## Environment variables",
        "",
        "| variable | used by | meaning |",
        "| --- | --- | --- |",
        *[f"| `{n}` | {who} | {what} |" for n, who, what in ENV_VARS],
        "",
        "## Section names of the original product",
        "",
        "A routing.yaml written for the original product keeps working: its sections are",
        "read as this gateway's and each is logged once (`config.original_section`) with",
        "its new name. A section given under both names is refused.",
        "",
        "| original | read as |",
        "| --- | --- |",
        *[f"| {old} | {new} |" for old, new in ORIGINAL_SECTIONS],
        "",
    ]
    return "\n".join(out)


#: The original product's routing.yaml sections and what they are here
#: (:func:`llmgw.kernel.config.original_sections`).
ORIGINAL_SECTIONS = (
    ("`defaults.<task_class>`", "`task_classes.<task_class>`"),
    ("`cost_preflight`", "`cost` (`warn_usd`, `block_usd`)"),
    ("`visibility.<task_class>`", "`independence.panels.<task_class>` (`mode`, `enforce`)"),
    (
        "`fallback.<task_class>`",
        "`fallback.chains.<task_class>`; an alternate written `provider/model` is "
        "`{provider, model}`",
    ),
    (
        "`orchestration`",
        "refused, with where each part goes: the `roles` plugin's `candidates` per step "
        "(the Thinker is the planner), `instructions`, `depth`",
    ),
    ("no `plugins:` list", "refused, with the list to add (config order is call order)"),
    ("`LLM_GATEWAY_LEDGER=<path>`", "the ledger on, in that file"),
)


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
