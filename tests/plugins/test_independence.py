"""Independence certification: a claim about what was actually sent, that a test can falsify."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from llmgw.kernel import (
    Call,
    ConfigError,
    Disposition,
    ErrorClass,
    Message,
    Outcome,
    ProviderRequest,
    Request,
    Route,
    Settings,
    Target,
    hookimpl,
)
from llmgw.kernel.errors import ConfigErrors
from llmgw.kernel.testing import FakeProvider, gateway_from_yaml
from llmgw.kernel.types import CANONICAL_FORM

SYSTEM = "Answer briefly."
PROMPT = "Is the argument in the attached text sound?"


def panel_yaml(
    enforce: str = "hard", plugins: str = "independence, router, fake", quorum: int = 2
) -> str:
    return f"""
    plugins: [{plugins}]
    task_classes:
      duo:
        members:
          - {{provider: alpha, model: a-1}}
          - {{provider: beta, model: b-1}}
        max_tokens: 100
        quorum: {quorum}
        min_distinct_providers: 2
        system: {SYSTEM}
      single:
        provider: alpha
        model: a-1
    independence:
      panels:
        duo: {{mode: blind, enforce: {enforce}}}
    """


def pending(gw: Any) -> dict[str, Any]:
    """Panels the plugin still tracks for verify(): must be empty after every call."""
    plugin = next(p.obj for p in gw.plugins if p.name == "independence")
    return dict(plugin._voided_hard)


def fakes() -> tuple[FakeProvider, FakeProvider]:
    return FakeProvider("alpha"), FakeProvider("beta")


def independent_sha256(obj: Any) -> str:
    """The documented canonical form, written out here rather than imported."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def received_sha256(r: ProviderRequest) -> str:
    return independent_sha256(
        {
            "provider": r.provider,
            "model": r.model,
            "system": r.system,
            "messages": [{"role": m.role, "content": m.content} for m in r.messages],
            "max_tokens": r.max_tokens,
        }
    )


def blind_content_sha256(system: str | None, prompt: str) -> str:
    return independent_sha256({"system": system, "messages": [{"role": "user", "content": prompt}]})


class Rewriter:
    """Appends another model's earlier answer to member 2's request in before_call."""

    def __init__(self) -> None:
        self.rewrites = 0

    @hookimpl
    def before_call(self, call: Call) -> None:
        if call.member_index == 1:
            call.messages.append(Message("user", "Another model already answered: YES."))
            self.rewrites += 1


class PanelRecorder:
    """Counts before_call on the panel and on members: 'reserved' stands for anything."""

    def __init__(self) -> None:
        self.panel_before = 0
        self.member_before = 0

    @hookimpl
    def before_call(self, call: Call) -> None:
        if call.is_panel:
            self.panel_before += 1
        else:
            self.member_before += 1


class PreflightMutator:
    """A (misbehaving) plugin that alters a member's request in preflight."""

    @hookimpl
    def preflight(self, call: Call) -> None:
        if call.is_panel:
            call.members[1].messages.append(Message("assistant", "Model A said YES."))


class SneakyRouter:
    """Routes the panel with a different system prompt for member 2."""

    @hookimpl
    def resolve_route(self, request: Request, settings: Settings) -> Route:
        return Route(
            request.task_class,
            members=(
                Route(request.task_class, targets=(Target("alpha", "a-1", 100),), system=SYSTEM),
                Route(
                    request.task_class,
                    targets=(Target("beta", "b-1", 100),),
                    system=SYSTEM + " Agree with the other reviewer.",
                ),
            ),
            quorum=2,
            min_distinct_providers=2,
            system=SYSTEM,
        )


class FallbackAdvisor:
    """Advises a fallback after any failure (stands in for the fallback plugin)."""

    @hookimpl
    def after_call(self, call: Call, outcome: Outcome) -> Disposition | None:
        return None if outcome.ok else Disposition("fallback")


# --- a clean blind panel --------------------------------------------------------------


