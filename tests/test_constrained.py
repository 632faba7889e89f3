"""Constrained decoding (lfm_edge.grammar): on tiny random-weight models, whose free output
is gibberish, only the constraint can make a reply valid, so every reply must be."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import lfm_edge
from lfm_edge.errors import LfmEdgeError
from lfm_edge.grammar import Grammar, chat_grammar, tool_call_grammar
from lfm_edge.llm import GenerationStats
from lfm_edge.reply import Reply
from lfm_edge.sampling import Sampler, SamplingParams
from lfm_edge.tool_calls import parse_call_list

SEEDS = range(6)


@pytest.fixture(scope="module", params=["moe", "dense"])
def llm(request, gguf_path):
    return lfm_edge.load(gguf_path(request.param), n_ctx=1024)


def validate(value, schema, where="$"):
    """The JSON-schema features these tests use; raises AssertionError naming the path."""
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    if "anyOf" in schema:
        errors = []
        for alt in schema["anyOf"]:
            try:
                return validate(value, alt, where)
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{where}: no anyOf branch matches: {errors}")
    if kinds:
        checks = {
            "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
            "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
            "null": lambda v: v is None,
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        }
        assert any(checks[k](value) for k in kinds), f"{where}: {value!r} is not {kinds}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{where}: required {key!r} missing from {value!r}"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{where}: extra keys {set(value) - set(props)}"
        for key, v in value.items():
            if key in props:
                validate(v, props[key], f"{where}.{key}")
    if isinstance(value, list):
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)), f"{where}: {len(value)} items"
        for i, v in enumerate(value):
            validate(v, schema.get("items", {}), f"{where}[{i}]")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert value >= schema.get("minimum", value) and value <= schema.get("maximum", value), f"{where}: {value} out of range"
        if "exclusiveMinimum" in schema:
            assert value > schema["exclusiveMinimum"], f"{where}: {value}"
        if "exclusiveMaximum" in schema:
            assert value < schema["exclusiveMaximum"], f"{where}: {value}"
    if isinstance(value, str):
        assert schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)), f"{where}: length {len(value)}"
        if "pattern" in schema:
            assert re.search(schema["pattern"], value), f"{where}: {value!r} does not match {schema['pattern']}"


def obj(properties, required=None):
    return {"type": "object", "properties": properties, "required": list(required if required is not None else properties),
            "additionalProperties": False}


SCHEMAS = {
    "enum": obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3, None]}}),
    "nested": obj({"user": obj({"name": {"type": "string", "maxLength": 8},
                                "address": obj({"city": {"type": "string", "minLength": 2, "maxLength": 6},
                                                "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})}),
    "array_bounds": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    "optional": obj({"id": {"type": "integer", "minimum": 1, "maximum": 1000}, "note": {"type": "string", "maxLength": 5},
                     "done": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
                    required=["id"]),
    "number_ranges": obj({"t": {"type": "number", "minimum": -1.5, "maximum": 2.5, "multipleOf": 0.25},
                          "n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}}),
    "string_patterns": obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"},
                            "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.(com|org)$"}}),
    "any_of": obj({"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "null"},
                                   {"type": "string", "maxLength": 3}]}}),
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_reply_parses_and_validates(llm, name):
    schema = SCHEMAS[name]
    for seed in SEEDS:
        stats = GenerationStats()
        text = "".join(llm.generate("Data:", max_tokens=200, json_schema=schema, temperature=1.0, seed=seed, stats=stats))
        assert stats.finish_reason == "stop", (seed, text)
        validate(json.loads(text), schema)


def test_the_free_model_would_not_have_written_json(llm):
    """The test above means something: unconstrained, the same seeds give no JSON."""
    for seed in SEEDS:
        text = "".join(llm.generate("Data:", max_tokens=40, temperature=1.0, seed=seed))
        with pytest.raises(ValueError):
            json.loads(text)


def test_regex_and_lark(llm):
    for seed in SEEDS:
        text = "".join(llm.generate("x", max_tokens=40, regex=r"[0-9]{3}-[a-f]{2,4}", temperature=1.0, seed=seed))
        assert re.fullmatch(r"[0-9]{3}-[a-f]{2,4}", text), text
        lark = 'start: "yes" | "no" | "n=" NUM\nNUM: /[1-9][0-9]?/\n'
        text = "".join(llm.generate("x", max_tokens=40, grammar=lark, temperature=1.0, seed=seed))
        assert re.fullmatch(r"yes|no|n=[1-9][0-9]?", text), text


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": obj({
        "city": {"type": "string", "minLength": 1, "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "hourly": {"type": "boolean"},
        "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "minItems": 1, "maxItems": 3},
        "near": obj({"lat": {"type": "number", "minimum": -90, "maximum": 90, "multipleOf": 0.5}, "label": {"type": ["string", "null"], "maxLength": 4}},
                    required=["lat"]),
    }, required=["city"])}},
    {"type": "function", "function": {"name": "send_email", "parameters": obj({
        "to": {"type": "string", "pattern": "^[a-z]{1,6}@example\\.com$"}, "urgent": {"type": "boolean"}})}},
    {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "search", "parameters": obj({
        "q": {"type": "string", "maxLength": 5}, "n": {"type": "integer", "minimum": 1, "maximum": 3}}, required=[])}},
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def forced_calls(llm, tool_choice, seed, parallel=True):
    stats = GenerationStats()
    events = llm.chat_events([{"role": "user", "content": "What is the weather in Paris?"}], TOOLS, max_tokens=200,
                             tool_choice=tool_choice, parallel_tool_calls=parallel, temperature=1.0, seed=seed, stats=stats)
    reply = Reply.of(events)
    assert stats.finish_reason == "stop", reply.text
    assert reply.content == "" and reply.calls, reply.text
    body = reply.text.strip()[len("<|tool_call_start|>") : -len("<|tool_call_end|>")]
    assert parse_call_list(body) == reply.calls  # tool_calls.py reads it as the reply parser did
    for call in reply.calls:
        validate(call.arguments, SCHEMA_OF[call.name], call.name)
    return reply.calls


def test_tool_choice_required_always_gives_valid_calls(llm):
    for seed in SEEDS:
        forced_calls(llm, "required", seed)


@pytest.mark.parametrize("call, valid", [
    ('ping()', True),
    ('send_email(to="ann@example.com", urgent=False)', True),
    ('get_weather(city="Paris", days=3, near={"lat": -12.5, "label": None}), ping()', True),
    ('get_weather(city="Paris", unit="celsius", hours=[0, 23])', True),
    ('get_weather(days=3)', False),  # city is required
    ('get_weather(city="Paris", days=8)', False),  # days <= 7
    ('send_email(to="ann@example.org", urgent=True)', False),  # the pattern
    ('get_weather(city="Paris", hours=[])', False),  # minItems 1
    ('lookup(q="x")', False),  # not a tool
    ('search()', True),
    ('search(n=2)', True),
    ('search(q="a", n=3)', True),
    ('search(n=2, q="a")', False),  # the schema's order
    ('search(, n=2)', False),
    ('search(q=\'a\')', False),  # strings are double-quoted
    ('ping(), ping()', True),
])
def test_the_tool_call_grammar_accepts_exactly_the_valid_calls(llm, call, valid):
    assert accepts(llm, tool_call_grammar(TOOLS), f"<|tool_call_start|>[{call}]<|tool_call_end|>") == valid


def test_tool_choice_named_calls_that_tool(llm):
    for seed in SEEDS:
        calls = forced_calls(llm, {"type": "function", "function": {"name": "get_weather"}}, seed, parallel=False)
        assert [c.name for c in calls] == ["get_weather"]
    grammar = chat_grammar(None, TOOLS, {"type": "function", "function": {"name": "ping"}}, parallel_tool_calls=False)
    assert accepts(llm, grammar, "<|tool_call_start|>[ping()]<|tool_call_end|>")
    assert not accepts(llm, grammar, "<|tool_call_start|>[ping(), ping()]<|tool_call_end|>")


def test_response_format_json_schema_in_chat(llm):
    schema = SCHEMAS["nested"]
    for seed in SEEDS[:3]:
        text = llm.chat([{"role": "user", "content": "Who?"}], stream=False, max_tokens=200, temperature=1.0, seed=seed,
                        response_format={"type": "json_schema", "json_schema": {"name": "who", "schema": schema, "strict": True}})
        validate(json.loads(text), schema)


def test_response_format_with_tools_on_auto_is_the_json_or_a_call(llm):
    schema = SCHEMAS["enum"]
    grammar = chat_grammar({"type": "json_schema", "json_schema": {"schema": schema}}, TOOLS, "auto")
    for text, valid in [('{"color": "red", "size": None}', False), ('{"color": "red", "size": null}', True),
                        ("<|tool_call_start|>[ping()]<|tool_call_end|>", True), ("Hello", False)]:
        assert accepts(llm, grammar, text) == valid, text
    for seed in SEEDS[:3]:
        reply = Reply.of(llm.chat_events([{"role": "user", "content": "hi"}], TOOLS, max_tokens=200, temperature=1.0,
                                         seed=seed, response_format={"type": "json_schema", "json_schema": {"schema": schema}}))
        if reply.calls:
            assert reply.content == ""
        else:
            validate(json.loads(reply.content), schema)


def test_a_reply_that_opens_in_reasoning_reasons_first(llm):
    """LFM2.5: the answer's grammar starts after </think> (a special token)."""
    grammar = Grammar.from_json_schema(SCHEMAS["enum"]).after_reasoning()
    assert accepts(llm, grammar, 'Any thoughts {"color" at all.</think>{"color": "blue", "size": 2}')
    assert not accepts(llm, grammar, 'Thoughts.</think>{"color": "pink", "size": 2}')
    assert not accepts(llm, grammar, '{"color": "blue", "size": 2}')  # still reasoning: not complete


