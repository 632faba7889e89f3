"""The published LFM2 / LFM2.5 chat templates render exactly as transformers renders them.

tests/golden/templates/expected.json holds transformers' `apply_chat_template` output for
every template x conversation in make_template_goldens.CASES (regenerate with
`python tests/make_template_goldens.py`); the tests marked live recompute it with
transformers and skip when it is not installed.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import make_template_goldens as goldens  # noqa: E402
from test_bad_input import rewrite  # noqa: E402

import lfm_edge  # noqa: E402
from lfm_edge.chat_template import ChatTemplate, TemplateError, normalize_messages  # noqa: E402
from lfm_edge.errors import LfmEdgeError  # noqa: E402

EXPECTED = json.loads(goldens.EXPECTED.read_text())["templates"]
TEMPLATES = goldens.templates()
PAIRS = [(t, c) for t in sorted(EXPECTED) for c in goldens.CASES]


def ours(source: str) -> ChatTemplate:
    return ChatTemplate(
        source,
        bos_token=goldens.BOS,
        eos_token=goldens.EOS,
        special_tokens={"pad_token": goldens.PAD},
        clock=lambda: goldens.NOW,
    )


def render(name: str, case: dict) -> str:
    return ours(TEMPLATES[name]).render(
        case["messages"],
        tools=case.get("tools"),
        add_generation_prompt=case.get("add_generation_prompt", True),
        **case.get("kwargs", {}),
    )


@pytest.fixture(scope="module")
def transformers():
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    return goldens


def hf_render(source: str, messages: list, **kwargs) -> str:
    """transformers' rendering of `messages` as given (no case rewriting)."""
    case = {"messages": messages, **kwargs}
    out = goldens.render_with_transformers(source, case, "")
    if "error" in out:
        raise AssertionError(out["error"])
    return out["text"]


# -- the committed strings ------------------------------------------------------------


def test_every_template_and_case_is_in_the_goldens():
    assert set(EXPECTED) == set(TEMPLATES)
    for name in EXPECTED:
        assert set(EXPECTED[name]) == set(goldens.CASES), name


@pytest.mark.parametrize("name,case", PAIRS, ids=[f"{t}/{c}" for t, c in PAIRS])
def test_renders_byte_for_byte_like_transformers(name, case):
    want = EXPECTED[name][case]
    if "error" in want:
        with pytest.raises(LfmEdgeError):
            render(name, goldens.CASES[case])
    else:
        assert render(name, goldens.CASES[case]) == want["text"]


def test_goldens_cover_what_matters():
    """The conversations reach the branches they were written for, in the real templates."""
    eight = EXPECTED["hf-LFM2.5-8B-A1B"]
    assert "<think>Three and three.</think>6" in eight["thinking-in-history"]["text"]
    assert "Two and two" not in eight["thinking-in-history"]["text"]  # past thinking dropped...
    assert "<think>Two and two make four.</think>4" in eight["thinking-in-history-preserved"]["text"]  # ...unless kept
    assert "<think></think>Bye!" in eight["thinking-empty-and-absent"]["text"]  # empty, but given
    assert "<think>" not in EXPECTED["hf-LFM2.5-2.6B"]["thinking-empty-and-absent"]["text"]  # empty: left out
    assert EXPECTED["hf-LFM2.5-2.6B"]["one-user-turn"]["text"].endswith("<|im_start|>assistant\n<think>")
    assert "Today's date: 2025-03-14" in EXPECTED["llama.cpp-LFM2.5-8B-A1B"]["empty-system-with-tools"]["text"]
    assert "[get_weather(city='Paris', days=3), search(" in eight["openai-string-arguments"]["text"]
    assert "query='O\\'Brien" in EXPECTED["hf-LFM2.5-2.6B"]["odd-arguments-and-two-calls"]["text"]
    assert '<|tool_call_start|>[get_weather(city="Paris", days=2)]' in EXPECTED["hf-LFM2"]["tool-round-trip"]["text"]
    assert "<think>Two and two make four.</think>4" in (
        EXPECTED["llama.cpp-LFM2.5-Instruct"]["thinking-in-history-preserved"]["text"]
    )
    assert "\n\tindented\n\n  lines  \n" in EXPECTED["hf-LFM2"]["whitespace-kept"]["text"]
    assert not any("error" in v for t in EXPECTED.values() for v in t.values())


