"""The server's OpenAI extras through the official `openai` client, on a tiny random-weight
model whose free output is gibberish: only the grammar can make a reply valid, so every
reply must be. response_format, tool_choice, parallel_tool_calls, strict tools, logprobs,
stream_options, n, /tokenize and /detokenize, --api-key."""

from __future__ import annotations

import argparse
import http.client
import json
import re
import threading

import numpy as np
import ollama
import openai
import pytest

import lfm_edge
from lfm_edge.commands import serve
from lfm_edge.server import make_server
from lfm_edge.server.protocol import strict_calls_grammar
from test_constrained import SCHEMA_OF, SCHEMAS, TOOLS, accepts, validate

SEEDS = range(5)
HOT = dict(temperature=1.0, top_p=1.0, extra_body={"min_p": 0.0, "top_k": 0, "repetition_penalty": 1.0})
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def start(llm, **kw):
    srv = make_server(llm, port=0, model_id="tiny-moe", **kw)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return srv, thread


def stop(srv, thread):
    srv.shutdown()
    srv.close()
    thread.join(10)


@pytest.fixture(scope="module")
def llm(gguf_path):
    return lfm_edge.load(gguf_path("moe", "q8_0"), n_ctx=2048)


@pytest.fixture(scope="module")
def server(llm):
    srv, thread = start(llm)
    yield srv
    stop(srv, thread)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def chat(client, messages=ASK, **kw):
    return client.chat.completions.create(model="tiny-moe", messages=messages, **kw)


def raw(server, method, path, body=None, headers=None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


# -- response_format ---------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_replies_all_parse_and_validate(client, name):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    for seed in SEEDS:
        reply = chat(client, max_tokens=300, seed=seed, response_format=fmt, **HOT)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        validate(json.loads(choice.message.content), schema)
    # streamed: the same reply, piece by piece
    pieces = [c.choices[0].delta.content or "" for c in chat(client, max_tokens=300, seed=0, response_format=fmt,
                                                             stream=True, **HOT) if c.choices]
    assert "".join(pieces) == chat(client, max_tokens=300, seed=0, response_format=fmt, **HOT).choices[0].message.content


def test_json_object_replies_are_objects_or_cut_off(client):
    """Any object: nothing bounds its strings, and a random model fills a key until the budget
    ends (seed 0 closes its object); a reply that ends by itself is always an object."""
    reasons = []
    for seed in SEEDS:
        choice = chat(client, max_tokens=200, seed=seed, response_format={"type": "json_object"}, **HOT).choices[0]
        reasons.append(choice.finish_reason)
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    assert "stop" in reasons


def test_the_free_model_writes_no_json(client):
    """What the tests above mean: unconstrained, the same requests give no JSON."""
    for seed in SEEDS:
        with pytest.raises(ValueError):
            json.loads(chat(client, max_tokens=40, seed=seed, **HOT).choices[0].message.content)


def test_a_budget_ending_mid_structure_is_length(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMAS["nested"]}}
    reply = chat(client, max_tokens=4, seed=0, response_format=fmt, **HOT)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    assert reply.choices[0].message.content.startswith('{"user": ')


def test_completions_take_a_response_format(client):
    for seed in SEEDS[:3]:
        out = client.completions.create(model="tiny-moe", prompt="Data:", max_tokens=300, seed=seed,
                                        temperature=1.0, extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMAS["enum"]}}})
        validate(json.loads(out.choices[0].text), SCHEMAS["enum"])


# -- tool_choice --------------------------------------------------------------------------


def calls_of(message):
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_tool_choice_required_always_gives_valid_calls(client):
    for seed in SEEDS:
        reply = chat(client, tools=TOOLS, tool_choice="required", max_tokens=300, seed=seed, **HOT)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = calls_of(choice.message)
        assert calls
        for name, args in calls:
            validate(args, SCHEMA_OF[name], name)
        assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)


def test_tool_choice_named_calls_that_tool_once_without_parallel_calls(client):
    for seed in SEEDS:
        reply = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                     parallel_tool_calls=False, max_tokens=300, seed=seed, **HOT)
        (name, args), = calls_of(reply.choices[0].message)
        assert name == "get_weather" and reply.choices[0].finish_reason == "tool_calls"
        validate(args, SCHEMA_OF[name], name)


