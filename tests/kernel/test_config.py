"""Config: every invalid file gives one clear error naming its path, never a traceback."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from llmgw.kernel import ConfigError, GatewayError, Request, load_settings
from llmgw.kernel.build import build_gateway
from llmgw.kernel.cli import main
from llmgw.kernel.config import config_path
from llmgw.kernel.logs import reset_logging
from llmgw.kernel.testing import FakeProvider, FakeProviderPlugin

GOOD = """
plugins: [router, fake]
task_classes:
  quick_answer: {provider: fake, model: m1, max_tokens: 100}
"""

#: Nine levels of ten aliases each: a billion values once expanded.
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n"
    for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)

# (name, yaml, expected path fragment, expected words in the message)
INVALID = [
    ("missing task_classes", "plugins: [router]\n", "task_classes", "Field required"),
    (
        "missing plugins",
        "task_classes:\n  q: {provider: fake, model: m}\n",
        "plugins",
        "Field required",
    ),
    (
        "negative max_tokens",
        "plugins: [router, fake]\ntask_classes:\n  quick_answer: {provider: fake, model: m, "
        "max_tokens: -5}\n",
        "task_classes.quick_answer.max_tokens",
        "greater than 0",
    ),
    (
        "max_tokens not a number",
        "plugins: [router, fake]\ntask_classes:\n"
        "  q: {provider: fake, model: m, max_tokens: lots}\n",
        "task_classes.q.max_tokens",
        "integer",
    ),
    (
        "unknown provider",
        "plugins: [router, fake]\ntask_classes:\n  q: {provider: nosuch, model: m}\n",
        "task_classes.q.provider",
        "unknown provider 'nosuch'",
    ),
    (
        "misspelled key",
        "plugins: [router, fake]\ntask_classes:\n  q: {provider: fake, modle: m}\n",
        "task_classes.q.modle",
        "unknown key",
    ),
    (
        "literal api key",
        "plugins: [router, fake]\nproviders:\n"
        "  fake: {base_url: 'http://x', api_key: abcdefgh12345}\n"
        "task_classes:\n  q: {provider: fake, model: m}\n",
        "providers.fake.api_key",
        "literal secret",
    ),
    (
        "key-shaped literal anywhere",
        "plugins: [router, fake]\ntask_classes:\n  q: {provider: fake, model: m, "
        "description: 'sk-proj-ABCDEFGHIJKLMNOPQRSTUV'}\n",
        "task_classes.q.description",
        "literal API key",
    ),
    (
        "panel of one",
        "plugins: [router, fake]\ntask_classes:\n  p:\n    members: [{provider: fake, model: m}]\n",
        "task_classes.p",
        "at least 2 members",
    ),
    (
        "quorum above members",
        "plugins: [router, fake]\ntask_classes:\n  p:\n    members: [{provider: fake, model: a}, "
        "{provider: fake, model: b}]\n    quorum: 3\n",
        "task_classes.p",
        "quorum 3 is larger",
    ),
    (
        "too few distinct providers",
        "plugins: [router, fake]\ntask_classes:\n  p:\n    members: [{provider: fake, model: a}, "
        "{provider: fake, model: b}]\n    min_distinct_providers: 2\n",
        "task_classes.p",
        "min_distinct_providers is 2",
    ),
    (
        "unset variable",
        "plugins: [router, fake]\nproviders:\n  fake: {base_url: '${NOPE_URL}'}\n"
        "task_classes:\n  q: {provider: fake, model: m}\n",
        "providers.fake.base_url",
        "NOPE_URL is not set",
    ),
    ("yaml syntax", "plugins: [router, fake\ntask_classes: {}\n", "line", "invalid YAML"),
    ("top level list", "- a\n- b\n", "", "top level must be a mapping"),
    (
        "unknown section",
        "plugins: [router, fake]\ntask_clases:\n  q: {provider: fake, model: m}\n"
        "task_classes:\n  q: {provider: fake, model: m}\n",
        "task_clases",
        "unknown section",
    ),
    (
        "zero deadline",
        "plugins: [router, fake]\ngateway: {deadline_s: 0}\n"
        "task_classes:\n  q: {provider: fake, model: m}\n",
        "gateway.deadline_s",
        "greater than 0",
    ),
    (
        "plugin listed twice",
        "plugins: [router, fake, router]\ntask_classes:\n  q: {provider: fake, model: m}\n",
        "plugins",
        "more than once",
    ),
    (
        "bad price key",
        "plugins: [router, fake]\nprices:\n  m1: {input_per_mtok: 1, output_per_mtok: 2}\n"
        "task_classes:\n  q: {provider: fake, model: m}\n",
        "prices",
        "'provider/model'",
    ),
    (
        "settings for an unregistered provider",
        "plugins: [router, fake]\nproviders:\n  opanai: {timeout_s: 5}\n"
        "task_classes:\n  q: {provider: fake, model: m}\n",
        "providers.opanai",
        "no enabled plugin registers",
    ),
    ("empty file", "", "", "the file is empty"),
    ("alias inside itself", "plugins: &x [router, *x]\n", "", "refers to itself"),
    (
        "aliases expanding a billion times",
        LAUGHS,
        "",
        "expands to more than 200,000 values",
    ),
    (
        "section given twice",
        "plugins: [router, fake]\ntask_classes:\n  q: {provider: fake, model: m}\n"
        "task_classes:\n  r: {provider: fake, model: m}\n",
        "line 4",
        "the key 'task_classes' is given twice",
    ),
    (
        "key given twice in a class",
        "plugins: [router, fake]\ntask_classes:\n  q: {provider: fake, model: m, model: n}\n",
        "line 3",
        "the key 'model' is given twice",
    ),
    (
        "price beyond any real one",
        "plugins: [router, fake]\nprices:\n  fake/m: {input_per_mtok: 1e300, output_per_mtok: 1}\n"
        "task_classes:\n  q: {provider: fake, model: m}\n",
        "prices",
        "less than or equal to 1000000",
    ),
    (
        "max_tokens beyond any real one",
        "plugins: [router, fake]\ntask_classes:\n"
        "  q: {provider: fake, model: m, max_tokens: 99999999999999999999}\n",
        "task_classes.q.max_tokens",
        "less than or equal to 10000000",
    ),
]


def _load(tmp_path: Path, text: str) -> None:
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(text)
    settings = load_settings(cfg, env={})
    build_gateway(settings, extra_plugins={"fake": FakeProviderPlugin(FakeProvider())})


@pytest.mark.parametrize(("name", "text", "path", "words"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_config_names_file_path_and_problem(
    tmp_path: Path, name: str, text: str, path: str, words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    rendered = str(err.value)
    assert str(tmp_path / "routing.yaml") in rendered
    assert path in rendered
    assert words in rendered
    assert "Traceback" not in rendered


def test_there_are_at_least_twelve_invalid_cases() -> None:
    assert len(INVALID) >= 12


@pytest.mark.parametrize("case", INVALID[:6], ids=[c[0] for c in INVALID[:6]])
def test_check_config_exits_2_with_the_error_and_no_traceback(
    tmp_path: Path, case: tuple[str, str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(case[1])
    assert main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "configuration error" in err


def test_unknown_plugin_via_cli_lists_available(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "routing.yaml"
    cfg.write_text("plugins: [router, nosuch]\ntask_classes:\n  q: {provider: x, model: m}\n")
    assert main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err
    assert "available plugins:" in err


def test_interpolation_and_dotenv_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# comment\nexport FAKE_URL='http://127.0.0.1:9/v1'\nSET_BOTH=from-dotenv\n"
    )
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(
        textwrap.dedent("""
        plugins: [router, fake]
        providers:
          fake: {base_url: '${FAKE_URL}', timeout_s: '${TIMEOUT:-7}'}
        task_classes:
          q: {provider: fake, model: m, description: '${SET_BOTH}'}
    """)
    )
    settings = load_settings(cfg, env={"SET_BOTH": "from-env"})
    assert settings.providers["fake"].base_url == "http://127.0.0.1:9/v1"
    assert settings.providers["fake"].timeout_s == 7
    # .env never overrides a variable that is already set
    assert settings.task_classes["q"].description == "from-env"
    assert settings.env["FAKE_URL"] == "http://127.0.0.1:9/v1"


def test_config_path_precedence() -> None:
    assert str(config_path("a.yaml", {"LLM_GATEWAY_CONFIG": "b.yaml"})) == "a.yaml"
    assert str(config_path(None, {"LLM_GATEWAY_CONFIG": "b.yaml"})) == "b.yaml"
    assert str(config_path(None, {})) == "routing.yaml"


def test_shipped_routing_yaml_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    settings = load_settings(root / "routing.yaml", env={})
    assert {
        "quick_answer",
        "general_reasoning",
        "long_context",
        "deep_audit",
        "batch_classification",
        "dual_opinion",
        "triple_review",
    } <= set(settings.task_classes)
    gw = build_gateway(settings)
    assert set(gw.providers) >= {"openai", "anthropic", "gemini", "deepseek"}
    for provider in gw.providers.values():
        assert not provider.status().available  # no keys in the test environment
    import anyio

    anyio.run(gw.aclose)


def test_all_config_errors_are_gateway_errors() -> None:
    assert issubclass(ConfigError, GatewayError)


def _with_fakes(tmp_path: Path, text: str) -> Path:
    """``routing.yaml`` with ``text``, beside a hook file ``fakes.py`` registering the
    provider ``fake``."""
    (tmp_path / "fakes.py").write_text(
        "from llmgw.kernel.testing import FakeProvider, FakeProviderPlugin\n"
        "plugin = lambda ctx: FakeProviderPlugin(FakeProvider())\n"
    )
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(text)
    return cfg


def test_check_config_fails_when_a_plugin_cannot_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = _with_fakes(
        tmp_path,
        "plugins: [kill_switch, ledger, router, fakes.py]\n"
        f"ledger: {{path: '{blocker}/ledger.db', caps: {{total_monthly_usd: 5}}}}\n"
        "task_classes:\n  q: {provider: fake, model: m}\n",
    )
    assert main(["check-config", "--config", str(cfg)]) == 2
    out, err = capsys.readouterr()
    assert "plugin 'ledger' cannot work" in err
    assert ": NOT OK (1 plugin(s) cannot work)" in out and ": OK" not in out


def test_check_config_prints_a_fallback_entry_that_will_be_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt provider in a fallback chain was skipped at run time with a log line
    only: check-config said OK and the chain was shorter than it read."""
    cfg = _with_fakes(
        tmp_path,
        "plugins: [kill_switch, fallback, router, fakes.py]\n"
        "task_classes:\n  q: {provider: fake, model: m}\n"
        "fallback:\n  chains:\n    q: [{provider: fakr, model: m2}]\n",
    )
    assert main(["check-config", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "fallback.chains.q[0]" in err
    assert "provider 'fakr' is not registered" in err
    assert "did you mean 'fake'?" in err


def test_check_config_warns_of_a_larger_context_entry_no_route_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """larger_context names which of a route's targets may take an overflow; an entry in
    no class and no chain was silently never tried."""
    cfg = _with_fakes(
        tmp_path,
        "plugins: [kill_switch, fallback, router, fakes.py]\n"
        "task_classes:\n  q: {provider: fake, model: m}\n"
        "fallback:\n  larger_context: [fake/big, fake/m2]\n"
        "  chains:\n    q: [{provider: fake, model: m2}]\n",
    )
    assert main(["check-config", "--config", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "fallback.larger_context[0]: fake/big is in no task class and no chain" in err
    assert "larger_context[1]" not in err


def test_a_config_that_no_plugin_can_route_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without `router` every call failed, yet check-config said OK."""
    cfg = _with_fakes(
        tmp_path,
        "plugins: [kill_switch, fallback, fakes.py]\n"
        "task_classes:\n  q: {provider: fake, model: m}\n",
    )
    assert main(["check-config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "plugins: no enabled plugin resolves routes" in err
    assert "add `router`" in err


def test_merge_keys_still_override_and_work(tmp_path: Path) -> None:
    cfg = tmp_path / "routing.yaml"
    text = textwrap.dedent(
        """
        plugins: [router, fake]
        task_classes:
          q: &q {provider: fake, model: m, max_tokens: 10}
          r: {<<: *q, max_tokens: 20}
        """
    )
    cfg.write_text(text)
    settings = load_settings(cfg, env={})
    assert settings.task_classes["r"].max_tokens == 20
    assert settings.task_classes["r"].model == "m"


def test_an_unreadable_or_odd_dotenv_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "routing.yaml"
    cfg.write_text("plugins: [router, fake]\ntask_classes:\n  q: {provider: fake, model: m}\n")
    dotenv = tmp_path / ".env"
    dotenv.write_bytes(b"\xef\xbb\xbfLLM_GATEWAY_X=1\n")  # a byte-order mark first
    assert load_settings(cfg, env={}).env["LLM_GATEWAY_X"] == "1"
    dotenv.write_bytes(b"KEY=\xff\xfe\x00binary\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, env={})
    assert "cannot read the .env file" in str(err.value) and "UTF-8" in str(err.value)


def test_a_quoted_dotenv_value_may_be_followed_by_a_comment(tmp_path: Path) -> None:
    from llmgw.kernel.config import read_dotenv

    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "CAP='5' # the monthly cap\nNAME=\"a b\"\nPLAIN=x # note\nHASH=\"a#b\"\nBARE='v'#c\n"
    )
    assert read_dotenv(dotenv) == {
        "CAP": "5",  # kept its quotes before, and was then refused as not a dollar amount
        "NAME": "a b",
        "PLAIN": "x",
        "HASH": "a#b",
        "BARE": "v",
    }


@pytest.mark.parametrize(("value", "ok"), [("debug", True), ("Warning", True), ("loud", False)])
def test_the_log_level_from_the_environment(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    value: str,
    ok: bool,
) -> None:
    """A lower-case or unknown LLM_GATEWAY_LOG_LEVEL was a KeyError traceback on every
    command, `serve` included."""
    cfg = _with_fakes(
        tmp_path,
        "plugins: [kill_switch, router, fakes.py]\n"
        "task_classes:\n  q: {provider: fake, model: m}\n",
    )
    monkeypatch.setenv("LLM_GATEWAY_LOG_LEVEL", value)
    try:
        code = main(["check-config", "--config", str(cfg)])
    finally:
        reset_logging()
    if ok:
        assert code == 0
    else:
        assert code == 2
        err = capsys.readouterr().err
        assert "LLM_GATEWAY_LOG_LEVEL is 'loud', not a log level" in err
        assert "DEBUG, INFO, WARNING, ERROR" in err


def test_llmgw_bench_passes_its_options_through(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`llmgw bench` raised AttributeError and `llmgw bench --quick` was refused."""
    import sys
    import types

    seen: list[list[str]] = []
    fake = types.ModuleType("bench")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench", fake)
    try:
        assert main(["bench"]) == 0
        assert main(["bench", "--quick", "--keep", "d"]) == 0
    finally:
        reset_logging()
    assert seen == [[], ["--quick", "--keep", "d"]]


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["route", "q", "hi"], 0),
        (["route", "no_such_class", "hi"], 2),  # the request as given is refused: usage
        (["route", "--max-tokens", "0", "q", "hi"], 2),
        (["route", "q", "[[fail]]"], 1),  # the upstream failed: a runtime failure
    ],
)
def test_route_exit_codes_follow_the_documented_meaning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int
) -> None:
    """README: 0 ok, 2 usage or configuration error, 1 runtime failure. A refused
    argument (`bad_argument`, nothing sent) exited 1 like an upstream failure."""
    (tmp_path / "fakes.py").write_text(
        "from llmgw.kernel import ErrorClass, Outcome\n"
        "from llmgw.kernel.testing import FakeProvider, FakeProviderPlugin\n"
        "class Failing(FakeProvider):\n"
        "    async def complete(self, request):\n"
        "        if '[[fail]]' in request.messages[-1].content:\n"
        "            return Outcome.failure(ErrorClass.SERVER_ERROR, 'down', sent=True)\n"
        "        return await super().complete(request)\n"
        "plugin = lambda ctx: FakeProviderPlugin(Failing())\n"
    )
    cfg = tmp_path / "routing.yaml"
    cfg.write_text("plugins: [router, fakes.py]\ntask_classes:\n  q: {provider: fake, model: m}\n")
    try:
        assert main([*argv[:1], "--config", str(cfg), *argv[1:]]) == code
    finally:
        reset_logging()
    capsys.readouterr()


