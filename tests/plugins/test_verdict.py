"""The verifier's answer is parsed strictly: only an exact JSON verdict can ACCEPT."""

from __future__ import annotations

import pytest

from llmgw.plugins.verdict import MAX_REASONS, parse_verdict

ACCEPT = "ACCEPT"
REVISE = "REVISE"
ERR = "parse_error"  # REVISE with verdict_parse_error set

TABLE: list[tuple[str, str | None, str]] = [
    # the valid forms
    ("accept, no reasons", '{"verdict": "ACCEPT", "reasons": []}', ACCEPT),
    ("accept, with reasons", '{"verdict":"ACCEPT","reasons":["complete","correct"]}', ACCEPT),
    ("accept, keys reversed", '{"reasons": [], "verdict": "ACCEPT"}', ACCEPT),
    ("accept, surrounding whitespace", '\n\n  {"verdict": "ACCEPT", "reasons": []}  \n', ACCEPT),
    ("accept, pretty printed", '{\n  "verdict": "ACCEPT",\n  "reasons": []\n}', ACCEPT),
    ("accept in a json fence", '```json\n{"verdict": "ACCEPT", "reasons": []}\n```', ACCEPT),
    ("accept in a bare fence", '```\n{"verdict": "ACCEPT", "reasons": []}\n```', ACCEPT),
    ("revise with reasons", '{"verdict": "REVISE", "reasons": ["misses step 3"]}', REVISE),
    ("revise in a fence", '```json\n{"verdict": "REVISE", "reasons": ["x"]}\n```', REVISE),
    ("unicode reasons", '{"verdict": "REVISE", "reasons": ["manque l\'étape ✓"]}', REVISE),
    # prose and near misses: never ACCEPT
    ("NOT ACCEPTABLE", "NOT ACCEPTABLE", ERR),
    ("verdict value NOT ACCEPTABLE", '{"verdict": "NOT ACCEPTABLE", "reasons": []}', ERR),
    ("I cannot accept this", "I cannot accept this", ERR),
    ("bare ACCEPT word", "ACCEPT", ERR),
    ("prose then json", 'Here is my verdict: {"verdict": "ACCEPT", "reasons": []}', ERR),
    ("json then prose", '{"verdict": "ACCEPT", "reasons": []} Looks good to me.', ERR),
    ("fence with trailing prose", '```json\n{"verdict": "ACCEPT", "reasons": []}\n```\nok', ERR),
    ("two fences", '```\n{"verdict": "ACCEPT", "reasons": []}\n```\n```\n{}\n```', ERR),
    ("lowercase accept", '{"verdict": "accept", "reasons": []}', ERR),
    ("capitalised Accept", '{"verdict": "Accept", "reasons": []}', ERR),
    ("accept with a space", '{"verdict": "ACCEPT ", "reasons": []}', ERR),
    ("verdict true", '{"verdict": true, "reasons": []}', ERR),
    ("verdict list", '{"verdict": ["ACCEPT"], "reasons": []}', ERR),
    ("reasons a string", '{"verdict": "ACCEPT", "reasons": "fine"}', ERR),
    ("reasons with a number", '{"verdict": "REVISE", "reasons": ["a", 2]}', ERR),
    ("reasons missing", '{"verdict": "ACCEPT"}', ERR),
    ("verdict missing", '{"reasons": []}', ERR),
    ("extra key", '{"verdict": "ACCEPT", "reasons": [], "confidence": 0.9}', ERR),
    ("duplicate verdict key", '{"verdict": "REVISE", "verdict": "ACCEPT", "reasons": []}', ERR),
    ("broken json", '{"verdict": "ACCEPT", "reasons": [}', ERR),
    ("single quotes", "{'verdict': 'ACCEPT', 'reasons': []}", ERR),
    ("trailing comma", '{"verdict": "ACCEPT", "reasons": [],}', ERR),
    (
        "two objects",
        '{"verdict": "ACCEPT", "reasons": []}{"verdict": "REVISE", "reasons": []}',
        ERR,
    ),
    (
        "two objects on lines",
        '{"verdict":"REVISE","reasons":[]}\n{"verdict":"ACCEPT","reasons":[]}',
        ERR,
    ),
    ("a list", '[{"verdict": "ACCEPT", "reasons": []}]', ERR),
    ("a json string", '"ACCEPT"', ERR),
    ("NaN inside", '{"verdict": "ACCEPT", "reasons": [], "x": NaN}', ERR),
    ("empty", "", ERR),
    ("whitespace only", "  \n\t ", ERR),
    ("none", None, ERR),
    ("empty fence", "```json\n```", ERR),
    ("fence on one line", '```{"verdict": "ACCEPT", "reasons": []}```', ERR),
]


@pytest.mark.parametrize(("label", "text", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_verdict_table(label: str, text: str | None, expected: str) -> None:
    parsed = parse_verdict(text)
    if expected == ERR:
        assert parsed.verdict.verdict == "REVISE", label
        assert parsed.verdict.parse_error is True
        assert parsed.error
        assert parsed.to_dict()["verdict_parse_error"] is True
        assert not parsed.accepted
    else:
        assert parsed.verdict.verdict == expected, label
        assert parsed.verdict.parse_error is False
        assert parsed.error is None
        assert parsed.accepted is (expected == ACCEPT)
        assert parsed.to_dict()["verdict_parse_error"] is False


def test_table_is_large_enough() -> None:
    assert len(TABLE) >= 20


def test_nothing_but_exact_accept_is_accepted() -> None:
    accepted = [label for label, text, _ in TABLE if parse_verdict(text).accepted]
    assert accepted == [label for label, _, e in TABLE if e == ACCEPT]


def test_reasons_are_kept_and_bounded() -> None:
    parsed = parse_verdict('{"verdict": "REVISE", "reasons": ["too short", "no examples"]}')
    assert parsed.verdict.reasons == ("too short", "no examples")
    many = ", ".join(f'"r{i}"' for i in range(MAX_REASONS + 10))
    parsed = parse_verdict('{"verdict": "REVISE", "reasons": [' + many + "]}")
    assert len(parsed.verdict.reasons) == MAX_REASONS


def test_parse_error_reason_names_the_problem_without_echoing_the_answer() -> None:
    parsed = parse_verdict("NOT ACCEPTABLE: secret-ish upstream text")
    assert "secret-ish" not in " ".join(parsed.verdict.reasons)
    assert parsed.verdict.reasons[0].startswith("the verifier did not answer")


def test_an_answer_nested_too_deeply_is_revise_not_a_crash() -> None:
    """json's parser raises RecursionError, not ValueError, past ~1,000 levels: it went up
    through the pipeline as an internal error reporting $0 for steps already paid."""
    for depth in (500, 5_000, 100_000):
        parsed = parse_verdict('{"verdict": ' + "[" * depth + "]" * depth + "}")
        assert parsed.verdict.verdict == "REVISE" and parsed.verdict.parse_error
