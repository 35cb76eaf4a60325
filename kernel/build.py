"""Building a gateway: load the plugins, register providers and tools, check routes."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from .config import Settings
from .errors import ConfigError, PluginError
from .gateway import Gateway
from .loader import load_plugins
from .logs import configure_logging
from .tools import BUILTIN_TOOLS, ToolSpec
from .types import Clock, Provider, SystemClock

log = structlog.get_logger("llmgw.build")


def build_gateway(
    settings: Settings,
    *,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    extra_plugins: Mapping[str, object] | None = None,
    check_only: bool = False,
) -> Gateway:
    """Load the configured plugins, register their providers, check the routes.

    Raises :class:`ConfigError` or :class:`PluginError` with a message that names the
    file, the path and the fix. ``check_only``: built to be checked, not served (plugins
    create no files; see :class:`~llmgw.kernel.loader.PluginContext`).
    """
    if not structlog.is_configured():
        # Library use: never let the default structlog config print to stdout, which
        # belongs to the MCP stdio protocol.
        configure_logging(settings.gateway.log_level)
    for old, new in settings.renamed:
        log.warning(
            "config.original_section",
            section=old,
            read_as=new,
            file=settings.file_label,
            fix=f"rename `{old}` to `{new}` (the original product's name still works)",
        )
    clock = clock or SystemClock()
    ref: list[Gateway] = []
    pm, loaded = load_plugins(
        settings,
        clock=clock,
        rng=rng or random.Random(),
        gateway_ref=ref,
        extra=dict(extra_plugins or {}),
        check_only=check_only,
    )
    gateway = Gateway(settings, pm, loaded, clock=clock)
    ref.append(gateway)

    current: list[str] = []

    def register(provider: Provider) -> None:
        name = getattr(provider, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(current[0], "registered a provider without a name")
        if name in gateway.providers:
            raise PluginError(
                current[0],
                f"registers provider {name!r}, already registered by "
                f"{gateway.provider_origin[name]!r}",
                fix="remove one of the two plugins from plugins:",
            )
        gateway.providers[name] = provider
        gateway.provider_origin[name] = current[0]

    for impl in gateway.hooks.impls("register_providers"):
        current[:] = [impl.plugin_name]
        _call_registration(impl, register)

    def register_tool(tool: ToolSpec) -> None:
        if tool.name in tool_origin:
            first = tool_origin[tool.name]
            raise PluginError(
                current[0],
                f"registers tool {tool.name!r}, already registered by "
                + ("the same plugin" if first == current[0] else f"plugin {first!r}"),
                fix="give one of the tools another name, or remove one plugin from plugins:",
            )
        if tool.name in BUILTIN_TOOLS:
            raise PluginError(
                current[0],
                f"registers tool {tool.name!r}, a name of the gateway's own tools",
                fix="give the tool another name",
            )
        if not inspect.iscoroutinefunction(tool.fn):
            raise PluginError(current[0], f"tool {tool.name!r}: its function must be `async def`")
        if "ctx" in inspect.signature(tool.fn).parameters:
            raise PluginError(
                current[0],
                f"tool {tool.name!r} has a parameter named 'ctx', which the MCP server "
                "passes itself",
                fix="rename the parameter",
            )
        gateway.tools.append(tool)
        tool_origin[tool.name] = current[0]

    tool_origin: dict[str, str] = {}
    for impl in gateway.hooks.impls("register_tools"):
        current[:] = [impl.plugin_name]
        _call_registration(impl, register_tool)

    _check_route_providers(settings, gateway)
    routers = [i for i in gateway.hooks.impls("resolve_route") if not (i.hookwrapper or i.wrapper)]
    if settings.task_classes and not routers:
        raise ConfigError(
            "no enabled plugin resolves routes: every call would fail",
            file=settings.file_label,
            path="plugins",
            fix="add `router` (the default router) to plugins:, or a plugin of yours "
            "that implements resolve_route",
        )
    return gateway


def _call_registration(impl: Any, register: Callable[[Any], None]) -> None:
    """Run one registration hook; its failure is a :class:`PluginError` naming it."""
    try:
        impl.function(register=register)
    except (PluginError, ConfigError):
        raise
    except Exception as exc:
        # The traceback goes to the (redacting) log; the message names no value.
        log.exception("hook.failed", hook=impl.function.__name__, plugin=impl.plugin_name)
        raise PluginError(
            impl.plugin_name,
            f"its {impl.function.__name__} hook raised {type(exc).__name__} (traceback in "
            "the log above)",
            fix="fix the plugin, or remove it from plugins:",
        ) from None


def _check_route_providers(settings: Settings, gateway: Gateway) -> None:
    known = sorted(gateway.providers)
    hint = f"registered providers: {', '.join(known)}" if known else "no provider plugin is enabled"
    for name, spec in settings.task_classes.items():
        targets = (
            [
                (f"task_classes.{name}.members[{i}].provider", m.provider)
                for i, m in enumerate(spec.members)
            ]
            if spec.members
            else [(f"task_classes.{name}.provider", spec.provider or "")]
        )
        for path, provider in targets:
            if provider not in gateway.providers:
                raise ConfigError(
                    f"unknown provider {provider!r}",
                    file=settings.file_label,
                    path=path,
                    fix=f"{hint}; add the provider's plugin to plugins: or fix the name",
                )
    for name in settings.providers:
        if name not in gateway.providers:
            raise ConfigError(
                f"settings for provider {name!r}, which no enabled plugin registers",
                file=settings.file_label,
                path=f"providers.{name}",
                fix=f"{hint}; enable its plugin or remove the section",
            )
