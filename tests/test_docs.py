"""Meta-tests: every hook is documented in docs/plugins.md and exercised by a test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmgw.kernel.loader import hook_names

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_has_a_section_in_the_plugin_guide(hook: str) -> None:
    guide = (ROOT / "docs" / "plugins.md").read_text()
    assert f"### {hook}\n" in guide, f"docs/plugins.md has no section for hook {hook!r}"
    assert re.search(rf"def {hook}\(", guide), f"docs/plugins.md shows no signature of {hook!r}"


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_implemented_by_some_test(hook: str) -> None:
    pattern = re.compile(rf"def {hook}\(")
    for path in (ROOT / "tests").rglob("*.py"):
        if path.name == "test_docs.py":
            continue
        if pattern.search(path.read_text()):
            return
    pytest.fail(f"no test implements hook {hook!r}")


def test_the_guide_documents_no_hook_that_does_not_exist() -> None:
    guide = (ROOT / "docs" / "plugins.md").read_text()
    section_names = set(re.findall(r"^### (\w+)\n", guide, flags=re.M))
    hooks = set(hook_names())
    assert section_names & hooks == hooks
    assert not {n for n in section_names - hooks if n.islower() and "_" in n}


def _readme_block_after(marker: str) -> str:
    readme = (ROOT / "README.md").read_text()
    after = readme.split(marker, 1)[1]
    return after.split("```sh\n", 1)[1].split("\n```", 1)[0].strip()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = _readme_block_after("**Run the tests**")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == command


def test_readme_demo_command_runs_llmgw_demo() -> None:
    assert _readme_block_after("**Run the gateway's main job offline**").endswith("llmgw demo")


def test_configuration_reference_is_generated_from_the_models() -> None:
    from llmgw.kernel.configdoc import render

    current = (ROOT / "docs" / "configuration.md").read_text()
    assert current == render(), (
        "docs/configuration.md is out of date: run "
        "`python -m llmgw.kernel.configdoc > docs/configuration.md`"
    )


def test_every_config_key_has_a_description() -> None:
    from llmgw.kernel.configdoc import render

    undocumented = [
        line.split("`")[1]
        for line in render().splitlines()
        if line.startswith("| `") and line.rstrip().endswith("|  |")
    ]
    assert not undocumented, f"add a docstring under each of these fields: {undocumented}"


def test_every_environment_variable_read_by_the_code_is_documented() -> None:
    from llmgw.kernel.configdoc import ENV_VARS

    documented = {name for name, _, _ in ENV_VARS}
    used: set[str] = set()
    for folder in ("kernel", "plugins"):
        for path in (ROOT / folder).rglob("*.py"):
            used.update(re.findall(r"\bLLM_GATEWAY_[A-Z_]+[A-Z]\b", path.read_text()))
    prefixes = {n.split("<")[0] for n in documented if "<" in n}
    missing = {
        n for n in used if n not in documented and not any(n.startswith(p) for p in prefixes)
    }
    assert not missing, f"document these in kernel/configdoc.py ENV_VARS: {sorted(missing)}"


def test_the_env_example_names_every_documented_variable() -> None:
    """The original product's instructions say `cp .env.example .env`; every variable of
    docs/configuration.md is in it, none with a value that could be a key."""
    from llmgw.kernel.configdoc import ENV_VARS

    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    for name, _who, _what in ENV_VARS:
        assert name in text, name
    for line in text.splitlines():
        if line.endswith("_API_KEY=") or line.startswith("#") or not line.strip():
            continue
        assert "KEY" not in line and "TOKEN" not in line, line