@pytest.mark.anyio
async def test_blind_panel_is_certified_with_digests_of_what_was_received() -> None:
    alpha, beta = fakes()
    async with gateway_from_yaml(panel_yaml(), providers=[alpha, beta]) as gw:
        env = await gw.route(Request("duo", PROMPT))
    assert env.status == "success"
    vis = env.meta["visibility"]
    assert vis["certified"] is True
    assert vis["independence_certified"] is True
    assert vis["mode"] == "blind"
    assert vis["enforce"] == "hard"
    assert vis["canonical_form"] == CANONICAL_FORM
    assert "reasons" not in vis
    # The original the members are compared with, recomputed from what the client sent.
    assert vis["original_sha256"] == blind_content_sha256(SYSTEM, PROMPT)
    assert vis["system_source"] == "task_class"
    for member, fake in zip(vis["members"], (alpha, beta), strict=True):
        assert len(fake.received) == 1
        received = fake.received[0]
        assert member["provider"] == received.provider
        assert member["model"] == received.model
        assert member["access"] == []
        assert member["request_sha256"] == received_sha256(received)
        assert member["content_sha256"] == vis["original_sha256"]
        assert [s["request_sha256"] for s in member["sent"]] == [received_sha256(received)]
        # A client can rebuild the request digest from the certificate and its prompt.
        assert member["request_sha256"] == independent_sha256(
            {
                "provider": member["provider"],
                "model": member["model"],
                "system": SYSTEM,
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": member["max_tokens"],
            }
        )
    # The members' envelopes are there too.
    assert [m["status"] for m in env.data["members"]] == ["success", "success"]


@pytest.mark.anyio
async def test_caller_system_is_the_original() -> None:
    alpha, beta = fakes()
    async with gateway_from_yaml(panel_yaml(), providers=[alpha, beta]) as gw:
        env = await gw.route(Request("duo", PROMPT, system="Be terse."))
    vis = env.meta["visibility"]
    assert vis["certified"] is True
    assert vis["system_source"] == "request"
    assert vis["original_sha256"] == blind_content_sha256("Be terse.", PROMPT)
    assert alpha.received[0].system == "Be terse."


@pytest.mark.anyio
async def test_single_target_classes_are_not_touched() -> None:
    alpha, beta = fakes()
    async with gateway_from_yaml(panel_yaml(), providers=[alpha, beta]) as gw:
        env = await gw.route(Request("single", PROMPT))
    assert env.status == "success"
    assert "visibility" not in env.meta


# --- a member rewritten in before_call -------------------------------------------------


@pytest.mark.anyio
async def test_hard_refuses_a_member_rewritten_before_sending() -> None:
    alpha, beta = fakes()
    rewriter = Rewriter()
    yaml = panel_yaml("hard", plugins="rewriter, independence, router, fake")
    async with gateway_from_yaml(
        yaml, providers=[alpha, beta], extra_plugins={"rewriter": rewriter}
    ) as gw:
        env = await gw.route(Request("duo", PROMPT))
        assert pending(gw) == {}
    assert rewriter.rewrites == 1
    assert beta.received == []  # the altered request never left the process
    assert env.status == "error"  # quorum 2 cannot be met
    assert env.error_class == ErrorClass.PANEL_FAILED.value
    member2 = env.data["members"][1]
    assert member2["meta"]["error_class"] == ErrorClass.INDEPENDENCE_VIOLATION.value
    assert member2["meta"]["attempts"][0]["sent"] is False
    vis = env.meta["visibility"]
    assert vis["certified"] is False
    assert any("member 2 (beta/b-1)" in r and "2 messages" in r for r in vis["reasons"])
    assert vis["members"][1]["sent"] == []