def accepts(llm, grammar, text):
    """The grammar takes text's tokens one by one and is then complete."""
    constraint = llm.constraint(grammar)
    for token in llm.tokenize(text, add_special=False):
        if not constraint.allowed()[token]:
            return False
        constraint.advance(token)
    return constraint.is_done() or bool(constraint.allowed()[llm.tokenizer.eos_id])


def test_tool_choice_none_never_calls(llm):
    grammar = chat_grammar(None, TOOLS, "none")
    assert accepts(llm, grammar, "Plain words.") and not accepts(llm, grammar, "<|tool_call_start|>[ping()]<|tool_call_end|>")
    for seed in SEEDS[:3]:
        reply = Reply.of(llm.chat_events([{"role": "user", "content": "hi"}], TOOLS, max_tokens=30, tool_choice="none",
                                         temperature=1.0, seed=seed))
        assert not reply.calls and "<|tool_call_start|>" not in reply.text


def test_budget_ending_mid_structure_is_length(llm):
    stats = GenerationStats()
    text = "".join(llm.generate("x", max_tokens=4, json_schema=SCHEMAS["nested"], temperature=1.0, seed=0, stats=stats))
    assert stats.finish_reason == "length" and stats.completion_tokens == 4
    assert text.startswith('{"user": ')


