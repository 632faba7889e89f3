"""Hostile chat templates end in one sentence, quickly and in little memory; honest ones are untouched.

A chat template is a program from a downloaded file. These are the ones the
reliability probe (issue 12) used, and their relatives: each must load (no
work at compile time), and its render must stop within seconds with one
TemplateError sentence, never a hang, a multi-gigabyte allocation or a raw
Python exception. The hostile cases run in a child process under a 4 GiB
address-space limit so that a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from lfm_edge import template_sandbox
from lfm_edge.chat_template import ChatTemplate, TemplateError, TemplateLimit
from lfm_edge.errors import LfmEdgeError

HI = [{"role": "user", "content": "hi"}]

# name -> (template, words its sentence must hold)
HOSTILE = {
    "repeat folded at compile time": ("{{ 'x' * 10**9 }}", "characters"),
    "string filter repeated": ("{{ 1|string * 10**8 }}", "characters"),
    "lipsum": ("{{ lipsum(n=10**9) }}", "characters"),
    "nested range(10**6)": (
        "{% for i in range(10**6) %}{% for j in range(10**6) %}{% endfor %}{% endfor %}",
        "range of more than 100,000",
    ),
    "nested range(10**5)": (
        "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}",
        "loop steps",
    ),
    "macro recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "deep"),
    "recursive loop": ("{% for x in [1] recursive %}{{ loop([x]) }}{% endfor %}", "deep"),
    "caller recursion": (
        "{% macro m() %}{% call m() %}{% endcall %}{{ caller() }}{% endmacro %}{{ m() }}", "deep"
    ),
    "division by zero": ("{{ 1 / 0 }}", "division by zero"),
    "modulo by zero": ("{{ 1 % 0 }}", "modulo"),
    "bad filter argument": ("{{ 'abc'|wordwrap(0) }}", "width"),
    "bad filter argument type": ("{{ 'abc'|truncate('a') }}", "failed"),
    "slice into zero": ("{{ [1, 2]|slice(0)|list }}", "failed"),
    "lone surrogate": ("{{ '\\ud800' }}", "surrogate"),
    "~ doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "characters",
    ),
    "+ doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
        "characters",
    ),
    "center filter folded": ("{{ 'x'|center(1000000000) }}", "characters"),
    "center method": ("{{ 'x'.center(1000000000) }}", "characters"),
    "percent width": ("{{ '%1000000000d' % 1 }}", "characters"),
    "percent star width": ("{{ '%*d' % (10**8, 1) }}", "characters"),
    "format width": ("{{ '{:>1000000000}'.format(1) }}", "characters"),
    "nested format width": ("{{ '{:{}}'.format(1, 10**8) }}", "characters"),
    "format filter width": ("{{ '%1000000000s'|format('x') }}", "characters"),
    "huge power": ("{{ 10**(10**8) }}", "bits"),
    "squaring": (
        "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n }}",
        "bits",
    ),
    "list repetition": ("{{ ([0] * 10**9)|length }}", "characters"),
    "list of a range repeated": ("{{ ((range(100000)|list) * 100)|length }}", "items"),
    "exponential macro output": (
        "{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n - 1) }}{% else %}xxxxxxxx{% endif %}{% endmacro %}{{ m(40) }}",
        "",
    ),
    "shared list printed as JSON": (
        "{% set ns = namespace(a=['x' * 1000]) %}{% for i in range(40) %}{% set ns.a = [ns.a, ns.a] %}"
        "{% endfor %}{{ ns.a|tojson }}",
        "",
    ),
    "shared list printed": (
        "{% set ns = namespace(a=['x' * 1000]) %}{% for i in range(40) %}{% set ns.a = [ns.a, ns.a] %}"
        "{% endfor %}{{ ns.a }}",
        "characters",
    ),
    "replace squared": ("{% set s = 'a' * 100000 %}{{ s|replace('a', s) }}", "characters"),
    "replace method squared": ("{% set s = 'a' * 100000 %}{{ s.replace('a', s) }}", "characters"),
    "join of a repeated string": ("{{ ','.join(['x' * 10000000] * 100) }}", "characters"),
    "indent by a long string": ("{{ ('\\n' * 100000)|indent('x' * 100000, true, true) }}", "characters"),
    "tojson indent": ("{{ [1, 2]|tojson(indent=10**9) }}", "indent"),
    "to_bytes": ("{{ (1).to_bytes(10**9, 'big') }}", "characters"),
    "split into words": ("{{ ('xy ' * 20000000).split()|length }}", "items"),
    "wordcount": ("{{ ('x ' * 20000000)|wordcount }}", "characters"),
    "sum of lists": ("{{ ([[1] * 1000] * 100000)|sum(start=[]) }}", ""),
    "loop over a long string": ("{% for x in 'x' * 50000000 %}{% endfor %}", "loop steps"),
    "many distinct strings kept": (
        "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = ns.l + [('x' * 1000000) ~ i] %}"
        "{% endfor %}{{ ns.l|length }}",
        "characters",
    ),
    "slow string method in a loop": (
        "{% set s = 'ab' * 5000000 %}{% for i in range(100000) %}{{ s.count('a') }}{% endfor %}",
        "2 s",
    ),
    "comparing shared structures": (
        "{% set ns = namespace(a=[1], b=[1]) %}{% for i in range(40) %}{% set ns.a = [ns.a, ns.a] %}"
        "{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}",
        "compared",
    ),
    "hashing a shared tuple": (
        "{% set ns = namespace(a=(1,)) %}{% for i in range(40) %}{% set ns.a = (ns.a,) * 2 %}{% endfor %}"
        "{{ ns.a in {} }}",
        "compared",
    ),
    "sorting shared structures": (
        "{% set ns = namespace(a=[1]) %}{% for i in range(40) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}"
        "{{ [ns.a, [1]]|sort }}",
        "compared",
    ),
    "raise_exception with a huge message": ("{{ raise_exception('line\\n' * 1000000) }}", "chat template: line"),
    "include": ("{% include 'x' %}", "failed"),
    "undefined call": ("{{ nothing() }}", "failed"),
}

CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from lfm_edge.chat_template import ChatTemplate
for name, source in json.loads(sys.stdin.read()).items():
    t0 = time.monotonic()
    try:
        t = ChatTemplate(source)
        load = None
    except BaseException as e:
        load = f"{type(e).__name__}: {e}"
    t1 = time.monotonic()
    error = kind = None
    if load is None:
        try:
            t.render([{"role": "user", "content": "hi"}])
        except BaseException as e:
            kind, error = type(e).__name__, str(e)
    t2 = time.monotonic()
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would report the (large)
    # pytest process this child was forked from
    with open("/proc/self/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) // 1024
    print(json.dumps({"name": name, "load": load, "load_s": t1 - t0, "render_s": t2 - t1,
                      "kind": kind, "error": error, "peak_mb": rss}), flush=True)
"""


