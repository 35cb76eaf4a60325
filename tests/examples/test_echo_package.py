"""The example third-party provider package, installed with pip, works with no kernel change."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

from llmgw.kernel.cli import main

CONFIG = """
plugins: [kill_switch, router, echo]
echo: {prefix: parrot}
task_classes:
  parrot: {provider: echo, model: echo-1, max_tokens: 16}
"""


def test_the_package_is_installed_as_an_entry_point() -> None:
    eps = {ep.name: ep for ep in entry_points(group="llmgw")}
    assert "echo" in eps, "install it: pip install ./examples/llmgw-echo-provider"
    assert eps["echo"].dist is not None
    assert eps["echo"].dist.metadata["Name"] == "llmgw-echo"


@pytest.mark.anyio
async def test_route_through_the_echo_package_over_stdio_mcp(tmp_path: Path) -> None:
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(CONFIG)
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "llmgw.kernel.cli", "serve", "--config", str(cfg)]
    )
    async with Client(params) as client:
        r = await client.call_tool("llm_route", {"task_class": "parrot", "prompt": "hello"})
        env = r.structured_content
        assert env["status"] == "success"
        assert env["data"]["text"] == "parrot[echo-1]: hello"
        assert env["meta"]["provider"] == "echo"
        assert env["meta"]["cost_usd_approx"] > 0


def test_plugins_lists_it_with_its_distribution(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(CONFIG)
    assert main(["plugins", "--config", str(cfg)]) == 0
    assert "llmgw-echo 0.1.0" in capsys.readouterr().out
    cfg.write_text(CONFIG.replace(", echo]", "]").replace("echo: {prefix: parrot}\n", ""))
    assert main(["plugins", "--available", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "echo (llmgw-echo 0.1.0)" in out
    assert "add `- echo` to plugins:" in out


def test_removing_it_from_plugins_fails_config_check_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(CONFIG.replace(", echo]", "]"))
    assert main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "task_classes.parrot.provider" in err
    assert "unknown provider 'echo'" in err
    assert "add the provider's plugin to plugins:" in err