def test_template_fields_are_detected_as_read_by_hand():
    for name, source in TEMPLATES.items():
        t = ours(source)
        assert (not t.reads_tool_calls) == (name in goldens.CALLS_IN_CONTENT), name
        assert (t.splits_thinking and not t.reads_thinking) == (name in goldens.THINKING_IN_CONTENT), name


# -- live: transformers now -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_goldens_are_what_transformers_renders_today(transformers, name):
    got = {c: transformers.render_with_transformers(TEMPLATES[name], case, name) for c, case in goldens.CASES.items()}
    assert got == EXPECTED[name]


@pytest.mark.parametrize("name", ["hf-LFM2.5-2.6B", "hf-LFM2.5-8B-A1B", "llama.cpp-LFM2.5-8B-A1B"])
def test_content_parts_render_as_transformers_renders_the_parts_themselves(transformers, name):
    """Templates that read content parts join them with nothing between: joining first changes nothing."""
    case = goldens.CASES["openai-content-parts"]
    assert render(name, case) == hf_render(TEMPLATES[name], case["messages"])


def test_the_newest_template_refuses_string_arguments_that_we_parse(transformers):
    case = goldens.CASES["openai-string-arguments"]
    out = transformers.render_with_transformers(TEMPLATES["hf-LFM2.5-2.6B"], {**case, "hf": case["messages"]}, "")
    assert "JSON-encoded string" in out["error"]
    assert render("hf-LFM2.5-2.6B", case) == EXPECTED["hf-LFM2.5-2.6B"]["openai-string-arguments"]["text"]


GENERATION_SCOPE = (
    "{% set x = 'outer' %}{% for m in messages %}{% generation %}{% set x = 'inner' %}"
    "[{{ m.content }}:{{ x }}:{{ loop.index }}]{% endgeneration %}{% endfor %}{{ x }}"
)


def test_generation_block_renders_its_body_in_its_own_scope(transformers):
    messages = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert ours(GENERATION_SCOPE).render(messages) == "[a:inner:1][b:inner:2]outer"
    assert hf_render(GENERATION_SCOPE, messages, add_generation_prompt=True) == "[a:inner:1][b:inner:2]outer"


VARIABLES = (
    "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ enable_thinking }}|{{ custom | tojson }}|"
    "{{ tools is none }}|{{ documents is none }}|{{ add_generation_prompt }}|{{ strftime_now('%d %b %Y') }}|"
    "{{ dict(a=1) | tojson }}|{{ 'é' | tojson }}|{{ {'b': 1, 'a': [1, 2]} | tojson(indent=2, sort_keys=true) }}"
)


def test_variables_globals_and_filters_are_transformers(transformers):
    messages = [{"role": "user", "content": "x"}]
    kwargs = {"enable_thinking": False, "custom": {"k": ["v"]}}
    mine = ours(VARIABLES).render(messages, add_generation_prompt=False, **kwargs)
    assert mine == hf_render(VARIABLES, messages, add_generation_prompt=False, kwargs=kwargs)
    assert mine.startswith("<|startoftext|>|<|im_end|>|<|pad|>|False|{\"k\": [\"v\"]}|True|True|False|14 Mar 2025|")


# -- the rules, one by one -------------------------------------------------------------


def test_caller_keywords_override_special_tokens_but_not_the_renderer():
    t = ours("{{ bos_token }}{{ messages | length }}")
    assert t.render([{"role": "user", "content": "x"}], bos_token="<s>") == "<s>1"
    with pytest.raises(LfmEdgeError, match="'documents' is set by the renderer"):
        t.render([{"role": "user", "content": "x"}], documents=[])


