"""The Python API contract: load, tokenize, logits, generate, chat."""

from __future__ import annotations

import numpy as np
import pytest

import lfm_edge
from lfm_edge.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def llm(gguf_path):
    return lfm_edge.load(gguf_path("moe", "q8_0"), n_ctx=256)


def greedy_ids(llm, prompt_ids, n):
    return list(llm.decode_tokens(prompt_ids, n, Sampler(SamplingParams(temperature=0.0))))


def test_tokenize_detokenize(llm):
    ids = llm.tokenize("Hello world")
    assert ids[0] == 1 and llm.tokenize("Hello world", add_special=False) == ids[1:]
    assert llm.detokenize(ids[1:]) == "Hello world"


def test_logits_shape_and_fresh_state(llm):
    ids = llm.tokenize("The quick brown fox")
    a = llm.logits(ids)
    b = llm.logits(ids)
    assert a.shape == (len(ids), llm.args.n_vocab) and a.dtype == np.float32
    assert np.array_equal(a, b)  # each call starts from an empty state


def test_generate_greedy_is_the_argmax_chain(llm):
    prompt = llm.tokenize("Once upon a time")
    expected = greedy_ids(llm, prompt, 12)
    # the greedy chain by hand, from full forwards
    ids = list(prompt)
    for _ in range(len(expected)):
        ids.append(int(np.argmax(llm.logits(ids)[-1])))
    assert ids[len(prompt) :] == expected
    text = "".join(llm.generate("Once upon a time", max_tokens=12, temperature=0.0))
    assert text == llm.tokenizer.decode(expected, skip_special=True)  # special tokens are not text



def test_named_steps_prefill_then_sample_tokens(llm):
    """The steps by hand: prefill a cache, then sample_tokens from its logits, which feeds each
    token back into that cache; the same chain as decode_tokens, and the cache holds it."""
    prompt = llm.tokenize("Once upon a time")
    expected = greedy_ids(llm, prompt, 10)
    cache = llm.new_cache()
    logits = llm.prefill(prompt, cache)
    history = list(prompt)
    made = list(llm.sample_tokens(logits, history, 10, Sampler(SamplingParams(temperature=0.0)), cache))
    assert made == expected and history == prompt + expected
    assert cache.pos == len(prompt) + len(expected) - 1  # the last token is sampled, not yet read
    follow = llm.decode_one_token(expected[-1], cache)  # the cache goes on from there
    assert np.allclose(follow, llm.logits(prompt + expected)[-1], atol=1e-4)

def test_generate_seeded_sampling_reproduces(llm):
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.9, seed=42)
    assert "".join(llm.generate("Hi", **kw)) == "".join(llm.generate("Hi", **kw))


def test_generate_max_tokens_and_stop(llm):
    full = "".join(llm.generate("Once upon a time", max_tokens=20, temperature=0.0))
    ids = greedy_ids(llm, llm.tokenize("Once upon a time"), 20)
    assert len(ids) <= 20 and full == llm.tokenizer.decode(ids, skip_special=True)
    assert "".join(llm.generate("Once upon a time", max_tokens=0)) == ""
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    if stop:
        cut = "".join(llm.generate("Once upon a time", max_tokens=20, temperature=0.0, stop=[stop]))
        assert cut == full[: full.find(stop)]


def test_generation_ends_at_an_end_of_generation_token(llm):
    prompt = llm.tokenize("Once upon a time")
    first = greedy_ids(llm, prompt, 1)[0]
    saved = set(llm.tokenizer.eog_ids)
    try:
        llm.tokenizer.eog_ids = saved | {first}
        assert greedy_ids(llm, prompt, 10) == []
    finally:
        llm.tokenizer.eog_ids = saved


def test_generation_stops_when_the_context_is_full(gguf_path):
    small = lfm_edge.load(gguf_path("moe", "q8_0"), n_ctx=12)
    small.tokenizer.eog_ids = set()
    prompt = small.tokenize("Once upon a time")
    out = greedy_ids(small, prompt, 100)
    assert len(prompt) + len(out) == 12 + 1  # the last sampled token needs no cache slot


def test_chat_stream_and_whole_reply_agree(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    pieces = list(llm.chat(messages, max_tokens=16, temperature=0.0))
    whole = llm.chat(messages, stream=False, max_tokens=16, temperature=0.0)
    assert isinstance(whole, str) and whole == "".join(pieces)
    ids = llm.chat_tokens(messages)
    assert ids[0] == 1 and ids[1] != 1  # exactly one BOS: the template writes it
    assert llm.detokenize(ids).endswith("<|im_start|>assistant\n")


def test_chat_with_tools_renders_the_tool_list(llm):
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {}}}]
    text = llm.render_chat([{"role": "user", "content": "Weather?"}], tools=tools)
    assert '<|tool_list_start|>[{"name": "get_weather"' in text