ORIGINAL = """
plugins: [kill_switch, cost, fallback, independence, router, fake]
defaults:
  quick_answer: {provider: fake, model: m1, max_tokens: 100}
  duo:
    members: [{provider: fake, model: m1}, {provider: fake, model: m2}]
cost_preflight: {warn_usd: 0.5, block_usd: 2}
visibility:
  duo: {mode: blind, enforce: hard}
fallback:
  quick_answer: [fake/m2]
  duo: []
"""


@pytest.mark.anyio
async def test_the_original_products_section_names_are_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The seed's routing.yaml sections are the contract users know: `defaults`,
    `cost_preflight`, `visibility`, `fallback.<task_class>` were each refused as unknown."""
    from llmgw.kernel.testing import gateway_from_yaml

    gw = gateway_from_yaml(ORIGINAL, providers=[FakeProvider()])
    async with gw:
        info = gw.routing_info()
        panel = await gw.route(Request("duo", "hi"))
    assert set(info["task_classes"]) == {"quick_answer", "duo"}
    assert (info["cost"]["warn_usd"], info["cost"]["block_usd"]) == (0.5, 2.0)
    assert info["independence"]["panels"]["duo"]["enforce"] == "hard"
    assert info["fallback"]["chains"] == {"duo": [], "quick_answer": [{"target": "fake/m2"}]}
    assert panel.meta["visibility"]["independence_certified"] is True
    err = capsys.readouterr().err
    for old in (
        "defaults",
        "cost_preflight",
        "visibility",
        "fallback.duo",
        "fallback.quick_answer",
    ):
        assert old in err  # config.original_section, one warning each


@pytest.mark.parametrize(
    ("text", "needle", "fix"),
    [
        (
            GOOD + "defaults:\n  other: {provider: fake, model: m1}\n",
            "both `defaults` (the original product's name) and `task_classes`",
            "move what `defaults` holds into `task_classes`",
        ),
        (
            GOOD + "fallback:\n  chains: {quick_answer: [{provider: fake, model: m2}]}\n"
            "  quick_answer: [fake/m3]\n",
            "has a chain under fallback.chains and another",
            "keep one: fallback.chains.quick_answer",
        ),
        (
            GOOD + "orchestration: {depth: {}}\n",
            "`orchestration` is the original product's section",
            "candidates: {planner: [...]",
        ),
        (
            "task_classes:\n  q: {provider: fake, model: m}\n",
            "Field required",
            "add `plugins: [kill_switch, cost, breaker, ledger",
        ),
    ],
)
def test_original_sections_that_cannot_be_read_say_where_to_move_them(
    tmp_path: Path, text: str, needle: str, fix: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    rendered = str(info.value)
    assert needle in rendered and fix in rendered


@pytest.mark.parametrize(
    ("section", "fix"),
    [
        ("cost: {unknown_price: deny}", "use one of the values listed"),
        ("gateway: {deadline_s: soon}", "write a number"),
        ("gateway: {max_output_tokens: [1]}", "write a whole number"),
        ("providers: {fake: {key_env: 'lower case'}}", "write it in the form the pattern shows"),
        ("fallback: {on_content_refused: maybe}", "write true or false"),
    ],
)
def test_every_config_error_says_how_to_fix_it(tmp_path: Path, section: str, fix: str) -> None:
    """docs/plugins.md shows every config error with a fix line; type, enum and pattern
    errors had none."""
    with pytest.raises(ConfigError) as info:
        _load(
            tmp_path,
            GOOD.replace("plugins: [router, fake]", "plugins: [cost, fallback, router, fake]")
            + section
            + "\n",
        )
    assert f"fix: {fix}" in str(info.value)


def test_the_log_level_in_routing_yaml_is_read_in_any_case(tmp_path: Path) -> None:
    cfg = tmp_path / "routing.yaml"
    cfg.write_text(GOOD + "gateway: {log_level: debug}\n")
    assert load_settings(cfg, env={}).gateway.log_level == "DEBUG"