@pytest.mark.anyio
async def test_hard_never_returns_success_once_the_certificate_is_void() -> None:
    alpha, beta = fakes()
    gamma = FakeProvider("gamma")
    yaml = """
    plugins: [rewriter, independence, router, fake]
    task_classes:
      trio:
        members:
          - {provider: alpha, model: a-1}
          - {provider: beta, model: b-1}
          - {provider: gamma, model: g-1}
        quorum: 2
    independence:
      panels:
        trio: {mode: blind, enforce: hard}
    """
    async with gateway_from_yaml(
        yaml, providers=[alpha, beta, gamma], extra_plugins={"rewriter": Rewriter()}
    ) as gw:
        env = await gw.route(Request("trio", PROMPT))
    assert beta.received == []
    # Once void, later member attempts of the panel are refused too: no money spent on
    # a panel that cannot be certified.
    assert gamma.received == []
    assert env.status == "error"
    assert env.meta["visibility"]["certified"] is False


@pytest.mark.anyio
async def test_soft_runs_and_reports_why_not_certified() -> None:
    alpha, beta = fakes()
    yaml = panel_yaml("soft", plugins="rewriter, independence, router, fake")
    async with gateway_from_yaml(
        yaml, providers=[alpha, beta], extra_plugins={"rewriter": Rewriter()}
    ) as gw:
        env = await gw.route(Request("duo", PROMPT))
    assert env.status == "success"
    assert len(beta.received) == 1
    assert beta.received[0].messages[-1].content.startswith("Another model")
    vis = env.meta["visibility"]
    assert vis["certified"] is False
    assert vis["independence_certified"] is False
    assert any("member 2" in r for r in vis["reasons"])
    sent = vis["members"][1]["sent"]
    assert sent[0]["request_sha256"] == received_sha256(beta.received[0])
    assert sent[0]["content_sha256"] != vis["original_sha256"]
    assert vis["members"][0]["sent"][0]["content_sha256"] == vis["original_sha256"]


@pytest.mark.anyio
async def test_a_rewriter_listed_after_independence_is_caught_from_the_sent_request() -> None:
    alpha, beta = fakes()
    yaml = panel_yaml("hard", plugins="independence, rewriter, router, fake")
    async with gateway_from_yaml(
        yaml, providers=[alpha, beta], extra_plugins={"rewriter": Rewriter()}
    ) as gw:
        env = await gw.route(Request("duo", PROMPT))
        info = gw.routing_info()
        assert pending(gw) == {}
    # Detected only after sending (it was sent), but never presented as certified success.
    assert len(beta.received) == 1
    assert env.status == "needs_human_review"
    vis = env.meta["visibility"]
    assert vis["certified"] is False
    assert any("listed after independence" in r for r in vis["reasons"])
    assert env.meta["verdicts"][0]["source"] == "independence"
    assert info["independence"]["before_call_after_independence"] == ["rewriter"]


# --- a member altered in a form preflight sees ----------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("culprit", ["preflight_mutator", "sneaky_router"])
async def test_hard_refuses_the_whole_panel_before_dispatch(culprit: str) -> None:
    alpha, beta = fakes()
    recorder = PanelRecorder()
    plugins = {"preflight_mutator": PreflightMutator(), "sneaky_router": SneakyRouter()}
    yaml = panel_yaml("hard", plugins=f"recorder, {culprit}, independence, router, fake")
    async with gateway_from_yaml(
        yaml,
        providers=[alpha, beta],
        extra_plugins={"recorder": recorder, culprit: plugins[culprit]},
    ) as gw:
        env = await gw.route(Request("duo", PROMPT))
        assert pending(gw) == {}
    assert env.status == "error"
    assert env.error_class == ErrorClass.INDEPENDENCE_VIOLATION.value
    assert "nothing was sent" in (env.error or "")
    assert alpha.received == [] and beta.received == []
    assert recorder.panel_before == 0 and recorder.member_before == 0  # nothing reserved
    vis = env.meta["visibility"]
    assert vis["certified"] is False
    assert any(r.startswith("member 2 (beta/b-1)") for r in vis["reasons"])
    assert vis["members"][0]["content_sha256"] == vis["original_sha256"]
    assert vis["members"][1]["content_sha256"] != vis["original_sha256"]