def test_the_mask_is_applied_before_sampling_with_every_filter(llm):
    """Greedy, top-k 1 and min-p 1 choose among the allowed tokens only."""
    for options in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 1}, {"temperature": 1.0, "min_p": 1.0},
                    {"temperature": 0.7, "top_p": 0.01, "repetition_penalty": 1.3}):
        text = "".join(llm.generate("x", max_tokens=20, regex="(ab|cd){1,3}!", **options))
        assert re.fullmatch("(ab|cd){1,3}!", text), (options, text)


@pytest.mark.parametrize("kwargs, message", [
    ({"json_schema": {"type": "frob"}}, "the JSON schema cannot be used: .*frob"),
    ({"json_schema": "{not json"}, "the JSON schema is not valid JSON"),
    ({"json_schema": {"type": "string", "format": "frobnicate"}}, "Unknown format"),
    ({"json_schema": {"allOf": [{"type": "string"}, {"type": "integer"}]}}, "[Uu]nsatisfiable"),
    ({"json_schema": {"type": "array", "minItems": 5, "maxItems": 2}}, "[Uu]nsatisfiable"),
    ({"regex": "[a-z"}, "the regular expression cannot be used: .*unclosed"),
    ({"grammar": "start: foo"}, "the grammar cannot be used: .*foo"),
    ({"grammar": "start: ("}, "the grammar cannot be used"),
    ({"json_schema": {}, "regex": "a"}, "give one of grammar, json_schema and regex"),
    ({"json_schema": {"type": "number", "maximum": float("nan")}}, "a value JSON cannot write"),
    ({"json_schema": {"enum": {1, 2}}}, "a value JSON cannot write"),
])
def test_bad_grammar_is_one_sentence(llm, kwargs, message):
    with pytest.raises(LfmEdgeError, match=message) as e:
        llm.generate("x", max_tokens=5, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tool_choice, tools, message", [
    ({"type": "function", "function": {"name": "nope"}}, TOOLS, "'nope', which is not one of the tools"),
    ("required", [], "tool_choice needs tools"),
    ("sometimes", TOOLS, "tool_choice must be"),
    ("required", [{"type": "function", "function": {"name": "get-weather"}}], "Python name"),
    ("required", [{"name": "f", "parameters": obj({"class": {"type": "integer"}})}], "keyword argument"),
    ("required", [{"name": "f", "parameters": {"type": "object", "properties": {}, "required": ["x"]}}], "properties do not define"),
    ("required", [{"name": "f", "parameters": obj({"x": {"$ref": "http://x/y"}})}], "only references inside"),
])
def test_bad_tool_choice_is_one_sentence(llm, tool_choice, tools, message):
    with pytest.raises(LfmEdgeError, match=message):
        llm.chat_events([{"role": "user", "content": "hi"}], tools, tool_choice=tool_choice)


