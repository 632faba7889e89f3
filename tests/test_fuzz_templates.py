"""The chat-template fuzzer (tests/fuzz_templates.py): a short seeded run, and the failure classes it found.

Each case is a hostile or broken template through the load step, apply_chat_template and chat
in a worker process under a memory limit; it must work or end in one LfmEdgeError sentence,
quickly and in bounded memory (see the fuzzer's docstring for what counts as a failure).
"""

from __future__ import annotations

import collections

import pytest

import fuzz_templates as ft

SHORT_SEED, SHORT_CASES = 5, 300


@pytest.fixture(scope="module")
def model(gguf_path) -> str:
    return str(gguf_path("moe", "q8_0"))


def _failures(results: dict, cases: dict) -> list[str]:
    return [f"{r.outcome}: {r.detail[:200]!r} <- {cases[k].get('note', '')[:200]}" for k, r in results.items() if not r.clean]


def test_fuzz_templates_short(model, tmp_path):
    """300 seeded templates: each works or ends in one sentence."""
    reals = ft.real_templates()
    cases = {f"{SHORT_SEED}:{i}": ft.make_case(reals, SHORT_SEED, i).to_json() for i in range(SHORT_CASES)}
    results = ft.run_cases(model, cases, tmp_path, jobs=2)
    assert len(results) == SHORT_CASES
    tally = collections.Counter(r.outcome for r in results.values())
    assert not _failures(results, cases), "\n".join([str(tally), *_failures(results, cases)[:20]])
    # the run means something only if it reaches both ends: templates that render, templates stopped
    assert tally["ok"] >= 15 and tally["error"] >= SHORT_CASES // 2, tally
    stopped = [r.detail for r in results.values() if "was stopped" in r.detail or "a render may make" in r.detail]
    assert len(stopped) >= 10, "the run should reach the sandbox's bounds"


def test_fuzz_template_regressions(model, tmp_path):
    """Each failure class the fuzzer found, kept in tests/fuzz/templates/, now ends cleanly."""
    cases = ft.load_regressions(ft.REGRESSIONS)
    assert cases
    results = ft.run_cases(model, cases, tmp_path, jobs=2)
    assert not _failures(results, cases), _failures(results, cases)


def test_the_fuzzer_sees_a_hang_and_an_escape(model, tmp_path):
    """The fuzzer's own checks can fail: a case slower than its timeout is a hang, a render that
    prints a Python internal is flagged."""
    slow = "{% set s = 'ab' * 5000000 %}{% for i in range(100000) %}{{ s.count('a') }}{% endfor %}"
    results = ft.run_cases(model, {"slow": {"template": slow, "conversation": "hi", "variables": {}}}, tmp_path,
                           jobs=1, timeout=0.5)
    assert results["slow"].outcome == "hang"
    assert ft._OBJECT.search("x <class 'object'> y") and ft._OBJECT.search("{'__name__': 'os'}")
    assert not ft._OBJECT.search("<class 'lfm_edge.chat_template.TemplateNamespace'>")


def test_cases_are_the_same_on_every_run():
    reals = ft.real_templates()
    assert [ft.make_case(reals, 7, i) for i in range(50)] == [ft.make_case(reals, 7, i) for i in range(50)]
    assert ft.make_case(reals, 7, 0) != ft.make_case(reals, 8, 0)
