"""The generation engine: several sequences in one forward call, each as if alone; caches that
stay consistent whatever interrupts a step; cancelling; the queue; slots kept for prefix reuse."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import lfm_edge
from lfm_edge import engine as engine_module
from lfm_edge.cache import Batch
from lfm_edge.engine import Engine, QueueFull
from lfm_edge.sampling import Sampler, SamplingParams
from lfm_edge.session import Session

GREEDY = dict(temperature=0.0, max_tokens=8)


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0.0))


@pytest.fixture(scope="module")
def llm(gguf_path):
    m = lfm_edge.load(gguf_path("moe", "q8_0"), n_ctx=256)
    m.tokenizer.eog_ids = set()  # random weights: replies of a fixed length
    return m


def prompts(llm, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, llm.args.n_vocab, n).tolist() for n in lengths]


# -- batched forward ---------------------------------------------------------------------


@pytest.mark.parametrize("name,out_type", [("moe", "f32"), ("dense", "f32"), ("moe", "q8_0")])
def test_sequences_run_together_give_the_logits_they_give_alone(name, out_type, gguf_path):
    """Three sequences with prompts of different lengths, the third joining after two steps:
    each step's logits of each sequence as when it runs alone, and so the same greedy tokens."""
    llm = lfm_edge.load(gguf_path(name, out_type), n_ctx=64)
    model = llm.model
    steps = 6
    joins = {0: 0, 1: 0, 2: 2}  # the step at which each sequence starts
    seqs = prompts(llm, [5, 11, 3], seed=1)

    def alone(prompt):  # the logits of its prefill's last token, then of each greedy step
        cache = llm.new_cache()
        out = [model(np.array(prompt, dtype=np.int32), cache, all_logits=False)[0]]
        for _ in range(steps - 1):
            out.append(model(np.array([int(out[-1].argmax())], dtype=np.int32), cache, all_logits=False)[0])
        return out

    expected = [alone(p) for p in seqs]
    caches = [llm.new_cache() for _ in seqs]
    got: list[list[np.ndarray]] = [[] for _ in seqs]
    for step in range(steps + 2):
        running = [i for i in range(len(seqs)) if joins[i] <= step and len(got[i]) < steps]
        if not running:
            break
        feed = [seqs[i] if not got[i] else [int(got[i][-1].argmax())] for i in running]
        batch = Batch([caches[i] for i in running], [len(f) for f in feed])
        ids = np.array([t for f in feed for t in f], dtype=np.int32)
        last_rows = np.cumsum([len(f) for f in feed]) - 1
        logits = model.forward(ids, batch, last_rows)
        batch.commit()
        for j, i in enumerate(running):
            got[i].append(logits[j])
    for i in range(len(seqs)):
        assert len(got[i]) == steps
        for a, b in zip(got[i], expected[i]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
        assert [int(x.argmax()) for x in got[i]] == [int(x.argmax()) for x in expected[i]]


def test_a_batch_changes_no_cache_until_it_is_committed(llm):
    cache = llm.new_cache()
    llm.prefill(prompts(llm, [6])[0], cache)
    before = cache.checkpoint()
    batch = Batch([cache], [3])
    llm.model.forward(np.array([11, 12, 13], dtype=np.int32), batch)
    assert cache.pos == 6 and cache.state is before  # the conv windows were written on copies
    batch.commit()
    assert cache.pos == 9 and not np.array_equal(cache.state.conv, before.conv)


def test_the_engine_decodes_requests_together_as_each_alone(llm, monkeypatch):
    seqs = prompts(llm, [4, 13, 7], seed=2)
    alone = [list(llm.decode_tokens(p, 10, greedy())) for p in seqs]
    engine = Engine(llm)
    forwards = []
    forward = llm.model.forward
    monkeypatch.setattr(llm.model, "forward", lambda ids, batch, rows=None: forwards.append(list(batch.lengths))
                        or forward(ids, batch, rows))
    a, b = (engine.submit(p, 10, greedy()) for p in seqs[:2])
    engine.step()
    engine.step()
    c = engine.submit(seqs[2], 10, greedy())  # joins while the others decode
    assert [list(h.tokens()) for h in (a, b, c)] == alone
    assert forwards[0] == [4, 13]  # both prompts in one call
    assert [7, 1, 1] in [sorted(f, reverse=True) for f in forwards]  # a prompt beside two decode steps
    assert max(len(f) for f in forwards) == 3 and len(forwards) < 3 * 10
    assert all(h.stats.finish_reason == "length" and h.stats.completion_tokens == 10 for h in (a, b, c))
    assert engine.active == 0 and engine.queued == 0


def test_a_long_prompt_is_read_in_chunks_between_decode_steps(llm, monkeypatch):
    short, long = prompts(llm, [3, 40], seed=3)
    alone = list(llm.decode_tokens(long, 4, greedy()))
    engine = Engine(llm, shared_chunk=8)
    forwards = []
    forward = llm.model.forward
    monkeypatch.setattr(llm.model, "forward", lambda ids, batch, rows=None: forwards.append(list(batch.lengths))
                        or forward(ids, batch, rows))
    a = engine.submit(short, 30, greedy())
    engine.step()  # a reads its prompt alone, and decodes from now on
    b = engine.submit(long, 4, greedy())
    tokens_a = a.tokens()
    for _ in range(6):  # a gets a token from every step while b's prompt is read
        next(tokens_a)
    assert forwards[1:6] == [[1, 8]] * 5
    assert list(b.tokens()) == alone
    tokens_a.close()


def test_a_stream_gets_its_token_after_every_step_while_another_thread_runs_them(llm, monkeypatch):
    short, long = prompts(llm, [3, 60], seed=7)
    engine = Engine(llm, shared_chunk=8)
    steps = []
    forward = llm.model.forward

    def slow(ids, batch, rows=None):  # long enough for a waiting thread to be outrun
        time.sleep(0.05)
        steps.append(list(batch.lengths))
        return forward(ids, batch, rows)

    monkeypatch.setattr(llm.model, "forward", slow)
    a = engine.submit(short, 20, greedy())
    tokens_a = a.tokens()
    next(tokens_a)
    b = engine.submit(long, 2, greedy())
    reader = threading.Thread(target=lambda: list(b.tokens()))
    reader.start()  # b's thread runs steps too
    seen = []
    for _ in range(8):  # while b's prompt is read, 8 tokens at a time
        next(tokens_a)
        seen.append(len(steps))
    reader.join(30)
    tokens_a.close()
    # each step's token as soon as it is made (a step of slack for a busy machine), not all at the end
    assert max(y - x for x, y in zip(seen, seen[1:])) <= 2 and seen[-1] < len(steps)
    assert [8] in [s[1:] for s in steps]


# -- interrupted steps -------------------------------------------------------------------


class Tripwire:
    """Stands for every layer of the model: counts layer calls, raises `error` at call `at`."""

    def __init__(self, layer, calls, at, error):
        self.layer, self.calls, self.at, self.error = layer, calls, at, error

    def __call__(self, x, batch):
        self.calls[0] += 1
        if self.calls[0] == self.at:
            raise self.error
        return self.layer(x, batch)


def layer_calls(llm, monkeypatch, at=0, error=None):
    calls = [0]
    monkeypatch.setattr(llm.model, "layer_stack", None)  # a call per layer, each a place to stop
    monkeypatch.setattr(llm.model, "layers", [Tripwire(layer, calls, at, error) for layer in llm.model.layers])
    return calls


@pytest.mark.parametrize("chunk", [2048, 5], ids=["whole-prompt", "chunks-of-5"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError], ids=["ctrl-c", "kernel-error"])
def test_an_interrupt_at_any_layer_leaves_a_consistent_session(llm, monkeypatch, chunk, error):
    """Turn two is interrupted at each layer boundary in turn; turn three then says what a fresh
    session computing the same history from scratch says."""
    monkeypatch.setattr(engine_module, "PREFILL_CHUNK", chunk)
    with monkeypatch.context() as m:
        s = Session(llm, system="Be brief.", **GREEDY)
        s.send("Hello there", stream=False)
        calls = layer_calls(llm, m)
        s.send("Tell me more", stream=False)
        total = calls[0]
    # the prompt (the part before its last token, in chunks; then that token), and 7 steps
    # that read the reply's tokens but its last
    assert total >= (2 + 7) * len(llm.model.layers)
    for at in range(1, total + 1):
        s = Session(llm, system="Be brief.", **GREEDY)
        s.send("Hello there", stream=False)
        with monkeypatch.context() as m:
            layer_calls(llm, m, at, error("stop here"))
            with pytest.raises(error):
                s.send("Tell me more", stream=False)
        assert s.last_stats.finish_reason == "cancelled"
        slot = s._slot
        assert not slot.busy and slot.cache.pos == len(slot.ids)
        reply = s.send("And then?", stream=False)
        assert Session(llm, messages=s.messages[:-1], **GREEDY).send(stream=False) == reply, f"interrupted at layer call {at}"


def test_an_interrupt_in_one_request_leaves_the_others_running(llm, monkeypatch):
    seqs = prompts(llm, [6, 9], seed=4)
    alone = [list(llm.decode_tokens(p, 8, greedy())) for p in seqs]
    for at in (3, 17, 40):  # in the prefill, in decode steps
        engine = Engine(llm)
        a, b = (engine.submit(p, 8, greedy()) for p in seqs)
        with monkeypatch.context() as m:
            layer_calls(llm, m, at, KeyboardInterrupt())
            with pytest.raises(KeyboardInterrupt):
                list(a.tokens())  # a's loop runs the steps, for both
        assert list(b.tokens()) == alone[1]
        assert a.finished and engine.active == 0


# -- requests ----------------------------------------------------------------------------


def test_cancel_ends_one_request_and_not_the_others(llm):
    seqs = prompts(llm, [5, 5], seed=5)
    alone = list(llm.decode_tokens(seqs[1], 12, greedy()))
    engine = Engine(llm)
    a, b = (engine.submit(p, 12, greedy()) for p in seqs)
    tokens_a = a.tokens()
    got_a = [next(tokens_a) for _ in range(3)]
    a.cancel()
    got_a += list(tokens_a)
    assert a.stats.finish_reason == "cancelled" and len(got_a) < 12
    assert list(b.tokens()) == alone and b.stats.finish_reason == "length"


def test_a_full_queue_refuses_with_a_sentence(llm):
    engine = Engine(llm, n_parallel=1, max_queued=1)
    p = prompts(llm, [4])[0]
    first, second = engine.submit(p, 2, greedy()), engine.submit(p, 2, greedy())
    with pytest.raises(QueueFull, match="1 requests are running and 1 waiting; try again"):
        engine.submit(p, 2, greedy())
    assert len(list(second.tokens())) == 2 and len(list(first.tokens())) == 2
    engine.submit(p, 2, greedy())  # room again


def test_kept_slots_reuse_the_prompt_a_request_shares_with_an_earlier_one(llm):
    engine = Engine(llm, n_parallel=2, reuse_slots=True)
    history, other = prompts(llm, [30, 20], seed=6)
    first = engine.submit(history, 5, greedy())
    reply = list(first.tokens())
    unrelated = engine.submit(other, 3, greedy())  # takes a second slot: the first keeps its history
    list(unrelated.tokens())
    follow_up = history + reply + [15, 16, 17]
    h = engine.submit(follow_up, 5, greedy())
    assert list(h.tokens()) == list(llm.decode_tokens(follow_up, 5, greedy()))
    assert h.stats.cached_tokens == len(history) + len(reply) - 1  # all but the reply's last token


# -- the size of prompt chunks -----------------------------------------------------------


class FakeClock:
    """A clock that only the model's forward calls move: `tps` prompt-or-decode rows a second."""

    def __init__(self, tps: float):
        self.tps, self.now = tps, 0.0

    def __call__(self) -> float:
        return self.now


def timed_forwards(llm, monkeypatch, clock: FakeClock) -> list[list[int]]:
    forwards = []
    forward = llm.model.forward

    def run(ids, batch, rows=None):
        forwards.append(list(batch.lengths))
        clock.now += ids.size / clock.tps
        return forward(ids, batch, rows)

    monkeypatch.setattr(llm.model, "forward", run)
    return forwards


def test_a_prompt_beside_a_decoding_stream_is_read_in_chunks_that_fit_the_step_budget(llm, monkeypatch):
    """Chunks are sized from the measured prefill speed: a step of chunk + decode rows takes
    about the budget, and the chunks follow the speed when it changes."""
    clock = FakeClock(tps=100.0)
    forwards = timed_forwards(llm, monkeypatch, clock)
    engine = Engine(llm, step_budget_s=0.5, min_chunk=4, shared_chunk=64, clock=clock)
    short, long = prompts(llm, [10, 240], seed=8)
    a = engine.submit(short, 200, greedy())
    engine.step()  # a's whole prompt alone (10 rows in 0.1 s: 100 tokens/s), then a decodes
    assert engine.prefill_rate.tps == pytest.approx(100.0)
    b = engine.submit(long, 2, greedy())
    engine.step()
    assert forwards[-1] == [1, 49]  # 100 tokens/s x 0.5 s = 50 rows: a's decode row and 49 of b's prompt
    clock.tps = 40.0  # the machine slows down (another process): the chunks shrink step by step
    sizes = []
    for _ in range(4):
        engine.step()
        sizes.append(forwards[-1][1])
    # the step at 40 tokens/s was sized at 100; each step after it moves the EWMA (weight 0.3)
    # toward 40: 0.3 x 40 + 0.7 x 100 = 82 tokens/s, so 41 rows, 40 of them b's; then 69.4, 60.6
    assert sizes == [49, 40, 33, 29]
    rate = engine.prefill_rate.tps  # an EWMA of the steps so far, each at 40 or 100 tokens/s
    assert 40.0 < rate < 100.0 and engine.chunk_size(1) == int(rate * 0.5) - 1
    engine.prefill_rate.tps = 2.0  # however slow, a step reads at least min_chunk; however fast, at most shared_chunk
    assert engine.chunk_size(1) == 4
    engine.prefill_rate.tps = 1e6
    assert engine.chunk_size(1) == 64
    engine.prefill_rate.tps = 100.0  # three decoding sequences leave room for 47 prompt tokens
    assert engine.chunk_size(3) == 47
    a.cancel()
    list(b.tokens())  # b's prompt ends alone: its last 40 tokens in one idle-sized chunk
    assert forwards[-2] == [40]
    assert b.stats.completion_tokens == 2


def test_an_idle_engine_reads_a_prompt_in_big_chunks_and_the_first_shared_step_is_small(llm, monkeypatch):
    clock = FakeClock(tps=100.0)
    forwards = timed_forwards(llm, monkeypatch, clock)
    engine = Engine(llm, step_budget_s=0.5, min_chunk=4, shared_chunk=64, clock=clock)
    assert engine.chunk_size(0) == engine_module.PREFILL_CHUNK
    assert engine.chunk_size(1) == 4  # no speed measured yet: the smallest chunk measures it
    (long,) = prompts(llm, [200], seed=9)
    list(engine.submit(long, 1, greedy()).tokens())
    assert forwards == [[200]]


def test_a_new_sequence_allocates_only_its_kv_cache_and_conv_state(llm):
    """What an extra sequence costs: n_ctx x attention layers x 2 (k, v) x kv heads x head dim x
    the KV element size, plus conv layers x (L-1) x hidden float32s; every other array is shared."""
    a = llm.args
    caches = [llm.new_cache() for _ in range(3)]
    attn = [i for i in range(a.n_layer) if a.is_attention(i)]
    kv_bytes = sum(2 * llm.n_ctx * a.n_kv_heads[i] * a.head_dim for i in attn) * np.dtype(np.float16).itemsize
    conv_bytes = (a.n_layer - len(attn)) * (a.conv_kernel - 1) * a.hidden * 4
    for c in caches:
        assert c.nbytes == kv_bytes + conv_bytes and c.kv[attn[0]].keys.dtype == np.float16
    first, second = caches[0], caches[1]  # nothing of one sequence's cache is another's
    assert not any(np.shares_memory(x.keys, y.keys) or np.shares_memory(x.values, y.values)
                   for x, y in zip(first.kv, second.kv) if x is not None)
    assert not np.shares_memory(first.state.conv, second.state.conv)