def test_namespace_refuses_private_names_and_dict_is_only_a_builder():
    with pytest.raises(TemplateError, match="unsafe"):
        ours("{% set ns = namespace(_x=1) %}{{ ns._x }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError, match="unsafe"):
        ours("{% set ns = namespace() %}{% set ns._y = 2 %}").render([{"role": "user", "content": "x"}])
    assert ours("{{ dict.fromkeys(['a'], 0) | tojson }}").render([{"role": "user", "content": "x"}]) == '{"a": 0}'


def test_strftime_now_reads_the_clock():
    t = ChatTemplate("{{ strftime_now('%Y-%m-%d %H:%M') }}", clock=lambda: datetime(2024, 2, 29, 23, 59))
    assert t.render([{"role": "user", "content": "x"}]) == "2024-02-29 23:59"


def test_normalize_messages():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "a"}, "b"]},
        {"role": "assistant", "content": None, "reasoning_content": "r", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": ' {"x": [1, "y"]} '}},
            {"name": "flat", "arguments": ""},
        ]},
        {"role": "tool", "tool_call_id": "1", "content": "ok", "name": None},
    ]
    before = json.dumps(messages)
    out = normalize_messages(messages)
    assert json.dumps(messages) == before  # the caller's messages are not changed
    assert out[0] == {"role": "system", "content": "ab"}
    assert out[1] == {
        "thinking": "r",
        "role": "assistant",
        "reasoning_content": "r",
        "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": {"x": [1, "y"]}}},
            {"name": "flat", "arguments": {}},
        ],
    }
    assert out[2] == {"role": "tool", "tool_call_id": "1", "content": "ok"}
    inlined = normalize_messages(messages, calls_in_content=True, thinking_in_content=True)[1]
    assert inlined == {
        "role": "assistant",
        "content": '<think>r</think><|tool_call_start|>[f(x=[1, "y"]), flat()]<|tool_call_end|>',
    }
    # argument names Python cannot spell: LFM2's JSON form
    odd = normalize_messages(
        [{"role": "assistant", "tool_calls": [{"function": {"name": "g", "arguments": '{"not ok": 1}'}}]}],
        calls_in_content=True,
    )
    assert odd[0]["content"] == '<|tool_call_start|>[{"name": "g", "arguments": {"not ok": 1}}]<|tool_call_end|>'


@pytest.mark.parametrize(
    "message,words",
    [
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "type 'image_url'"),
        ({"role": "user", "content": {"a": 1}}, "not text"),
        ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}, "not valid JSON"),
        ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}, "JSON object"),
        ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, "needs a function with a name"),
        ({"role": "assistant", "tool_calls": {"function": {}}}, "not a list"),
    ],
)
def test_bad_messages_are_one_sentence(message, words):
    with pytest.raises(LfmEdgeError, match=words) as e:
        normalize_messages([message])
    assert "\n" not in str(e.value) and str(e.value).startswith("message 0")


# -- a model file whose template cannot be used still loads ---------------------------


@pytest.fixture(scope="module")
def template_file(gguf_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")

    def make(source: str, name: str) -> Path:
        return rewrite(gguf_path("moe", "q8_0"), root / f"{name}.gguf", set_key=("tokenizer.chat_template", source))

    return make


def test_a_template_that_does_not_parse_fails_only_the_chat(template_file):
    llm = lfm_edge.load(template_file("{% for m in messages %}{% frobnicate %}{% endfor %}", "broken"))
    assert "".join(llm.generate("Hello", max_tokens=3, temperature=0))  # raw text still works
    for attempt in (
        lambda: llm.chat([{"role": "user", "content": "Hi"}], stream=False, max_tokens=2),
        lambda: llm.apply_chat_template([{"role": "user", "content": "Hi"}]),
        lambda: llm.chat_tokens([{"role": "user", "content": "Hi"}]),
    ):
        with pytest.raises(TemplateError) as e:
            attempt()
        message = str(e.value)
        assert "broken.gguf: the chat template does not parse: Encountered unknown tag 'frobnicate'" in message
        assert "\n" not in message


def test_a_template_that_fails_while_rendering_is_one_sentence(template_file):
    llm = lfm_edge.load(template_file("{{ messages[0].content.nope() }}", "fails"))
    with pytest.raises(TemplateError, match="^the chat template failed: ") as e:
        llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "\n" not in str(e.value)


def test_the_real_lfm25_8b_template_in_a_model_file(template_file):
    llm = lfm_edge.load(template_file(TEMPLATES["hf-LFM2.5-8B-A1B"], "lfm25"))
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "easy"},
        {"role": "user", "content": "3+3?"},
    ]
    text = llm.apply_chat_template(messages, add_generation_prompt=False)
    # past thinking is dropped by default...
    assert text == (
        "<|startoftext|><|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\n3+3?<|im_end|>\n"
    )
    # ...and kept with the template's own keyword, passed through render_chat and chat_tokens
    kept = llm.render_chat(messages, preserve_thinking=True)
    assert "<think>easy</think>4" in kept and kept.endswith("<|im_start|>assistant\n")
    ids = llm.chat_tokens(messages, preserve_thinking=True)
    assert ids == llm.tokenize(kept, add_special=False) and ids.count(llm.tokenizer.bos_id) == 1
