"""The loader: config order, unknown names, tryfirst contradictions, local files."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from llmgw.kernel import PluginError, Request, hookimpl, load_settings
from llmgw.kernel.build import build_gateway
from llmgw.kernel.loader import hook_names
from llmgw.kernel.testing import FakeProvider, FakeProviderPlugin, gateway_from_yaml

BASE = """
plugins: [{names}]
task_classes:
  quick: {{provider: fake, model: m1}}
"""


def test_unknown_plugin_lists_available_names_and_distributions() -> None:
    with pytest.raises(PluginError) as err:
        gateway_from_yaml(
            BASE.format(names="router, fake, no_such_plugin"), providers=[FakeProvider()]
        )
    text = str(err.value)
    assert "'no_such_plugin'" in text
    assert "no such plugin" in text
    assert "router (llm-gateway-mcp" in text


def test_tryfirst_that_contradicts_the_list_fails_naming_the_plugin() -> None:
    class Eager:
        @hookimpl(tryfirst=True)
        async def before_call(self, call: Any) -> None:
            return None

    class Plain:
        @hookimpl
        async def before_call(self, call: Any) -> None:
            return None

    with pytest.raises(PluginError) as err:
        gateway_from_yaml(
            BASE.format(names="plain, eager, router, fake"),
            providers=[FakeProvider()],
            extra_plugins={"plain": Plain(), "eager": Eager()},
        )
    assert "'eager'" in str(err.value)
    assert "tryfirst" in str(err.value)
    assert "contradicts" in str(err.value)


def test_tryfirst_that_agrees_with_the_list_is_accepted() -> None:
    class Eager:
        @hookimpl(tryfirst=True)
        async def before_call(self, call: Any) -> None:
            return None

    gw = gateway_from_yaml(
        BASE.format(names="eager, kill_switch, router, fake"),
        providers=[FakeProvider()],
        extra_plugins={"eager": Eager()},
    )
    assert gw.hooks.impls("before_call")[0].plugin_name == "eager"


def test_wrapper_on_an_async_hook_is_refused() -> None:
    class Wrapper:
        @hookimpl(wrapper=True)
        def before_call(self, call: Any) -> Any:
            return (yield)

    with pytest.raises(PluginError) as err:
        gateway_from_yaml(
            BASE.format(names="w, router, fake"),
            providers=[FakeProvider()],
            extra_plugins={"w": Wrapper()},
        )
    assert "cannot be a wrapper" in str(err.value)


def test_misspelled_hook_argument_is_a_plugin_error() -> None:
    class Typo:
        @hookimpl
        def before_call(self, cal: Any) -> None:
            return None

    with pytest.raises(PluginError) as err:
        gateway_from_yaml(
            BASE.format(names="t, router, fake"),
            providers=[FakeProvider()],
            extra_plugins={"t": Typo()},
        )
    assert "'t'" in str(err.value)


@pytest.mark.anyio
async def test_hooks_are_found_by_name_or_specname_and_never_on_dunders() -> None:
    seen: list[str] = []

    class Named:
        @hookimpl(specname="before_call")
        def _note(self, call: Any) -> None:
            seen.append("specname")

        @hookimpl
        def after_call(self, call: Any) -> None:
            seen.append("name")

        @hookimpl(specname="after_call")
        def __call__(self, call: Any) -> None:  # a dunder is never taken for a hook
            seen.append("dunder")

    g = gateway_from_yaml(
        BASE.format(names="n, router, fake"),
        providers=[FakeProvider()],
        extra_plugins={"n": Named()},
    )
    assert (await g.route(Request("quick", "hi"))).ok
    assert seen == ["specname", "name"]
    await g.aclose()


def test_local_file_hook_is_loaded_by_path_and_configured(tmp_path: Path) -> None:
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "tagger.py").write_text(
        textwrap.dedent("""
        from llmgw.kernel import hookimpl
        from llmgw.kernel.config import Model

        class Tagger:
            class Config(Model):
                tag: str

            def __init__(self, ctx):
                self.tag = ctx.config.tag

            @hookimpl
            async def before_call(self, call):
                call.meta["tag"] = self.tag

        plugin = Tagger
    """)
    )
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(BASE.format(names="hooks/tagger.py, router, fake") + "tagger: {tag: hello}\n")
    settings = load_settings(cfg, env={})
    gw = build_gateway(settings, extra_plugins={"fake": FakeProviderPlugin(FakeProvider())})
    # kill_switch is essential: added first even though plugins: leaves it out
    assert [p.name for p in gw.plugins] == ["kill_switch", "tagger", "router", "fake"]
    assert gw.plugins[1].origin == "file hooks/tagger.py"

    import anyio

    env = anyio.run(gw.route, Request("quick", "hi"))
    assert env.meta["tag"] == "hello"


def test_missing_local_file_is_reported(tmp_path: Path) -> None:
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(BASE.format(names="nope.py, router"))
    with pytest.raises(PluginError) as err:
        build_gateway(load_settings(cfg, env={}))
    assert "nope.py" in str(err.value)
    assert "not found" in str(err.value)


def test_a_local_file_that_exits_at_import_is_a_plugin_error(tmp_path: Path) -> None:
    """``sys.exit()`` in a hook file's import ended check-config with its exit code and no
    message; it is a plugin error like any other failure at import."""
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(BASE.format(names="exits.py, router"))
    with pytest.raises(PluginError) as err:
        build_gateway(load_settings(cfg, env={}))
    assert "importing it failed: SystemExit: 3" in str(err.value)


def test_a_plugin_section_is_validated_by_the_plugin(tmp_path: Path) -> None:
    from llmgw.kernel import ConfigError

    (tmp_path / "h.py").write_text(
        textwrap.dedent("""
        from llmgw.kernel.config import Model
        class H:
            class Config(Model):
                limit: int = 3
            def __init__(self, ctx):
                pass
        plugin = H
    """)
    )
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(BASE.format(names="h.py, router") + "h: {limit: many}\n")
    with pytest.raises(ConfigError) as err:
        build_gateway(load_settings(cfg, env={}))
    assert "h.limit" in str(err.value)
    assert "plugin 'h'" in str(err.value)


def test_two_plugins_registering_one_provider_name_is_an_error() -> None:
    with pytest.raises(PluginError) as err:
        gateway_from_yaml(
            BASE.format(names="router, fake, fake_too"),
            providers=[FakeProvider()],
            extra_plugins={"fake_too": FakeProviderPlugin(FakeProvider())},
        )
    assert "already registered" in str(err.value)


def test_unlisted_installed_plugins_are_not_loaded() -> None:
    gw = gateway_from_yaml(BASE.format(names="router, fake"), providers=[FakeProvider()])
    names = [p.name for p in gw.plugins]
    assert "openai" not in names
    assert "roles" not in names


def test_hook_names_are_the_documented_specs() -> None:
    assert hook_names() == [
        "register_providers",
        "register_tools",
        "resolve_route",
        "preflight",
        "before_call",
        "after_call",
        "verify",
        "report_info",
        "shutdown",
    ]


class AsyncRegistration:
    @hookimpl
    async def register_providers(self, register: Any) -> None:
        register(FakeProvider("mine"))


def test_an_async_implementation_of_a_sync_hook_is_refused_at_load() -> None:
    """It never ran (a coroutine nobody awaited), and the error blamed the provider name."""
    with pytest.raises(PluginError) as err:
        gateway_from_yaml(
            BASE.format(names="router, fake, mine"),
            providers=[FakeProvider()],
            extra_plugins={"mine": AsyncRegistration()},
        )
    text = str(err.value)
    assert "plugin 'mine'" in text and "register_providers hook is async" in text
    assert "write `def register_providers(...)`" in text


class Misspelt:
    @hookimpl
    def before_cal(self, call: Any) -> None:
        pass


def test_a_misspelt_hook_names_its_plugin_and_the_hook_it_resembles() -> None:
    with pytest.raises(PluginError) as err:
        gateway_from_yaml(
            BASE.format(names="router, fake, typo"),
            providers=[FakeProvider()],
            extra_plugins={"typo": Misspelt()},
        )
    text = str(err.value)
    assert "plugin 'typo'" in text and "'before_cal'" in text
    assert "did you mean 'before_call'?" in text


class RaisingRegistration:
    @hookimpl
    def register_providers(self, register: Any) -> None:
        raise RuntimeError("no")


def test_a_registration_hook_that_raises_is_a_plugin_error() -> None:
    with pytest.raises(PluginError) as err:
        gateway_from_yaml(
            BASE.format(names="router, fake, r"),
            providers=[FakeProvider()],
            extra_plugins={"r": RaisingRegistration()},
        )
    assert "plugin 'r'" in str(err.value) and "raised RuntimeError" in str(err.value)


class Tools:
    def __init__(self, spec: Any) -> None:
        self.spec = spec

    @hookimpl
    def register_tools(self, register: Any) -> None:
        register(self.spec)


async def _tool_fn(prompt: str) -> Any:
    return None


async def _tool_ctx(ctx: str) -> Any:
    return None


def _sync_tool(prompt: str) -> Any:
    return None


@pytest.mark.parametrize(
    ("name", "fn", "needle"),
    [
        ("llm_route", _tool_fn, "a name of the gateway's own tools"),
        ("mine", _tool_ctx, "parameter named 'ctx'"),
        ("mine", _sync_tool, "must be `async def`"),
    ],
)
def test_tools_that_cannot_be_served_are_refused(name: str, fn: Any, needle: str) -> None:
    """A tool named llm_route was dropped silently; one with a `ctx` parameter passed
    check-config and crashed `llmgw serve`."""
    from llmgw.kernel.tools import ToolSpec

    with pytest.raises(PluginError) as err:
        gateway_from_yaml(
            BASE.format(names="router, fake, t"),
            providers=[FakeProvider()],
            extra_plugins={"t": Tools(ToolSpec(name, "d", fn))},
        )
    assert needle in str(err.value)


def test_a_tool_registered_by_two_plugins_names_the_first() -> None:
    """It blamed the second plugin for registering the tool "twice"."""
    from llmgw.kernel.tools import ToolSpec

    spec = ToolSpec("mine", "d", _tool_fn)
    with pytest.raises(PluginError) as err:
        gateway_from_yaml(
            BASE.format(names="router, fake, t1, t2"),
            providers=[FakeProvider()],
            extra_plugins={"t1": Tools(spec), "t2": Tools(spec)},
        )
    text = str(err.value)
    assert "plugin 't2'" in text and "already registered by plugin 't1'" in text


def test_a_hook_file_without_any_hookimpl_is_refused(tmp_path: Path) -> None:
    """A guard whose functions lacked @hookimpl loaded fine and let every prompt through."""
    (tmp_path / "guard.py").write_text(
        "from llmgw.kernel import Rejection, ErrorClass\n"
        "def preflight(call):\n"
        "    return Rejection(ErrorClass.POLICY_REFUSED, 'no')\n"
    )
    (tmp_path / "routing.yaml").write_text(BASE.format(names="guard.py, router, fake"))
    with pytest.raises(PluginError) as err:
        build_gateway(
            load_settings(tmp_path / "routing.yaml", env={}),
            extra_plugins={"fake": FakeProviderPlugin(FakeProvider())},
        )
    assert "plugin 'guard'" in str(err.value) and "no hook implementations" in str(err.value)
    assert "@hookimpl" in str(err.value)