@pytest.fixture(scope="module")
def hostile_results():
    sources = {name: source for name, (source, _) in HOSTILE.items()}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], input=json.dumps(sources), capture_output=True, text=True, timeout=600
    )
    rows = {}
    for line in out.stdout.splitlines():
        row = json.loads(line)
        rows[row["name"]] = row
    assert len(rows) == len(HOSTILE), out.stderr[-2000:]
    return rows


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_ends_in_one_sentence_quickly(hostile_results, name):
    row = hostile_results[name]
    words = HOSTILE[name][1]
    assert row["load"] is None, f"a template must load and fail when rendered: {row['load']}"
    assert row["load_s"] < 1.0, "nothing may be computed while the template compiles"
    assert row["kind"] in ("TemplateError", "TemplateLimit", "LfmEdgeError"), row
    assert "\n" not in row["error"] and len(row["error"]) < 400, row["error"]
    assert words in row["error"], row["error"]
    assert "out of memory" not in row["error"], "a bound should stop it before memory runs out"
    assert row["render_s"] < template_sandbox.MAX_SECONDS + 1.5, row
    # the child's peak over all the cases so far: Python, jinja2 and a few 64 MB strings at most
    assert row["peak_mb"] < 600, row


def test_nested_loops_stop_within_a_couple_of_seconds_in_process():
    t = ChatTemplate("{% for i in range(10**6) %}{% for j in range(10**6) %}{% endfor %}{% endfor %}")
    t0 = time.monotonic()
    with pytest.raises(TemplateError) as e:
        t.render(HI)
    assert time.monotonic() - t0 < 2.0
    assert str(e.value) == "the chat template asked for a range of more than 100,000 numbers"
    t = ChatTemplate("{% for i in range(10**5) %}{% for j in range(10**5) %}{{ i }}{% endfor %}{% endfor %}")
    t0 = time.monotonic()
    with pytest.raises(TemplateLimit, match="loop steps|ran for more than 2 s"):
        t.render(HI)
    assert time.monotonic() - t0 < template_sandbox.MAX_SECONDS + 1.0