def test_forced_calls_stream_as_tool_call_deltas(client):
    kw = dict(tools=TOOLS, tool_choice="required", max_tokens=300, seed=3, **HOT)
    whole = calls_of(chat(client, **kw).choices[0].message)
    calls, finish = {}, None
    for chunk in chat(client, stream=True, **kw):
        for tc in chunk.choices[0].delta.tool_calls or []:
            calls[tc.index] = (tc.function.name, json.loads(tc.function.arguments))
        finish = chunk.choices[0].finish_reason or finish
    assert [calls[i] for i in sorted(calls)] == whole and finish == "tool_calls"


def test_tool_choice_none_never_calls(client):
    for seed in SEEDS[:3]:
        reply = chat(client, tools=TOOLS, tool_choice="none", max_tokens=30, seed=seed, **HOT)
        assert reply.choices[0].message.tool_calls is None
        assert "<|tool_call_start|>" not in reply.choices[0].message.content


def test_strict_tools_on_auto_hold_any_call_to_its_schema(llm, client):
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    grammar = strict_calls_grammar([t["function"] for t in strict], parallel=True, think=False)
    for text, ok in [("Sure. <|tool_call_start|>[ping()]<|tool_call_end|> Done.", True), ("No call at all", True),
                     ('<|tool_call_start|>[get_weather(days=3)]<|tool_call_end|>', False),
                     ('<|tool_call_start|>[lookup(q="x")]<|tool_call_end|>', False)]:
        assert accepts(llm, grammar, text) == ok, text
    # where the vocabulary has <think> tokens, a reply may reason first, then call
    thinking = strict_calls_grammar([t["function"] for t in strict], parallel=True, think=True)
    assert accepts(llm, thinking, "<think>Which tool?</think>Sure. <|tool_call_start|>[ping()]<|tool_call_end|>")
    assert not accepts(llm, thinking, "<think>x</think><|tool_call_start|>[get_weather(days=3)]<|tool_call_end|>")
    for seed in SEEDS:
        reply = chat(client, tools=strict, max_tokens=60, seed=seed, **HOT)
        for name, args in calls_of(reply.choices[0].message):
            validate(args, SCHEMA_OF[name], name)
        assert "<|tool_call_start|>" not in (reply.choices[0].message.content or "")


# -- logprobs, usage, n ------------------------------------------------------------------------


def test_logprobs_are_the_models(llm, client):
    reply = chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                 response_format={"type": "json_schema", "json_schema": {"schema": SCHEMAS["enum"]}})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    for e in content:
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert len(e.top_logprobs) == 3 and e.logprob <= e.top_logprobs[0].logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    # the first token's logprob and alternatives, computed apart from the server
    prompt = llm.chat_tokens(ASK)
    logits = llm.logits(prompt)[-1].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    first = llm.tokenize(content[0].token, add_special=False)[0]
    assert content[0].logprob == pytest.approx(logp[first], abs=1e-4)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(sorted(logp, reverse=True)[:3], abs=1e-4)
    # streamed: the same entries, spread over the chunks
    streamed = [e for c in chat(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True,
                                response_format={"type": "json_schema", "json_schema": {"schema": SCHEMAS["enum"]}})
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert chat(client, max_tokens=3, temperature=0).choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(client):
    out = client.completions.create(model="tiny-moe", prompt="Once", max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and len(lp.token_logprobs) == 5
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_stream_options_include_usage(client):
    chunks = list(chat(client, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.usage is None for c in chat(client, max_tokens=5, temperature=0, stream=True))


def test_n_above_one_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError, match="n must be 1") as e:
        chat(client, n=2)
    assert e.value.body["param"] == "n"


# -- bad input -----------------------------------------------------------------------------

BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "frob"}}}}, "response_format",
     "the JSON schema cannot be used"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array", "minItems": 5, "maxItems": 2}}}},
     "response_format", "nsatisfiable"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope', which is not one"),
    ({"tools": [{"type": "function", "function": {"name": "get-weather"}}], "tool_choice": "required"}, "tool_choice",
     "Python name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"x": {"$ref": "http://x"}}}}}]}, "tools", "only references inside"),
]


