"""The OpenAI-compatible server, driven by the official `openai` client over loopback."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

import lfm_edge
from lfm_edge.commands import serve
from lfm_edge.commands.common import card_defaults
from lfm_edge.reply import Reply, reply_events
from lfm_edge.server import bind_warning, chat_messages, make_server, openai_message
from lfm_edge.server import RequestError
from lfm_edge.tool_calls import parse_call_list
from test_reply import THINK_TEMPLATE, rewrite

N_CTX = 8192
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CANNED_CALL = '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'


@pytest.fixture(scope="module")
def llm(gguf_path):
    m = lfm_edge.load(gguf_path("moe", "q8_0"), n_ctx=N_CTX)
    m.tokenizer.eog_ids = set()  # random weights: keep replies a fixed length
    return m


@pytest.fixture(scope="module")
def server(llm):
    srv = make_server(llm, port=0, model_id="tiny-moe")
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.close()
    thread.join(10)
    assert not thread.is_alive()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=30)


def raw_request(server, method: str, path: str, body=None) -> tuple[int, dict]:
    """A request without the openai client, for shapes it would refuse to send."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def chat(client, messages, **kw):
    return client.chat.completions.create(model="tiny-moe", messages=messages, **kw)


def stream_chat(client, messages, **kw) -> tuple[str, str | None, object]:
    """(content, finish_reason, usage) of a streamed chat reply."""
    text, finish, usage = [], None, None
    for chunk in chat(client, messages, stream=True, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def hello(word: str = "Hello there") -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": word}]


# -- binding and the command ---------------------------------------------------------


def test_binds_to_loopback_by_default(llm):
    srv = make_server(llm, port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
        assert srv.url.startswith("http://127.0.0.1:")
    finally:
        srv.server_close()
    p = argparse.ArgumentParser()
    serve.configure_parser(p)
    args = p.parse_args(["-m", "x.gguf"])
    assert (args.host, args.port, args.n_ctx, args.parallel, args.max_queue) == ("127.0.0.1", 8080, 4096, 4, 16)
    args = p.parse_args(["-m", "x.gguf", "-np", "2", "--max-queue", "0"])
    assert (args.parallel, args.max_queue) == (2, 0)
    assert bind_warning("127.0.0.1") is None and bind_warning("localhost") is None and bind_warning("::1") is None
    assert "anyone who can reach this port" in bind_warning("0.0.0.0")
    assert serve.model_id("LiquidAI/LFM2-8B-A1B-GGUF:Q8_0") == "LiquidAI/LFM2-8B-A1B-GGUF:Q8_0"
    assert serve.model_id("models/LFM2-8B-A1B-Q4_0.gguf") == "LFM2-8B-A1B-Q4_0"


def test_serve_command_prints_its_url_and_stops_on_ctrl_c(gguf_path):
    model = gguf_path("moe", "q8_0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lfm_edge", "serve", "-m", str(model), "--port", "0", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"lfm-edge: serving {model.stem} at http://127.0.0.1:"), line
        url = line.split(" at ")[1].split()[0]
        host, port = url[len("http://") :].split("/")[0].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["status"] == "ok"
        conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        err = proc.stderr.read()
        assert "lfm-edge: stopped" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_command_takes_the_api_key_from_the_environment(gguf_path):
    model = gguf_path("moe", "q8_0")
    env = {**os.environ, "LFM_EDGE_API_KEY": "sekret"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lfm_edge", "serve", "-m", str(model), "--port", "0", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = proc.stdout.readline().split(" at ")[1].split()[0]
        host, port = url[len("http://") :].split("/")[0].split(":")

        def get(path: str, headers: dict) -> int:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", path, headers=headers)
            status = conn.getresponse().status
            conn.close()
            return status

        assert get("/v1/models", {}) == 401 and get("/v1/models", {"Authorization": "Bearer wrong"}) == 401
        assert get("/v1/models", {"Authorization": "Bearer sekret"}) == 200
        assert get("/api/tags", {}) == 401 and get("/health", {}) == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert "sekret" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the endpoints ------------------------------------------------------------------


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-moe"]
    assert client.models.retrieve("tiny-moe").id == "tiny-moe"
    status, body = raw_request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == "tiny-moe"


def test_chat_stream_equals_non_stream_and_the_library(client, llm):
    messages = hello()
    reply = chat(client, messages, max_tokens=24, temperature=0)
    text, finish, usage = stream_chat(
        client, messages, max_tokens=24, temperature=0, stream_options={"include_usage": True}
    )
    assert reply.object == "chat.completion" and reply.model == "tiny-moe" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert text == reply.choices[0].message.content and text
    assert finish == reply.choices[0].finish_reason == "length"
    # the same generation as the Python API, with the model card's defaults
    ids = llm.chat_tokens(messages)
    assert llm.chat(messages, stream=False, max_tokens=24, **{**card_defaults(llm), "temperature": 0.0}) == text
    # usage: our tokenizer's counts
    for u in (reply.usage, usage):
        assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(ids), 24, len(ids) + 24)


def test_completions_string_list_and_stream(client, llm):
    prompt = "The capital of France is"
    expected = "".join(llm.generate(prompt, max_tokens=10, **{**card_defaults(llm), "temperature": 0.0}))
    one = client.completions.create(model="tiny-moe", prompt=prompt, max_tokens=10, temperature=0)
    listed = client.completions.create(model="tiny-moe", prompt=[prompt], max_tokens=10, temperature=0)
    streamed = client.completions.create(model="tiny-moe", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert one.object == "text_completion" and one.choices[0].text == expected
    assert listed.choices[0].text == expected
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    assert one.usage.prompt_tokens == len(llm.tokenize(prompt)) and one.usage.completion_tokens == 10
    default = client.completions.create(model="tiny-moe", prompt=prompt, temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_stop_strings(client):
    prompt = "Once upon a time"
    full = client.completions.create(model="tiny-moe", prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip() == full[i : i + 2])
    cut = client.completions.create(
        model="tiny-moe", prompt=prompt, max_tokens=30, temperature=0, stop=[stop, "never-seen"]
    )
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 30
    # chat, a single string, streamed and not
    content = chat(client, hello(), max_tokens=30, temperature=0).choices[0].message.content
    stop = next(
        content[i : i + 2] for i in range(3, len(content) - 2) if content[i : i + 2].strip() == content[i : i + 2]
    )
    expected = content[: content.find(stop)].rstrip()
    reply = chat(client, hello(), max_tokens=30, temperature=0, stop=stop)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert stream_chat(client, hello(), max_tokens=30, temperature=0, stop=stop)[:2] == (expected, "stop")


def test_tool_choice_none_without_tools_is_free_text(client):
    """Nothing to forbid: no grammar (this model has no end token, which a grammar needs)."""
    free = chat(client, hello(), max_tokens=5, temperature=0).choices[0].message.content
    assert chat(client, hello(), max_tokens=5, temperature=0, tool_choice="none").choices[0].message.content == free


def test_seed_reproducibility(client):
    kw = dict(max_tokens=24, temperature=1.0, top_p=1.0, extra_body={"min_p": 0.0, "top_k": 0})
    a = chat(client, hello(), seed=11, **kw).choices[0].message.content
    b = chat(client, hello(), seed=11, **kw).choices[0].message.content
    c = chat(client, hello(), seed=12, **kw).choices[0].message.content
    assert a == b and a != c
    assert stream_chat(client, hello(), seed=11, **kw)[0] == a
    assert chat(client, hello(), seed=11, max_completion_tokens=5, **kw).usage.completion_tokens == 5


# -- tools and reasoning -------------------------------------------------------------

CANNED = [
    # (what the model writes, content, reasoning_content, calls)
    (CANNED_CALL, None, None, [("get_weather", {"city": "Paris"})]),
    (
        'Checking.<|tool_call_start|>[a(x=1), b(y="z", n=[1, 2.5], ok=True)]<|tool_call_end|> Done.',
        "Checking. Done.",
        None,
        [("a", {"x": 1}), ("b", {"y": "z", "n": [1, 2.5], "ok": True})],
    ),
    ('<|tool_call_start|>[{"name": "f", "arguments": {"q": "x"}}]<|tool_call_end|>', None, None, [("f", {"q": "x"})]),
    ("<think>\nLet me look.\n</think>\n\n" + CANNED_CALL, None, "Let me look.", [("get_weather", {"city": "Paris"})]),
    ("<think>\nShort.</think>\nThe answer is 4.", "The answer is 4.", "Short.", []),
    ("<think>still thinking", "", "still thinking", []),
    (
        'x <|tool_call_start|>[os.system("ls") + 1]<|tool_call_end|> y',
        'x <|tool_call_start|>[os.system("ls") + 1]<|tool_call_end|> y',
        None,
        [],
    ),
    ("Hello <|tool_call_st", "Hello <|tool_call_st", None, []),
    # <think> is a special token here: after the start it is not reasoning, and not text
    ("  plain text, <think> later  ", "plain text,  later", None, []),
    ("", "", None, []),
]


@pytest.mark.parametrize("text, content, reasoning, calls", CANNED)
def test_openai_message_from_canned_tokens(llm, text, content, reasoning, calls):
    ids = llm.tokenize(text, add_special=False)
    message = openai_message(Reply.of(reply_events(llm.tokenizer, ids, llm.chat_tokens(hello()))), parse_calls=True)
    assert message["content"] == content
    assert message.get("reasoning_content") == reasoning
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]
    assert got == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in message.get("tool_calls", []))


def test_without_tools_call_text_stays_content(llm):
    reply = Reply.of(reply_events(llm.tokenizer, llm.tokenize(CANNED_CALL, add_special=False)))
    assert openai_message(reply, parse_calls=False) == {"role": "assistant", "content": CANNED_CALL}


def test_openai_messages_become_template_messages(llm):
    messages = chat_messages(
        [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
            {
                "role": "assistant",
                "content": None,
                "reasoning_content": "Use the tool.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "f", "arguments": {"a": [1, None, True], "b": {"c": 'd"q'}}},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ]
    )
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    # text parts joined as the LFM2.5 templates join them; reasoning_content also under `thinking`
    assert messages[1]["content"] == "Weather in Paris?"
    assert messages[2]["thinking"] == messages[2]["reasoning_content"] == "Use the tool."
    # string arguments parsed: the templates that render tool_calls want objects
    assert [c["function"]["arguments"] for c in messages[2]["tool_calls"]] == [
        {"city": "Paris"},
        {"a": [1, None, True], "b": {"c": 'd"q'}},
    ]
    assert messages[3] == {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}
    # the tiny model's (LFM2) template never reads tool_calls: the calls are written
    # into the content the way LFM2 writes them, and parse back
    prompt = llm.render_chat(messages)
    start = prompt.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    assert prompt[start:].startswith('<|tool_call_start|>[get_weather(city="Paris"), f(a=[1, None, True], b={"c": "d\\"q"})]')
    body = prompt[start + len("<|tool_call_start|>") : prompt.index("<|tool_call_end|>")]
    assert [(c.name, c.arguments) for c in parse_call_list(body)] == [
        ("get_weather", {"city": "Paris"}),
        ("f", {"a": [1, None, True], "b": {"c": 'd"q'}}),
    ]
    with pytest.raises(RequestError) as e:
        chat_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "g", "arguments": "{oops"}}]}])
    assert e.value.param == "messages[0].tool_calls" and "not valid JSON" in str(e.value)
    with pytest.raises(RequestError) as e:
        chat_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert e.value.param == "messages[0].content" and "only text parts" in str(e.value)


