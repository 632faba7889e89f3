"""Sessions: prefix reuse, cancelling from another thread, GUI callbacks, save/restore."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import lfm_edge
from lfm_edge.errors import LfmEdgeError
from lfm_edge.session import Session, turns_to_keep

GREEDY = dict(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def llm(gguf_path):
    m = lfm_edge.load(gguf_path("moe", "q8_0"), n_ctx=512)
    m.tokenizer.eog_ids = set()  # random weights: keep replies a fixed length
    return m


def test_follow_up_reuses_the_history_and_matches_a_fresh_session(llm):
    s = Session(llm, system="Be brief.", **GREEDY)
    first = s.send("Hello there", stream=False)
    assert s.last_stats.cached_tokens == 0
    second = s.send("Tell me more", stream=False)
    stats = s.last_stats
    # turn one's prompt was reused (all but its last token, "\n", which may merge
    # with the reply when the history is re-tokenized); so was the reply where it
    # re-tokenizes the same
    assert stats.cached_tokens >= len(llm.chat_tokens(s.messages[:2])) - 1
    # the same conversation computed from scratch gives the same reply
    fresh = Session(llm, messages=s.messages[:-1], **GREEDY)
    assert fresh.send(stream=False) == second
    assert fresh.last_stats.cached_tokens == 0
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert s.messages[2]["content"] == first


def test_a_prompt_that_extends_the_cache_reuses_all_of_it(llm):
    s = Session(llm, **GREEDY)
    s.send("One", stream=False, max_tokens=0)  # an empty reply: the cache holds exactly the prompt
    first_prompt = s.last_stats.prompt_tokens
    s.send("Two", stream=False)
    assert s.last_stats.cached_tokens == first_prompt
    assert Session(llm, messages=s.messages[:-1], **GREEDY).send(stream=False) == s.messages[-1]["content"]


def test_editing_history_falls_back_without_wrong_state(llm):
    s = Session(llm, **GREEDY)
    s.send("One", stream=False)
    s.messages[-1]["content"] = "an edited reply"
    reply = s.send("Two", stream=False)
    fresh = Session(llm, messages=s.messages[:-1], **GREEDY)
    assert fresh.send(stream=False) == reply


def test_cancel_from_another_thread(llm):
    s = Session(llm, temperature=0.0, max_tokens=400)
    pieces = []
    for i, piece in enumerate(s.send("Go on forever")):
        pieces.append(piece)
        if i == 3:
            threading.Thread(target=s.cancel).start()
    assert s.last_stats.finish_reason == "cancelled"
    assert s.last_stats.completion_tokens < 400
    # the partial reply is kept, and the session still works
    assert s.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert isinstance(s.send("again", stream=False, max_tokens=3), str)


def test_start_runs_on_a_worker_and_reports_through_callbacks(llm):
    s = Session(llm, **GREEDY)
    expected = Session(llm, **GREEDY).send("Hi", stream=False)
    seen, done = [], threading.Event()
    result = {}

    def on_text(piece):
        seen.append((threading.current_thread().name, piece))

    def on_done(stats, error):
        result.update(stats=stats, error=error)
        done.set()

    thread = s.start("Hi", on_text=on_text, on_done=on_done)
    assert thread is not threading.current_thread()
    assert done.wait(120)
    assert result["error"] is None and result["stats"].completion_tokens == 12
    assert {name for name, _ in seen} == {"lfm-edge-session"}
    assert "".join(p for _, p in seen) == expected


def test_two_sessions_share_one_model_without_mixing(llm):
    a_alone = Session(llm, **GREEDY).send("apples", stream=False)
    b_alone = Session(llm, **GREEDY).send("bananas", stream=False)
    out = {}

    def run(name, text):
        out[name] = Session(llm, **GREEDY).send(text, stream=False)

    threads = [threading.Thread(target=run, args=("a", "apples")), threading.Thread(target=run, args=("b", "bananas"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == {"a": a_alone, "b": b_alone}


def test_a_busy_session_refuses_a_second_turn(llm):
    s = Session(llm, **GREEDY)
    it = s.send("first")
    next(it)
    with pytest.raises(LfmEdgeError, match="already generating"):
        next(s.send("second"))
    it.close()


def test_save_and_restore(llm, tmp_path):
    s = Session(llm, system="sys", temperature=0.0, max_tokens=8, top_k=5)
    s.send("Hello", stream=False)
    path = tmp_path / "chat.json"
    s.save(path)
    assert not list(tmp_path.glob(".*lfm-edge-tmp*"))  # no temporary file left behind
    data = json.loads(path.read_text())
    assert data["messages"] == s.messages and data["sampling"]["top_k"] == 5
    restored = Session.load(llm, path)
    assert restored.messages == s.messages and restored.max_tokens == 8
    assert restored.send("Next", stream=False) == s.send("Next", stream=False)


def test_save_is_atomic_when_writing_fails(llm, tmp_path, monkeypatch):
    s = Session(llm)
    s.messages.append({"role": "user", "content": "keep me"})
    path = tmp_path / "chat.json"
    s.save(path)
    before = path.read_text()
    s.messages.append({"role": "user", "content": object()})  # not JSON-serialisable
    with pytest.raises(LfmEdgeError, match="not JSON"):
        s.save(path)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]


def test_load_rejects_other_files(llm, tmp_path):
    p = tmp_path / "x.json"
    p.write_text("[1, 2]")
    with pytest.raises(LfmEdgeError, match="not a saved lfm-edge conversation"):
        Session.load(llm, p)
    with pytest.raises(LfmEdgeError, match="no such file"):
        Session.load(llm, tmp_path / "missing.json")


def test_turns_to_keep_drops_the_oldest_turns_and_keeps_the_system_prompt():
    msgs = [{"role": "system", "content": "S"}]
    for i in range(4):
        msgs += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]
    msgs += [{"role": "user", "content": "u4"}]
    size = lambda m: sum(len(x["content"]) * 10 for x in m)  # noqa: E731 -- 10 "tokens" a character
    keep = lambda budget: [m["content"] for m in turns_to_keep(msgs, size, budget)]  # noqa: E731
    assert keep(10_000) == [m["content"] for m in msgs]  # everything fits: nothing dropped
    assert keep(70) == ["S", "u3", "a3", "u4"]  # whole turns, the newest that fit
    assert keep(50) == ["S", "u4"]
    assert keep(5) == ["S", "u4"]  # the newest message stays even when over budget
    no_system = msgs[1:]
    assert [m["content"] for m in turns_to_keep(no_system, size, 60)] == ["u3", "a3", "u4"]


def test_a_long_conversation_drops_its_oldest_turns_and_goes_on(gguf_path):
    small = lfm_edge.load(gguf_path("moe", "q8_0"), n_ctx=192)
    small.tokenizer.eog_ids = set()  # every reply is max_tokens long
    s = Session(small, system="Be brief.", temperature=0.0, max_tokens=40)
    prompts = []
    for i in range(8):
        s.send(f"Question number {i} about worms", stream=False)
        prompts.append(s.last_stats.prompt_tokens)
        assert s.last_stats.completion_tokens > 0 and s.last_stats.finish_reason == "length"
    assert s.dropped_messages > 0  # it did not fit: old turns went ...
    assert s.messages[0] == {"role": "system", "content": "Be brief."}  # ... the system prompt stayed ...
    assert s.messages[-2]["content"] == "Question number 7 about worms"  # ... and the newest message
    assert max(prompts) + 40 // 4 <= 192  # every prompt left room for a reply
    users = [m["content"] for m in s.messages if m["role"] == "user"]
    assert users == [f"Question number {i} about worms" for i in range(8 - len(users), 8)]  # the newest turns, in order
    # the shortened history gives the reply a fresh session would give
    assert Session(small, messages=s.messages[:-1], temperature=0.0, max_tokens=40).send(stream=False) == s.messages[-1]["content"]


def test_a_message_longer_than_the_context_leaves_the_history_alone(llm):
    s = Session(llm, system="Be brief.", **GREEDY)
    s.send("Hello", stream=False)
    before = [dict(m) for m in s.messages]
    with pytest.raises(LfmEdgeError, match=r"more than the whole 512-token context.*-c/--ctx-size"):
        s.send("word " * 600, stream=False)
    assert s.messages == before and s.dropped_messages == 0
    assert isinstance(s.send("Still there?", stream=False), str)


def test_stats_after_a_cancelled_reply_have_a_speed(llm):
    s = Session(llm, temperature=0.0, max_tokens=50)
    pieces = s.send("Go on")
    for i, _ in enumerate(pieces):
        if i == 5:
            break
    pieces.close()
    assert s.last_stats.finish_reason == "cancelled"
    assert s.last_stats.decode_s > 0 and s.last_stats.decode_tps > 0


def test_prefill_runs_in_chunks_with_the_same_result(llm, monkeypatch):
    import lfm_edge.llm as llm_module

    ids = llm.tokenize("the quick brown fox jumps over the lazy dog " * 6)
    whole = llm.prefill(ids, llm.new_cache())
    calls = []
    model, cache = llm.model, llm.new_cache()
    monkeypatch.setattr(llm_module, "PREFILL_CHUNK", 7)
    monkeypatch.setattr(llm, "model", lambda x, cache, all_logits: calls.append(len(x)) or model(x, cache, all_logits))
    chunked = llm.prefill(ids, cache)
    assert max(calls) == 7 and sum(calls) == len(ids) and cache.pos == len(ids)  # Ctrl-C is seen between chunks
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-4 * np.abs(whole).max())


def test_reasoning_is_kept_in_the_history_as_the_template_expects(gguf_path, tmp_path, monkeypatch):
    from pathlib import Path

    from lfm_edge.reply import REASONING, TEXT
    from test_reply import rewrite

    # the newest LFM2.5 template: its generation prompt ends in <think>, and it shows the
    # `thinking` of the replies after the last user message again
    template = (Path(__file__).parent / "golden" / "templates" / "hf-LFM2.5-2.6B.jinja").read_text()
    m = lfm_edge.load(rewrite(gguf_path("moe", "q8_0"), tmp_path / "lfm25.gguf", template=template), n_ctx=512)
    said = iter(["\nI should think.\n</think>\n\nThe answer is 4.", "Six.</think>6"])

    replies = {}

    def next_token(request, logits):  # each reply is the next of `said`, then the end token
        if request not in replies:
            replies[request] = iter(m.tokenize(next(said), add_special=False) + [m.tokenizer.eos_id])
        return next(replies[request])

    monkeypatch.setattr(m.engine, "next_token", next_token)
    s = Session(m, temperature=0.0, max_tokens=64)
    events = list(s.send_events("What is 2+2?"))
    assert "".join(e.text for e in events if e.kind == REASONING) == "I should think."
    assert "".join(e.text for e in events if e.kind == TEXT) == "The answer is 4."
    assert s.messages[-1] == {"role": "assistant", "content": "The answer is 4.", "thinking": "I should think."}
    assert m.render_chat(s.messages).endswith(
        "<|im_start|>assistant\n<think>I should think.</think>The answer is 4.<|im_end|>\n<|im_start|>assistant\n<think>"
    )
    assert s.send("And 3+3?", stream=False) == "6"  # send gives the answer alone
    assert s.messages[-1] == {"role": "assistant", "content": "6", "thinking": "Six."}
