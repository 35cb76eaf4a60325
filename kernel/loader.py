"""Loading the plugins named in ``plugins:``, in that order, and nothing else.

Each name is an entry point in group ``llmgw`` or a path to a ``.py`` file. Nothing that
is installed but unnamed is imported, except the gateway's own built-in plugins, which
are asked whether they are essential (the kill switch always; the ledger when a cap is
set) and added with a warning when the list leaves them out.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy
import structlog
from pydantic import BaseModel, ValidationError

from . import hookspecs
from .config import Settings, pydantic_errors
from .errors import ConfigError, PluginError
from .hooks import call_order
from .types import Clock

if TYPE_CHECKING:
    from .gateway import Gateway

GROUP = hookspecs.PROJECT
OWN_DISTRIBUTION = "llm-gateway-mcp"

log = structlog.get_logger("llmgw.loader")


@dataclass
class PluginContext:
    """What a plugin class receives when the gateway builds it.

    ``config`` is the plugin's validated section (an instance of its ``Config`` model) or
    None when the plugin declares none. ``gateway()`` returns the gateway once it is
    built (for plugins that make calls of their own, such as roles).
    """

    name: str
    config: Any
    settings: Settings
    clock: Clock
    rng: random.Random
    log: Any
    _gateway: list[Gateway] = field(default_factory=list, repr=False)
    check_only: bool = False
    """True when the gateway is built only to be checked (``llmgw check-config``): a
    plugin validates what it would open or create (a file, a directory) but leaves no
    state behind."""

    @property
    def env(self) -> Any:
        return self.settings.env

    def gateway(self) -> Gateway:
        if not self._gateway:
            raise RuntimeError("the gateway is not built yet; call gateway() from a hook")
        return self._gateway[0]


@dataclass(frozen=True)
class LoadedPlugin:
    """A plugin as registered: its name, object and where it came from."""

    name: str
    obj: object
    origin: str
    distribution: str | None = None
    version: str | None = None
    essential_reason: str | None = None


_DIST_INFO: dict[str, tuple[str, str]] = {}


def dist_info(ep: EntryPoint) -> tuple[str, str]:
    """(distribution name, version) of an entry point, parsed once per installed dist.

    Reading ``Distribution.metadata`` parses the METADATA file each time (~0.5 ms); the
    loader asks for it per entry point, so it is cached by the distribution's location.
    """
    dist = ep.dist
    if dist is None:
        return ("?", "?")
    key = str(getattr(dist, "_path", id(dist)))
    found = _DIST_INFO.get(key)
    if found is None:
        found = (dist.metadata["Name"], dist.version)
        _DIST_INFO[key] = found
    return found


def _dist_name(ep: EntryPoint) -> str:
    return dist_info(ep)[0]


def scan_entry_points() -> tuple[dict[str, EntryPoint], dict[str, list[str]]]:
    """One pass over the installed distributions (3-6 ms with ~100 installed):
    entry points in group ``llmgw`` by name, ours winning where a name is also elsewhere,
    and the names that several distributions provide, with those distributions (the
    loader refuses to load such a name rather than pick one silently)."""
    found: dict[str, EntryPoint] = {}
    by_name: dict[str, set[str]] = {}
    for ep in entry_points(group=GROUP):
        dist = _dist_name(ep)
        by_name.setdefault(ep.name, set()).add(dist)
        if ep.name not in found or dist == OWN_DISTRIBUTION:
            found[ep.name] = ep
    return found, {n: sorted(d) for n, d in by_name.items() if len(d) > 1}


def available_entry_points() -> dict[str, EntryPoint]:
    """Entry points in group ``llmgw`` by name (:func:`scan_entry_points`)."""
    return scan_entry_points()[0]


def describe_entry_point(ep: EntryPoint) -> str:
    dist = ep.dist
    if dist is None:
        return ep.name
    name, version = dist_info(ep)
    return f"{ep.name} ({name} {version})"


def _is_path(name: str) -> bool:
    return name.endswith(".py") or "/" in name or "\\" in name


def _load_file(name: str, base: Path) -> tuple[str, ModuleType]:
    path = Path(name)
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise PluginError(name, f"file {path} not found", fix="paths are relative to routing.yaml")
    stem = path.stem
    unique = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    mod_name = f"llmgw_local_{stem}_{unique}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(name, "cannot import this file as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a sys.exit() at import ends nothing but this
        sys.modules.pop(mod_name, None)
        raise PluginError(name, f"importing it failed: {type(exc).__name__}: {exc}") from None
    return stem, module


def _target(obj: Any) -> Any:
    """A module may point at its plugin class or factory with a ``plugin`` attribute."""
    if isinstance(obj, ModuleType) and hasattr(obj, "plugin"):
        return obj.plugin
    return obj


def _essential_reason(obj: Any, settings: Settings) -> str | None:
    check: Callable[[Settings], str | None] | None = getattr(obj, "essential", None)
    if check is None:
        return None
    return check(settings)


def _validate_section(name: str, target: Any, settings: Settings) -> Any:
    model = getattr(target, "Config", None)
    section = settings.section(name)
    label = settings.file_label
    if model is None or not (isinstance(model, type) and issubclass(model, BaseModel)):
        if section is not None:
            raise ConfigError(
                f"plugin {name!r} takes no settings",
                file=label,
                path=name,
                fix=f"remove the `{name}:` section",
            )
        return None
    try:
        return model.model_validate(
            section if section is not None else {}, context={"settings": settings}
        )
    except ValidationError as exc:
        raise pydantic_errors(exc, file=label, prefix=name, plugin=name) from None


def _instantiate(name: str, target: Any, ctx: PluginContext) -> object:
    if isinstance(target, ModuleType):
        return target
    if isinstance(target, type) or inspect.isfunction(target):
        try:
            built: object = target(ctx)
            return built
        except (ConfigError, PluginError):
            raise
        except Exception as exc:
            raise PluginError(name, f"could not start: {type(exc).__name__}: {exc}") from None
    return target  # an already-built plugin object


class _PluginManager(pluggy.PluginManager):
    """pluggy's manager, not looking for hook implementations among dunder attributes.

    ``register`` inspects every name in ``dir(plugin)`` with ``inspect.getattr_static``;
    two thirds of a plugin object's names are ``object``'s dunders. No hookspec is a dunder
    name, and a dunder method is not taken for a hook even with ``specname`` (documented
    in docs/plugins.md)."""

    def parse_hookimpl_opts(self, plugin: object, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            return None
        return super().parse_hookimpl_opts(plugin, name)


def load_plugins(
    settings: Settings,
    *,
    clock: Clock,
    rng: random.Random,
    gateway_ref: list[Gateway],
    extra: dict[str, object] | None = None,
    check_only: bool = False,
) -> tuple[pluggy.PluginManager, list[LoadedPlugin]]:
    """Build a plugin manager holding exactly the configured plugins, in config order.

    :param extra: plugin objects to place by name (tests); a name in ``plugins:`` that
        matches a key here uses that object instead of an entry point.
    """
    extra = extra or {}
    eps, clashes = scan_entry_points()
    names = list(settings.plugins)

    # Built-in plugins that refuse to be left out (kill switch, ledger with caps).
    added: list[tuple[str, str]] = []
    for ep_name, ep in eps.items():
        if ep_name in names or ep.dist is None or _dist_name(ep) != OWN_DISTRIBUTION:
            continue
        try:
            reason = _essential_reason(_target(ep.load()), settings)
        except Exception as exc:
            raise PluginError(
                ep_name,
                f"built-in plugin failed to import: {type(exc).__name__}: {exc}",
                fix="reinstall llm-gateway-mcp",
            ) from None
        if reason:
            added.append((ep_name, reason))
    for ep_name, reason in reversed(added):
        names.insert(0, ep_name)
        log.warning(
            "plugin.essential_added",
            plugin=ep_name,
            reason=reason,
            note="this plugin cannot be removed by config",
        )

    pm = _PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    loaded: list[LoadedPlugin] = []
    base = settings.base_dir
    for entry in names:
        dist = version = None
        if entry in extra:
            name, raw, origin = entry, extra[entry], "test object"
        elif _is_path(entry):
            name, raw = _load_file(entry, base)
            origin = f"file {entry}"
        elif entry in eps:
            if entry in clashes:
                raise PluginError(
                    entry,
                    f"several installed packages provide a plugin of this name: "
                    f"{', '.join(clashes[entry])}",
                    fix="uninstall all but one of them (a plugin that shadows a built-in, "
                    "such as kill_switch or ledger, is never loaded silently)",
                )
            ep = eps[entry]
            try:
                raw = ep.load()
            except Exception as exc:
                raise PluginError(
                    entry,
                    f"importing {ep.value} failed: {type(exc).__name__}: {exc}",
                    fix="reinstall the package that provides it",
                ) from None
            name = entry
            if ep.dist is not None:
                dist, version = dist_info(ep)
            origin = f"entry point {ep.value}"
        else:
            choices = ", ".join(describe_entry_point(e) for e in eps.values()) or "none installed"
            raise PluginError(
                entry,
                "no such plugin",
                fix=f"available plugins: {choices}; or give a path to a .py file",
            )
        if any(p.name == name for p in loaded):
            raise PluginError(name, "two entries in plugins: load a plugin with this name")
        target = _target(raw)
        config = _validate_section(name, target, settings)
        ctx = PluginContext(
            name=name,
            config=config,
            settings=settings,
            clock=clock,
            rng=rng,
            log=structlog.get_logger(f"llmgw.plugin.{name}"),
            _gateway=gateway_ref,
            check_only=check_only,
        )
        obj = _instantiate(name, target, ctx)
        loaded.append(
            LoadedPlugin(name, obj, origin, dist, version, _essential_reason(target, settings))
        )

    # pluggy calls the last registered first: register reversed so config order = call order.
    for plugin in reversed(loaded):
        try:
            pm.register(plugin.obj, name=plugin.name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(plugin.name, f"invalid hook implementation: {exc}") from None
        if not pm.get_hookcallers(plugin.obj):
            # Listed, loaded, and would silently do nothing: a guard that guards nothing.
            raise PluginError(
                plugin.name,
                "has no hook implementations, so it would do nothing",
                fix="mark its hook functions with @hookimpl (from llmgw.kernel import "
                "hookimpl), or remove it from plugins:",
            )
    for name, hook in vars(pm.hook).items():
        if name.startswith("_") or hook.has_spec():
            continue
        for impl in hook.get_hookimpls():
            if not impl.optionalhook:
                import difflib  # only for the error: not part of every start

                close = difflib.get_close_matches(name, hook_names(), n=1)
                raise PluginError(
                    impl.plugin_name,
                    f"has a hook named {name!r}, which is no hook of the gateway"
                    + (f" (did you mean {close[0]!r}?)" if close else ""),
                    fix=f"the hooks are {', '.join(hook_names())} (docs/plugins.md)",
                )
    check_hooks(pm, [p.name for p in loaded])
    _check_sections(settings, {p.name for p in loaded}, set(eps))
    return pm, loaded


def _check_sections(settings: Settings, loaded: set[str], installed: set[str]) -> None:
    """A section must belong to a loaded plugin, or to an installed one that is disabled."""
    from .config import KERNEL_SECTIONS

    for name in settings.sections:
        if name in loaded:
            continue
        if name in installed:
            log.info("config.section_of_disabled_plugin", section=name)
            continue
        import difflib  # only for the error: not part of every start

        known = sorted(KERNEL_SECTIONS | loaded | installed)
        close = difflib.get_close_matches(name, known, n=1)
        fix = f"did you mean `{close[0]}`?" if close else f"known sections: {', '.join(known)}"
        raise ConfigError(
            "unknown section: no kernel setting and no plugin of this name",
            file=settings.file_label,
            path=name,
            fix=fix,
        )


def check_hooks(pm: pluggy.PluginManager, order: list[str]) -> None:
    """Refuse async wrappers and any ``tryfirst``/``trylast`` that contradicts ``order``."""
    for hook in _hook_names():
        impls = call_order(pm, hook)
        for impl in impls:
            if hook not in hookspecs.ASYNC_HOOKS and (
                inspect.iscoroutinefunction(impl.function)
                or inspect.isasyncgenfunction(impl.function)
            ):
                raise PluginError(
                    impl.plugin_name,
                    f"its {hook} hook is async, but {hook} is called as a plain function "
                    "(an async one would never run)",
                    fix=f"write `def {hook}(...)`, not `async def`",
                )
            if hook in hookspecs.ASYNC_HOOKS and (impl.wrapper or impl.hookwrapper):
                raise PluginError(
                    impl.plugin_name,
                    f"{hook} is async and cannot be a wrapper (pluggy ends a wrapper before "
                    "an async body runs)",
                    fix="drop wrapper=True; use before_call and after_call instead",
                )
        plain = [
            i
            for i in impls
            if not (i.wrapper or i.hookwrapper) and not (hook == "resolve_route" and i.trylast)
        ]
        actual = [i.plugin_name for i in plain]
        expected = [n for n in order if n in set(actual)]
        if actual != expected:
            culprit = next(
                (
                    i
                    for i in plain
                    if (i.tryfirst or i.trylast)
                    and actual.index(i.plugin_name) != expected.index(i.plugin_name)
                ),
                plain[0],
            )
            mark = "tryfirst" if culprit.tryfirst else "trylast"
            raise PluginError(
                culprit.plugin_name,
                f"its {hook} hook is marked {mark}, which contradicts its place in plugins: "
                f"(configured order {expected}, effective order {actual})",
                fix=f"move {culprit.plugin_name!r} in plugins: to where it should run, "
                f"or remove {mark} from its hook",
            )


def _hook_names() -> list[str]:
    return [
        n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "llmgw_spec")
    ]


def hook_names() -> list[str]:
    """Every hook the kernel defines, in source order."""
    src = inspect.getsource(hookspecs)
    names = _hook_names()
    return sorted(names, key=lambda n: src.index(f"def {n}("))