def say(server, seen: dict, monkeypatch):
    """Make the server's model 'say' seen["reply"], token by token, then its end token (the
    engine's next_token, replaced); records the prompts it got."""
    llm = server.runner.llm
    replies = {}

    def next_token(request, logits):
        if request not in replies:
            seen["prompts"].append(llm.detokenize(request.prompt))
            replies[request] = iter(llm.tokenize(seen["reply"], add_special=False) + [llm.tokenizer.eos_id])
        return next(replies[request])

    monkeypatch.setattr(server.runner.engine, "next_token", next_token)
    monkeypatch.setattr(llm.tokenizer, "eog_ids", {llm.tokenizer.eos_id})


@pytest.fixture
def canned_model(server, monkeypatch):
    """Make the server's model 'say' a given text, token by token; records the prompts it got."""
    seen: dict = {"prompts": []}
    say(server, seen, monkeypatch)
    return seen


def test_tool_call_end_to_end(client, llm, canned_model):
    canned_model["reply"] = "Let me check. " + CANNED_CALL
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = chat(client, messages, tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # the tools reached the template as the model card lists them
    assert canned_model["prompts"][-1] == llm.render_chat(messages, tools=[WEATHER_TOOL["function"]])
    assert '<|tool_list_start|>[{"name": "get_weather"' in canned_model["prompts"][-1]

    calls, content, finish = {}, "", None
    for chunk in chat(client, messages, tools=[WEATHER_TOOL], stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            calls[tc.index] = (tc.function.name, json.loads(tc.function.arguments))
        finish = chunk.choices[0].finish_reason or finish
    assert (content, calls, finish) == ("Let me check.", {0: ("get_weather", {"city": "Paris"})}, "tool_calls")

    # the client sends the call and its result back: both reach the prompt in LFM2's form
    canned_model["reply"] = "It is 21 degrees."
    follow = messages + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    reply = chat(client, follow, tools=[WEATHER_TOOL])
    assert reply.choices[0].message.content == "It is 21 degrees." and reply.choices[0].finish_reason == "stop"
    prompt = canned_model["prompts"][-1]
    assert (
        '<|im_start|>assistant\n<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>Let me check.<|im_end|>'
        in prompt
    )
    assert '<|im_start|>tool\n<|tool_response_start|>{"temp": 21}<|tool_response_end|><|im_end|>' in prompt


def stream_parts(client, messages, **kw) -> tuple[str, str, list]:
    """(reasoning, content, [chunk kinds]) of a streamed chat reply."""
    reasoning, content, kinds = "", "", []
    for chunk in chat(client, messages, stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        part = getattr(delta, "reasoning_content", None) or ""
        reasoning += part
        content += delta.content or ""
        kinds.append("reasoning" if part else "content" if delta.content else "other")
    return reasoning, content, kinds


def test_reasoning_is_returned_apart(client, canned_model):
    canned_model["reply"] = "<think>\nTwo and two.\n</think>\n\nFour."
    message = chat(client, hello()).choices[0].message
    assert message.content == "Four." and message.reasoning_content == "Two and two."
    reasoning, content, _ = stream_parts(client, hello())
    assert (reasoning, content) == ("Two and two.", "Four.")


@pytest.fixture(scope="module")
def think_server(gguf_path, tmp_path_factory):
    """A server for the tiny model whose template ends the generation prompt in <think>, as LFM2.5-2.6B's does."""
    path = rewrite(gguf_path("moe", "q8_0"), tmp_path_factory.mktemp("think") / "think.gguf", template=THINK_TEMPLATE)
    m = lfm_edge.load(path, n_ctx=1024)
    m.tokenizer.eog_ids = set()
    srv = make_server(m, port=0, model_id="tiny-think")
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.close()
    thread.join(10)


def test_a_prompt_ending_in_think_starts_the_reply_in_reasoning(think_server, monkeypatch):
    llm = think_server.runner.llm
    client = openai.OpenAI(base_url=think_server.url, api_key="unused", max_retries=0, timeout=30)
    seen: dict = {"prompts": [], "reply": "I should think.</think>The answer is 4."}
    say(think_server, seen, monkeypatch)
    message = chat(client, hello("What is 2+2?")).choices[0].message
    assert seen["prompts"][-1].endswith("<|im_start|>assistant\n<think>")
    assert (message.reasoning_content, message.content) == ("I should think.", "The answer is 4.")
    reasoning, content, kinds = stream_parts(client, hello("What is 2+2?"))
    assert (reasoning, content) == ("I should think.", "The answer is 4.")
    assert "reasoning" in kinds and kinds.index("reasoning") < kinds.index("content")
    # cut off while still thinking: all of it is reasoning
    seen["reply"] = "Let me count: one, two"
    cut = llm.detokenize(llm.tokenize(seen["reply"], add_special=False)[:4])
    message = chat(client, hello("What is 2+2?"), max_tokens=4).choices[0].message
    assert message.content == "" and message.reasoning_content == cut.strip()


def test_reasoning_of_a_real_generation_streams_as_it_is_returned(think_server):
    client = openai.OpenAI(base_url=think_server.url, api_key="unused", max_retries=0, timeout=30)
    llm = think_server.runner.llm
    kw = dict(max_tokens=20, temperature=0)
    message = chat(client, hello(), **kw).choices[0].message
    reasoning, content, _ = stream_parts(client, hello(), **kw)
    assert (reasoning, content) == (message.reasoning_content, message.content or "")
    assert message.reasoning_content  # the prompt opened it; random weights rarely close it
    expected = Reply.of(llm.chat_events(hello(), **{**card_defaults(llm), "temperature": 0.0, "max_tokens": 20}))
    assert (message.reasoning_content, message.content) == (expected.reasoning, expected.content)


# -- queueing and disconnects ---------------------------------------------------------


def test_concurrent_clients_are_decoded_together_and_get_what_they_get_alone(client, server, monkeypatch):
    prompts = ["Hello there", "Write a poem", "What is 2+2?"]
    kw = dict(max_tokens=40, temperature=0)
    alone = [chat(client, hello(p), **kw).choices[0].message.content for p in prompts]
    model, batches = server.runner.llm.model, []
    forward = model.forward

    def watched(ids, batch, rows=None):
        if not batches:  # the first step waits for all three requests
            assert wait_for(lambda: server.runner.queued == len(prompts))
        batches.append(len(batch.lengths))
        return forward(ids, batch, rows)

    monkeypatch.setattr(model, "forward", watched)
    results: dict[int, str] = {}
    start = threading.Barrier(len(prompts))

    def work(i: int) -> None:
        start.wait()
        if i % 2:
            results[i] = stream_chat(client, hello(prompts[i]), **kw)[0]
        else:
            results[i] = chat(client, hello(prompts[i]), **kw).choices[0].message.content

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [results.get(i) for i in range(len(prompts))] == alone
    assert max(batches) == len(prompts)  # one forward call for the three


def test_a_full_queue_is_a_503_with_retry_after(llm):
    srv = make_server(llm, port=0, model_id="tiny-moe", parallel=1, max_queued=0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host, port = srv.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=30)
        body = {"messages": hello(), "max_tokens": 2000, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read(20).startswith(b"data: ")  # decoding: the one place is taken
        busy = http.client.HTTPConnection(host, port, timeout=30)
        busy.request("POST", "/v1/chat/completions", body=json.dumps({"messages": hello(), "max_tokens": 2}),
                     headers={"Content-Type": "application/json"})
        refused = busy.getresponse()
        error = json.loads(refused.read())["error"]
        assert refused.status == 503 and refused.getheader("Retry-After") == "2"
        assert error["code"] == "queue_full" and "1 requests are running and 0 waiting; try again shortly" in error["message"]
        resp.close()
        conn.close()
    finally:
        srv.shutdown()
        srv.close()
        thread.join(10)


def wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_a_client_that_leaves_mid_stream_is_cancelled(server, client):
    engine = server.runner
    before = engine.finished["cancelled"]
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    body = {"messages": hello(), "max_tokens": N_CTX - 100, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read(20).startswith(b"data: ")
    # a second client is served beside the long generation ...
    result: dict = {}
    waiting = threading.Thread(target=lambda: result.update(reply=chat(client, hello(), max_tokens=4, temperature=0)))
    waiting.start()
    waiting.join(20)
    assert result["reply"].usage.completion_tokens == 4
    assert engine.queued == 1  # ... while the long one still runs
    resp.close()
    conn.close()
    assert wait_for(lambda: engine.finished["cancelled"] == before + 1)
    cancelled = [s for s in engine.recent if s.finish_reason == "cancelled"][-1]
    assert cancelled.completion_tokens < N_CTX // 2  # stopped early, not at max_tokens

    # a non-streaming client that hangs up is noticed too
    sock = socket.create_connection((host, port), timeout=10)
    data = json.dumps({"messages": hello(), "max_tokens": N_CTX - 100, "temperature": 0}).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    sock.close()
    assert wait_for(lambda: engine.finished["cancelled"] == before + 2)
    assert engine.recent[-1].finish_reason == "cancelled" and engine.recent[-1].completion_tokens < N_CTX // 2
    assert chat(client, hello(), max_tokens=3, temperature=0).usage.completion_tokens == 3


# -- errors -----------------------------------------------------------------------------

CHAT, COMPLETIONS, POST = "/v1/chat/completions", "/v1/completions", "POST"
USER = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    # (method, path, body, status, param, words in the message)
    (POST, CHAT, b"{bad", 400, None, "not valid JSON"),
    (POST, CHAT, [1, 2], 400, None, "JSON object"),
    (POST, CHAT, {}, 400, "messages", "'messages' must be a non-empty list"),
    (POST, CHAT, {"messages": []}, 400, "messages", "non-empty list"),
    (POST, CHAT, {"messages": "hi"}, 400, "messages", "non-empty list"),
    (POST, CHAT, {"messages": [{"role": "bot", "content": "hi"}]}, 400, "messages[0].role", "'bot'"),
    (POST, CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content", "no content"),
    (
        POST,
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content",
        "only text parts",
    ),
    (
        POST,
        CHAT,
        {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]},
        400,
        "messages[0].tool_calls",
        "not valid JSON",
    ),
    (POST, CHAT, {"messages": USER, "temperature": -1}, 400, "temperature", "temperature must be >= 0"),
    (POST, CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature", "must be a number"),
    (POST, CHAT, {"messages": USER, "top_p": 0}, 400, "top_p", "top_p must be in (0, 1]"),
    (POST, CHAT, {"messages": USER, "top_k": 2.5}, 400, "top_k", "must be an integer"),
    (POST, CHAT, {"messages": USER, "seed": -5}, 400, "seed", "seed must be >= 0"),
    (POST, CHAT, {"messages": USER, "n": 2}, 400, "n", "n must be 1"),
    (POST, CHAT, {"messages": USER, "max_tokens": -1}, 400, "max_tokens", ">= 0"),
    (POST, CHAT, {"messages": USER, "stop": 5}, 400, "stop", "stop must be"),
    (POST, CHAT, {"messages": USER, "stream": "yes"}, 400, "stream", "true or false"),
    (POST, CHAT, {"messages": USER, "tool_choice": "required"}, 400, "tool_choice", "has no tools"),
    (
        POST,
        CHAT,
        {"messages": USER, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        400,
        "tool_choice",
        "'nope', which is not one of the tools (the tools are get_weather)",
    ),
    (POST, CHAT, {"messages": USER, "tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, 400, "tool_choice", "must be"),
    (POST, CHAT, {"messages": USER, "parallel_tool_calls": "yes"}, 400, "parallel_tool_calls", "true or false"),
    (POST, CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "from 0 to 20"),
    (POST, CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs"),
    (POST, COMPLETIONS, {"prompt": "a", "logprobs": 6}, 400, "logprobs", "from 0 to 5"),
    (POST, CHAT, {"messages": USER, "frequency_penalty": 3}, 400, "frequency_penalty", "[-2, 2]"),
    (POST, CHAT, {"messages": USER, "response_format": {"type": "yaml"}}, 400, "response_format", "'yaml' is not supported"),
    (POST, CHAT, {"messages": USER, "response_format": {"type": "json_schema"}}, 400, "response_format", "json_schema needs"),
    (POST, "/tokenize", {"content": 5.5}, 400, "content", "strings and token ids"),
    (POST, "/detokenize", {"tokens": [1, 10**9]}, 400, "tokens", "outside the vocabulary"),
    (POST, "/detokenize", {"tokens": "abc"}, 400, "tokens", "list of token ids"),
    (POST, COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt", "list of one string"),
    (POST, COMPLETIONS, {}, 400, "prompt", "must be a string"),
    (POST, COMPLETIONS, {"prompt": "hello " * (N_CTX + 500)}, 400, "prompt", "context holds 8192"),
    ("GET", "/v1/nope", None, 404, None, "no such endpoint"),
    ("GET", "/v1/models/gpt-4", None, 404, "model", "no model 'gpt-4'"),
    ("GET", "/v1/chat/completions", None, 405, None, "takes POST"),
    ("POST", "/v1/models", {}, 405, None, "takes GET"),
    ("DELETE", "/health", None, 405, None, "takes GET"),
]


@pytest.mark.parametrize("method, path, body, status, param, words", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, method, path, body, status, param, words):
    got, reply = raw_request(server, method, path, body)
    assert got == status
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"] and "Traceback" not in error["message"]


def test_context_overflow_code_and_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-moe", prompt="hello " * (N_CTX + 500))
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        chat(client, USER, n=2)


def test_an_internal_error_is_a_short_500_and_logged(server, client, monkeypatch, caplog):
    def broken(job, stats, cancel, trace):
        raise RuntimeError("secret detail")
        yield

    monkeypatch.setattr(server.runner, "_decode", broken)
    status, reply = raw_request(server, "POST", "/v1/chat/completions", {"messages": USER})
    assert status == 500 and reply["error"]["type"] == "server_error"
    assert "secret" not in reply["error"]["message"] and "Traceback" not in json.dumps(reply)
    assert "secret detail" in caplog.text
    with pytest.raises(openai.APIError, match="internal server error"):
        for _ in chat(client, USER, stream=True):
            pass
    monkeypatch.undo()
    assert chat(client, USER, max_tokens=2, temperature=0).usage.completion_tokens == 2