def test_response_format_errors(llm):
    with pytest.raises(LfmEdgeError, match="response_format type 'yaml' is not supported"):
        llm.chat([{"role": "user", "content": "hi"}], response_format={"type": "yaml"})
    with pytest.raises(LfmEdgeError, match="json_schema needs"):
        llm.chat([{"role": "user", "content": "hi"}], response_format={"type": "json_schema"})


def deep_schema(depth):
    return '{"type": "object", "properties": {"a": ' * depth + '{"type": "integer"}' + "}}" * depth


@pytest.mark.parametrize("schema, message", [
    (deep_schema(20_000), "nested more than"),  # deeper than Python's json can read
    ({"type": "string", "enum": [f"value-{i}" for i in range(200_000)]}, "too large|too complex"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{3,9}"} for i in range(20_000)}},
     "too large|too complex"),
    (json.loads(deep_schema(60)), "too large|too complex|nested|recursion"),
])
def test_huge_or_deep_schema_is_refused_quickly(llm, schema, message):
    start = time.perf_counter()
    with pytest.raises(LfmEdgeError, match=message):
        llm.generate("x", max_tokens=5, json_schema=schema)
    assert time.perf_counter() - start < 3.0


def test_compiled_grammars_are_reused_and_independent(llm):
    """A second request with the same schema starts from a fresh parser, not from the first's state."""
    grammar = Grammar.from_json_schema(SCHEMAS["enum"])
    a, b = llm.constraint(grammar), llm.constraint(grammar)
    first = int(np.flatnonzero(a.allowed())[0])
    a.advance(first)
    assert np.array_equal(b.allowed(), llm.constraint(grammar).allowed())
    assert not np.array_equal(a.allowed(), b.allowed())


def test_the_sampler_hook_works_with_the_loop_directly(llm):
    """What an engine does: Sampler(params, constraint) through decode_tokens."""
    grammar = tool_call_grammar(TOOLS, name="ping")
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0), llm.constraint(grammar))
    stats = GenerationStats()
    ids = list(llm.decode_tokens(llm.tokenize("x"), 50, sampler, stats=stats))
    assert llm.detokenize(ids) == "<|tool_call_start|>[ping()]<|tool_call_end|>" and stats.finish_reason == "stop"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "lfm_edge", *args], capture_output=True, text=True, timeout=120)


def test_cli_json_schema_grammar_and_regex(gguf_path, tmp_path):
    model = str(gguf_path("moe"))
    schema = SCHEMAS["optional"]
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.lark").write_text('start: "A" | "B" NUM\nNUM: /[0-9]{2}/\n')
    proc = cli("run", "-m", model, "hi", "--json-schema", str(tmp_path / "s.json"), "--temp", "1", "-s", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    validate(json.loads(record["content"]), schema)
    assert record["finish_reason"] == "stop"
    proc = cli("run", "-m", model, "hi", "--grammar", str(tmp_path / "g.lark"), "--raw", "--temp", "1")
    assert proc.returncode == 0 and re.fullmatch(r"A|B[0-9]{2}", proc.stdout.strip()), proc
    proc = cli("run", "-m", model, "hi", "--regex", "[xyz]{5}", "--temp", "1")
    assert proc.returncode == 0 and re.fullmatch("[xyz]{5}", proc.stdout.strip()), proc


def test_cli_errors_are_one_line(gguf_path, tmp_path):
    model = str(gguf_path("moe"))
    (tmp_path / "bad.json").write_text('{"type": "frob"}')
    for args, message in [
        (["--json-schema", str(tmp_path / "missing.json")], "No such file"),
        (["--json-schema", str(tmp_path / "bad.json")], "the JSON schema cannot be used"),
        (["--regex", "("], "the regular expression cannot be used"),
    ]:
        proc = cli("run", "-m", model, "hi", *args)
        assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    proc = cli("run", "-m", model, "hi", "--regex", "a", "--grammar", "g.lark")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
