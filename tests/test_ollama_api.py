"""ollama's API on `lfm-edge serve`, driven by the official `ollama` Python client over
loopback: every endpoint's shape, options, format (a JSON schema or "json", through the
same constrained decoding as the OpenAI side), tools with object arguments, thinking,
and ollama's errors."""

from __future__ import annotations

import http.client
import json
import threading

import ollama
import openai
import pytest

import lfm_edge
from lfm_edge.commands.common import card_defaults
from lfm_edge.server import make_server
from lfm_edge.server import ollama as ollama_api
from lfm_edge.reply import Reply
from test_constrained import SCHEMAS, validate
from test_reply import THINK_TEMPLATE, rewrite
from test_server import CANNED_CALL, WEATHER_TOOL, say

SEEDS = range(5)
HOT = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def start(llm, model_id="tiny-moe"):
    srv = make_server(llm, port=0, model_id=model_id)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return srv, thread


@pytest.fixture(scope="module")
def llm(gguf_path):
    return lfm_edge.load(gguf_path("moe", "q8_0"), n_ctx=2048)


@pytest.fixture(scope="module")
def server(llm):
    srv, thread = start(llm)
    yield srv
    srv.shutdown()
    srv.close()
    thread.join(10)


@pytest.fixture
def client(server):
    return ollama.Client(host=server.base_url, timeout=60)