def test_the_deadline_stops_a_loop_of_slow_calls():
    t = ChatTemplate("{% set s = 'ab' * 5000000 %}{% for i in range(100000) %}{{ s.count('a') }}{% endfor %}")
    t0 = time.monotonic()
    with pytest.raises(TemplateLimit, match=r"ran for more than 2 s and was stopped"):
        t.render(HI)
    assert time.monotonic() - t0 < template_sandbox.MAX_SECONDS + 1.0


def test_each_render_has_its_own_budget_and_threads_do_not_share_one():
    slow = ChatTemplate("{% set s = 'ab' * 5000000 %}{% for i in range(100000) %}{{ s.count('a') }}{% endfor %}")
    honest = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    errors = []

    def run_slow():
        try:
            slow.render(HI)
        except TemplateLimit as e:
            errors.append(str(e))

    th = threading.Thread(target=run_slow)
    th.start()
    outs = [honest.render([{"role": "user", "content": f"hi {i}"}]) for i in range(200)]
    th.join()
    assert outs[-1] == "<user>hi 199" and errors and "2 s" in errors[0]
    # and a budget spent by one render is not left for the next
    for _ in range(3):
        with pytest.raises(TemplateLimit):
            slow.render(HI)
    assert honest.render(HI) == "<user>hi"


def test_bounds_grow_with_the_input(monkeypatch):
    """A big conversation is not a hostile template: its text may pass the fixed bounds."""
    monkeypatch.setattr(template_sandbox, "MAX_WORK", 10_000)
    monkeypatch.setattr(template_sandbox, "MAX_OUTPUT", 10_000)
    t = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}|{{ m.content|trim }}{% endfor %}")
    big = "y" * 200_000
    assert t.render([{"role": "user", "content": big}]) == f"<user>{big}|{big}"
    with pytest.raises(TemplateLimit, match="characters"):
        ChatTemplate("{{ 'x' * 20000 }}").render(HI)


def test_nothing_is_folded_at_compile_time():
    """jinja2 folds constant expressions while compiling; the bounds only exist while rendering."""
    for source in ("{{ 'x' * 10**9 }}", "{{ 'x'|center(10**9) }}", "{{ 'x'|center(1000000000) }}", "{{ 10**(10**8) }}"):
        t0 = time.monotonic()
        t = ChatTemplate(source)
        assert time.monotonic() - t0 < 0.5
        with pytest.raises(TemplateLimit):
            t.render(HI)


def test_template_errors_are_one_short_line():
    t = ChatTemplate("{{ raise_exception('first line\\nsecond line') }}")
    with pytest.raises(TemplateError) as e:
        t.render(HI)
    assert str(e.value) == "chat template: first line second line"
    with pytest.raises(TemplateError) as e:
        ChatTemplate("{{ raise_exception('x' * 10**6) }}").render(HI)
    assert len(str(e.value)) < 400


def test_a_template_too_deep_to_parse_is_one_sentence():
    with pytest.raises(TemplateError, match="cannot be compiled|does not parse"):
        ChatTemplate("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}")


def test_hostile_input_data_is_one_sentence():
    t = ChatTemplate("{{ tools|tojson }}")
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(LfmEdgeError, match="nested too deeply"):
        t.render(HI, tools=[{"x": deep}])
    shared: list = ["x" * 1000]
    for _ in range(60):
        shared = [shared, shared]
    t0 = time.monotonic()
    with pytest.raises(TemplateLimit):
        t.render(HI, tools=[{"x": shared}])
    assert time.monotonic() - t0 < template_sandbox.MAX_SECONDS + 1.0
    with pytest.raises(LfmEdgeError, match="message 0 holds a lone surrogate"):
        t.render([{"role": "user", "content": "a\ud800b"}])


def test_model_with_a_hostile_template_loads_and_fails_only_when_chatting(gguf_path, tmp_path):
    from test_bad_input import rewrite

    import lfm_edge

    for source in ("{{ 'x' * 10**9 }}", "{% for %}", "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}"):
        path = rewrite(gguf_path("moe", "q8_0"), tmp_path / "hostile.gguf", set_key=("tokenizer.chat_template", source))
        t0 = time.monotonic()
        llm = lfm_edge.load(str(path))
        assert time.monotonic() - t0 < 10
        assert isinstance("".join(llm.generate("Hello", max_tokens=2, temperature=0)), str)  # the rest works
        with pytest.raises(TemplateError) as e:
            llm.chat_tokens(HI)
        assert "\n" not in str(e.value)