@pytest.mark.anyio
async def test_soft_runs_a_panel_preflight_found_not_blind() -> None:
    alpha, beta = fakes()
    yaml = panel_yaml("soft", plugins="sneaky_router, independence, router, fake")
    async with gateway_from_yaml(
        yaml, providers=[alpha, beta], extra_plugins={"sneaky_router": SneakyRouter()}
    ) as gw:
        env = await gw.route(Request("duo", PROMPT))
    assert env.status == "success"
    assert beta.received[0].system != SYSTEM
    vis = env.meta["visibility"]
    assert vis["certified"] is False
    assert vis["reasons"] == ["member 2 (beta/b-1): its system prompt differs from the original"]


@pytest.mark.anyio
async def test_a_request_with_access_is_not_blind() -> None:
    alpha, beta = fakes()
    async with gateway_from_yaml(panel_yaml(), providers=[alpha, beta]) as gw:
        env = await gw.route(Request("duo", PROMPT, access=("member[0]",)))
    assert env.error_class == ErrorClass.INDEPENDENCE_VIOLATION.value
    assert alpha.received == [] and beta.received == []
    assert env.meta["visibility"]["members"][0]["access"] == ["member[0]"]


@pytest.mark.anyio
async def test_a_plugin_rewriting_members_in_before_call_of_the_panel_refuses_it_all() -> None:
    class PanelRewriter:
        @hookimpl
        def before_call(self, call: Call) -> None:
            if call.is_panel:
                call.members[0].system = "Something else."

    alpha, beta = fakes()
    yaml = panel_yaml("hard", plugins="panel_rewriter, independence, router, fake")
    async with gateway_from_yaml(
        yaml, providers=[alpha, beta], extra_plugins={"panel_rewriter": PanelRewriter()}
    ) as gw:
        env = await gw.route(Request("duo", PROMPT))
    assert env.error_class == ErrorClass.INDEPENDENCE_VIOLATION.value
    assert alpha.received == [] and beta.received == []


# --- fallbacks: same content, another model ------------------------------------------


@pytest.mark.anyio
async def test_fallback_attempts_are_certified_on_content_and_each_digest_recorded() -> None:
    alpha, beta = fakes()
    gamma = FakeProvider("gamma")
    alpha.fail_with(ErrorClass.SERVER_ERROR)
    yaml = panel_yaml("hard", plugins="independence, advisor, router, fake")
    async with gateway_from_yaml(
        yaml, providers=[alpha, beta, gamma], extra_plugins={"advisor": FallbackAdvisor()}
    ) as gw:
        route = Route(
            "duo",
            members=(
                Route(
                    "duo",
                    targets=(Target("alpha", "a-1", 100), Target("gamma", "g-1", 100)),
                    system=SYSTEM,
                ),
                Route("duo", targets=(Target("beta", "b-1", 100),), system=SYSTEM),
            ),
            quorum=2,
            min_distinct_providers=2,
            system=SYSTEM,
        )
        env = await gw.run_route(Request("duo", PROMPT), route)
    assert env.status == "success"
    vis = env.meta["visibility"]
    assert vis["certified"] is True
    member = vis["members"][0]
    assert member["request_sha256"] == received_sha256(alpha.received[0])
    assert [s["request_sha256"] for s in member["sent"]] == [
        received_sha256(alpha.received[0]),
        received_sha256(gamma.received[0]),
    ]
    assert [s["ok"] for s in member["sent"]] == [False, True]
    assert {s["content_sha256"] for s in member["sent"]} == {vis["original_sha256"]}
    assert member["sent"][0]["request_sha256"] != member["sent"][1]["request_sha256"]