@pytest.mark.parametrize("extra, param, words", BAD)
def test_bad_structure_is_one_sentence(server, extra, param, words):
    status, body = raw(server, "POST", "/v1/chat/completions", {"messages": ASK, **extra})
    assert status == 400 and body["error"]["param"] == param, body
    assert re.search(words, body["error"]["message"]) and "\n" not in body["error"]["message"]


# -- /tokenize and /detokenize ----------------------------------------------------------------


def test_tokenize_and_detokenize_in_llama_servers_shapes(llm, server):
    text = "Hello wörld<|im_end|>"
    status, body = raw(server, "POST", "/tokenize", {"content": text})
    assert status == 200 and body == {"tokens": llm.tokenize(text, add_special=False)}
    _, with_bos = raw(server, "POST", "/tokenize", {"content": text, "add_special": True})
    assert with_bos["tokens"] == llm.tokenize(text, add_special=True)
    _, pieces = raw(server, "POST", "/tokenize", {"content": text, "with_pieces": True})
    assert [p["id"] for p in pieces["tokens"]] == body["tokens"]
    joined = b"".join(bytes(p["piece"]) if isinstance(p["piece"], list) else p["piece"].encode() for p in pieces["tokens"])
    assert joined.decode() == text
    _, mixed = raw(server, "POST", "/tokenize", {"content": ["Hi", 7, " there"]})
    assert mixed["tokens"] == llm.tokenize("Hi", add_special=False) + [7] + llm.tokenize(" there", add_special=False)
    status, back = raw(server, "POST", "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back == {"content": text}
    assert raw(server, "POST", "/detokenize", {})[1] == {"content": ""}


# -- --api-key -------------------------------------------------------------------------------


def test_api_key(llm, monkeypatch):
    srv, thread = start(llm, api_key="sekret")
    try:
        good = openai.OpenAI(base_url=srv.url, api_key="sekret", max_retries=0, timeout=30)
        bad = openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0, timeout=30)
        assert chat(good, max_tokens=2, temperature=0).usage.completion_tokens == 2
        with pytest.raises(openai.AuthenticationError) as e:
            chat(bad, max_tokens=2)
        assert e.value.status_code == 401 and "API key" in e.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert raw(srv, "POST", "/tokenize", {"content": "x"})[0] == 401
        status, body = raw(srv, "GET", "/api/tags")
        assert status == 401 and "API key" in body["error"]  # ollama's error shape
        assert raw(srv, "GET", "/api/tags", headers={"X-Api-Key": "sekret"})[0] == 200
        assert raw(srv, "GET", "/health")[0] == 200  # public, as in llama-server
        # the ollama client sends the key as a header
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=srv.base_url).list()
        assert e.value.status_code == 401
        keyed = ollama.Client(host=srv.base_url, headers={"Authorization": "Bearer sekret"})
        assert [m.model for m in keyed.list().models] == ["tiny-moe"]
    finally:
        stop(srv, thread)
    # the command: --api-key, or the environment
    p = argparse.ArgumentParser()
    serve.configure_parser(p)
    assert p.parse_args(["-m", "x.gguf"]).api_key is None
    assert p.parse_args(["-m", "x.gguf", "--api-key", "k1"]).api_key == "k1"
    monkeypatch.setenv("LFM_EDGE_API_KEY", "k2")
    p = argparse.ArgumentParser()
    serve.configure_parser(p)
    assert p.parse_args(["-m", "x.gguf"]).api_key == "k2"
    assert "anyone with the API key" in serve.bind_warning("0.0.0.0", "k2")


def test_a_huge_schema_is_refused_in_one_sentence(server):
    # 2 MB of enum: over the body limit of this server's 2048-token context (a 413 before any
    # compiling); the grammar's own size and time bounds are tested in test_constrained.py
    huge = {"response_format": {"type": "json_schema", "json_schema": {"schema": {"enum": [f"v{i}" for i in range(200_000)]}}}}
    status, body = raw(server, "POST", "/v1/chat/completions", {"messages": ASK, **huge})
    assert status == 413 and body["error"]["code"] == "body_too_large", body
    assert "\n" not in body["error"]["message"]