def raw(server, method, path, body=None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        data, headers = (None, {}) if body is None else (json.dumps(body).encode(), {"Content-Type": "application/json"})
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


# -- the model ------------------------------------------------------------------------------


def test_tags_and_v1_models_list_the_same_model(client, server, llm):
    (model,) = client.list().models
    openai_ids = [m.id for m in openai.OpenAI(base_url=server.url, api_key="x").models.list().data]
    assert model.model == "tiny-moe" and openai_ids == ["tiny-moe"]
    assert model.size == llm.file.path.stat().st_size and len(model.digest) == 64
    assert model.details.format == "gguf" and model.details.family == "lfm2moe"
    assert model.details.quantization_level == "Q8_0" and model.modified_at is not None


def test_show_ps_and_version(client, server, llm):
    info = client.show("tiny-moe")
    assert info.capabilities[0] == "completion" and "tools" in info.capabilities  # LFM2 lists tools
    assert "thinking" not in info.capabilities
    assert info.template == llm.chat_template.source and info.details.format == "gguf"
    assert info.modelinfo["general.architecture"] == "lfm2moe"
    assert f"temperature {card_defaults(llm)['temperature']}" in info.parameters
    (running,) = client.ps().models
    assert running.model == "tiny-moe" and running.context_length == 2048 and running.expires_at.year == 9999
    status, kind, body = raw(server, "GET", "/api/version")
    assert status == 200 and json.loads(body) == {"version": lfm_edge.__version__}


# -- chat and generate ---------------------------------------------------------------------------


def test_chat_whole_stream_and_the_library_agree(client, llm):
    options = {"temperature": 0, "num_predict": 12}
    whole = client.chat("tiny-moe", ASK, stream=False, options=options)
    parts = list(client.chat("tiny-moe", ASK, stream=True, options=options))
    assert whole.message.role == "assistant" and whole.done and whole.done_reason == "length"
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == whole.eval_count == 12
    assert whole.prompt_eval_count == len(llm.chat_tokens(ASK)) and whole.total_duration > 0
    expected = llm.chat(ASK, stream=False, max_tokens=12, **{**card_defaults(llm), "temperature": 0.0})
    assert whole.message.content == expected


def test_generate_whole_stream_context_and_raw(client, llm):
    options = {"temperature": 0, "num_predict": 8}
    whole = client.generate("tiny-moe", "Why is the sky blue?", options=options)
    parts = list(client.generate("tiny-moe", "Why is the sky blue?", options=options, stream=True))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done and whole.done_reason == "length"
    prompt = llm.chat_tokens([{"role": "user", "content": "Why is the sky blue?"}])
    assert whole.context[: len(prompt)] == prompt and len(whole.context) == len(prompt) + 8
    # raw: a plain continuation, as /v1/completions
    text = client.generate("tiny-moe", "The capital of France is", raw=True, options=options).response
    assert text == "".join(llm.generate("The capital of France is", max_tokens=8, **{**card_defaults(llm), "temperature": 0.0}))
    # a system message reaches the template
    sys_reply = client.generate("tiny-moe", "Hi", system="Be brief.", options=options)
    assert sys_reply.prompt_eval_count == len(llm.chat_tokens([{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": "Hi"}]))
    # an empty prompt only loads the model, as in ollama
    assert client.generate("tiny-moe").done_reason == "load"
    assert client.chat("tiny-moe", []).done_reason == "load"


def test_options(client):
    base = {"num_predict": 20, **HOT}
    a = client.chat("tiny-moe", ASK, options={**base, "seed": 5}).message.content
    assert client.chat("tiny-moe", ASK, options={**base, "seed": 5}).message.content == a
    assert client.chat("tiny-moe", ASK, options={**base, "seed": 6}).message.content != a
    assert client.chat("tiny-moe", ASK, options={**base, "seed": 5, "num_predict": 4}).eval_count == 4
    # stop: cut where the string starts
    greedy = {"temperature": 0, "num_predict": 30}
    full = client.generate("tiny-moe", "Once upon a time", raw=True, options=greedy).response
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip() == full[i : i + 2])
    cut = client.generate("tiny-moe", "Once upon a time", raw=True, options={**greedy, "stop": [stop]})
    assert cut.response == full[: full.find(stop)] and cut.done_reason == "stop"
    # num_ctx: a smaller one limits this request; the others ollama has no use for here are ignored
    small = client.chat("tiny-moe", ASK, options={"temperature": 0, "num_ctx": 40})
    assert small.prompt_eval_count + small.eval_count == 40 and small.done_reason == "length"
    assert client.chat("tiny-moe", ASK, options={"num_predict": 2, "num_gpu": 0, "mirostat": 0}).eval_count == 2
    # top_k 1 and min_p 1 are greedy, whatever the temperature
    greedy_text = client.chat("tiny-moe", ASK, options={"temperature": 0, "num_predict": 10}).message.content
    for opts in ({"top_k": 1}, {"min_p": 1.0}):
        assert client.chat("tiny-moe", ASK, options={"temperature": 1.0, "num_predict": 10, "repeat_penalty": 1.05,
                                                     **opts}).message.content == greedy_text


# -- format -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nested", "enum", "array_bounds", "optional", "string_patterns"])
def test_format_schema_replies_all_parse_and_validate(client, name):
    schema = SCHEMAS[name]
    for seed in SEEDS:
        reply = client.chat("tiny-moe", ASK, format=schema, options={**HOT, "seed": seed, "num_predict": 300})
        assert reply.done_reason == "stop"
        validate(json.loads(reply.message.content), schema)
    streamed = "".join(p.response for p in client.generate("tiny-moe", "Data:", format=schema, stream=True,
                                                            options={**HOT, "seed": 1, "num_predict": 300}))
    validate(json.loads(streamed), schema)


def test_format_json(client):
    reasons = []
    for seed in SEEDS:
        reply = client.chat("tiny-moe", ASK, format="json", options={**HOT, "seed": seed, "num_predict": 200})
        reasons.append(reply.done_reason)
        if reply.done_reason == "stop":  # a random model may fill a key until the budget ends
            assert isinstance(json.loads(reply.message.content), dict)
        else:
            assert reply.message.content.startswith("{")
    assert "stop" in reasons


# -- tools and thinking ---------------------------------------------------------------------------


@pytest.fixture
def canned(server, monkeypatch):
    seen: dict = {"prompts": []}
    say(server, seen, monkeypatch)
    return seen


def test_tool_calls_come_back_with_object_arguments(client, llm, canned):
    canned["reply"] = "Let me check. " + CANNED_CALL
    reply = client.chat("tiny-moe", ASK, tools=[WEATHER_TOOL])
    (call,) = reply.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", {"city": "Paris"})
    assert reply.message.content == "Let me check." and reply.done_reason == "stop"
    # the tools reach the template (the client writes a schema's keys in its own order)
    assert '<|tool_list_start|>[{"name": "get_weather", "description": "Current weather in a city"' in canned["prompts"][-1]
    parts = list(client.chat("tiny-moe", ASK, tools=[WEATHER_TOOL], stream=True))
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]
    # the call and its result go back as ollama sends them: arguments as objects, tool_name
    canned["reply"] = "It is 21 degrees."
    follow = ASK + [reply.message, {"role": "tool", "content": '{"temp": 21}', "tool_name": "get_weather"}]
    assert client.chat("tiny-moe", follow, tools=[WEATHER_TOOL]).message.content == "It is 21 degrees."
    assert '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>' in canned["prompts"][-1]
    assert '<|tool_response_start|>{"temp": 21}<|tool_response_end|>' in canned["prompts"][-1]
    # without tools, a call is text, as written
    assert client.chat("tiny-moe", ASK).message.content == "It is 21 degrees."
    canned["reply"] = CANNED_CALL
    assert client.chat("tiny-moe", ASK).message.content == CANNED_CALL


@pytest.fixture(scope="module")
def think_server(gguf_path, tmp_path_factory):
    path = rewrite(gguf_path("moe", "q8_0"), tmp_path_factory.mktemp("think") / "think.gguf", template=THINK_TEMPLATE)
    srv, thread = start(lfm_edge.load(path, n_ctx=1024), "tiny-think")
    yield srv
    srv.shutdown()
    srv.close()
    thread.join(10)


def test_thinking_comes_apart(think_server, monkeypatch):
    client = ollama.Client(host=think_server.base_url, timeout=60)
    llm = think_server.runner.llm
    assert "thinking" in client.show("tiny-think").capabilities
    seen = {"prompts": [], "reply": "Two and two.</think>Four."}
    say(think_server, seen, monkeypatch)
    reply = client.chat("tiny-think", ASK, think=True)
    assert (reply.message.thinking, reply.message.content) == ("Two and two.", "Four.")
    parts = list(client.chat("tiny-think", ASK, think=True, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == "Two and two."
    assert "".join(p.message.content for p in parts) == "Four."
    generated = client.generate("tiny-think", "What is 2+2?", think=True)
    assert (generated.thinking, generated.response) == ("Two and two.", "Four.")
    reply = client.chat("tiny-think", ASK, think=False)
    assert reply.message.thinking is None and reply.message.content == "Four."
    # a real generation: the reasoning the prompt opened, as the library splits it
    monkeypatch.undo()
    options = {"temperature": 0, "num_predict": 12}
    reply = client.chat("tiny-think", ASK, think=True, options=options)
    expected = Reply.of(llm.chat_events(ASK, max_tokens=12, **{**card_defaults(llm), "temperature": 0.0}))
    assert (reply.message.thinking, reply.message.content) == (expected.reasoning, expected.content)


def test_format_after_reasoning(think_server):
    """A prompt that opens <think>: the reply reasons freely, and its answer follows the format."""
    llm = think_server.runner.llm
    job = ollama_api.chat_job({"model": "tiny-think", "messages": ASK, "format": SCHEMAS["enum"]}, think_server.runner)

    def takes(text):
        constraint = job.constraint
        for token in llm.tokenize(text, add_special=False):
            if not constraint.allowed()[token]:
                return False
            constraint.advance(token)
        return constraint.is_done()

    assert takes('Let me see: {"color" maybe.</think>{"color": "red", "size": 1}')


def test_logprobs(client):
    reply = client.chat("tiny-moe", ASK, logprobs=True, top_logprobs=2, options={"temperature": 0, "num_predict": 5})
    # every generated token, the whitespace the reply parser trims included
    assert len(reply.logprobs) == 5 and "".join(e.token for e in reply.logprobs).strip() == reply.message.content
    assert all(len(e.top_logprobs) == 2 and e.logprob <= e.top_logprobs[0].logprob for e in reply.logprobs)
    parts = list(client.chat("tiny-moe", ASK, logprobs=True, stream=True, options={"temperature": 0, "num_predict": 5}))
    assert [e.logprob for p in parts for e in p.logprobs or []] == [e.logprob for e in reply.logprobs]


# -- errors ---------------------------------------------------------------------------------------

ERRORS = [
    # (path, body, status, words)
    ("/api/chat", {"model": "llama3", "messages": ASK}, 404, "model 'llama3' not found"),
    ("/api/generate", {"model": "tiny-moe:7b", "prompt": "x"}, 404, "not found"),
    ("/api/show", {"model": "nope"}, 404, "not found"),
    ("/api/chat", {"messages": ASK}, 400, "model is required"),
    ("/api/chat", {"model": "tiny-moe", "messages": ASK, "options": {"temperature": "hot"}}, 400, "options.temperature must be a number"),
    ("/api/chat", {"model": "tiny-moe", "messages": ASK, "options": {"top_p": 0}}, 400, "top_p must be in (0, 1]"),
    ("/api/chat", {"model": "tiny-moe", "messages": ASK, "options": {"num_predict": -3}}, 400, "num_predict"),
    ("/api/chat", {"model": "tiny-moe", "messages": ASK, "format": "yaml"}, 400, 'format must be "json" or a JSON schema'),
    ("/api/chat", {"model": "tiny-moe", "messages": ASK, "format": {"type": "frob"}}, 400, "the JSON schema cannot be used"),
    ("/api/chat", {"model": "tiny-moe", "messages": ASK, "think": "very"}, 400, "think must be"),
    ("/api/chat", {"model": "tiny-moe", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400, "images"),
    ("/api/chat", {"model": "tiny-moe", "messages": [{"role": "bot", "content": "x"}]}, 400, "'bot'"),
    ("/api/generate", {"model": "tiny-moe", "prompt": "x", "suffix": "y"}, 400, "suffix is not supported"),
    ("/api/generate", {"model": "tiny-moe", "prompt": "x", "context": [-1]}, 400, "context must be"),
    ("/api/generate", {"model": "tiny-moe", "prompt": "hello " * 3000}, 400, "context holds 2048"),
    ("/api/pull", {"model": "tiny-moe"}, 404, "no such endpoint"),
]


@pytest.mark.parametrize("path, body, status, words", ERRORS)
def test_errors_in_ollamas_shape(server, path, body, status, words):
    got, kind, data = raw(server, "POST", path, body)
    reply = json.loads(data)
    assert got == status and set(reply) == {"error"} and words in reply["error"], reply
    assert "\n" not in reply["error"] and kind == "application/json"


def test_the_client_raises_ollamas_errors(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat("llama3", ASK)
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        list(client.chat("tiny-moe", ASK, stream=True, format={"type": "frob"}))
    assert e.value.status_code == 400