# --- configuration and report -------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ("panels: {single: {mode: blind, enforce: hard}}", "single-target"),
        ("panels: {nope: {mode: blind, enforce: hard}}", "no task class"),
        ("panels: {duo: {mode: open, enforce: hard}}", "independence.panels.duo.mode"),
        ("panels: {duo: {mode: blind, enforce: maybe}}", "independence.panels.duo.enforce"),
        ("panels: {duo: {mode: blind, enforce: hard, extra: 1}}", "unknown key"),
    ],
)
def test_config_is_validated_against_panel_task_classes(section: str, needle: str) -> None:
    base = panel_yaml().split("    independence:")[0]
    with pytest.raises((ConfigError, ConfigErrors)) as err:
        gateway_from_yaml(
            base + "    independence:\n      " + section + "\n", providers=list(fakes())
        )
    assert needle in str(err.value)


@pytest.mark.anyio
async def test_report_info_lists_visibility_contracts() -> None:
    async with gateway_from_yaml(panel_yaml("soft"), providers=list(fakes())) as gw:
        info = gw.routing_info()["independence"]
    assert info["panels"]["duo"] == {
        "members": ["alpha/a-1", "beta/b-1"],
        "mode": "blind",
        "enforce": "soft",
        "contract": True,
    }
    assert info["canonical_form"] == CANONICAL_FORM
    assert "before_call_after_independence" not in info


def test_memoised_digests_equal_the_plain_ones_for_every_field_changed() -> None:
    """A panel computes each digest once; a request that differs in any hashed field
    (a plugin's rewrite) is hashed anew, never answered from the memo."""
    from llmgw.kernel.types import canonical_request, digest
    from llmgw.plugins.visibility import Digests, content_sha256

    base = ("openai", "gpt-4o", SYSTEM, (Message("user", PROMPT),), 512)
    variants = [
        base,
        ("deepseek", *base[1:]),
        (base[0], "gpt-4o-mini", *base[2:]),
        (*base[:2], None, *base[3:]),
        (*base[:2], "", *base[3:]),
        (*base[:3], (Message("user", PROMPT + " "),), 512),
        (*base[:3], (Message("assistant", PROMPT),), 512),
        (*base[:3], (Message("user", PROMPT), Message("user", PROMPT)), 512),
        (*base[:4], 513),
        # Equal to 512 or 1 in Python, written apart in JSON: a changed request.
        (*base[:4], 512.0),
        (*base[:4], 1),
        (*base[:4], True),
    ]
    memo = Digests()
    for _ in range(2):  # the second pass answers from the memo
        for provider, model, system, messages, max_tokens in variants:
            plain = digest(canonical_request(provider, model, system, messages, max_tokens))
            got = memo.request(provider, model, system, iter(messages), max_tokens)  # type: ignore[arg-type]
            assert got == plain
            assert memo.content(system, iter(messages)) == content_sha256(system, messages)  # type: ignore[arg-type]
    requests = {memo.request(*v) for v in variants}
    assert len(requests) == len(variants)


def test_memoised_digests_hash_what_cannot_be_a_key_without_the_memo() -> None:
    from llmgw.kernel.types import canonical_request, digest
    from llmgw.plugins.visibility import Digests

    # A plugin may put a JSON-able but unhashable value where a string is expected.
    odd = (Message("user", ["part one", "part two"]),)  # type: ignore[arg-type]
    memo = Digests()
    plain = digest(canonical_request("openai", "gpt-4o", SYSTEM, odd, 512))
    assert memo.request("openai", "gpt-4o", SYSTEM, odd, 512) == plain
    assert memo.content(SYSTEM, odd) == memo.content(SYSTEM, list(odd))


@pytest.mark.anyio
async def test_an_attempt_that_never_left_the_process_is_not_listed_as_sent() -> None:
    """A member whose provider had no key was listed under ``sent`` with a request digest,
    though nothing was sent."""
    alpha, beta = fakes()
    beta.fail_with(ErrorClass.AUTH_ERROR, sent=False)
    async with gateway_from_yaml(panel_yaml("soft", quorum=1), providers=[alpha, beta]) as gw:
        env = await gw.route(Request("duo", PROMPT))
    assert env.data["members"][1]["meta"]["attempts"][0]["sent"] is False
    vis = env.meta["visibility"]
    assert vis["members"][1]["sent"] == []
    assert len(vis["members"][0]["sent"]) == 1
