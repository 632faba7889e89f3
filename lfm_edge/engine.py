"""The one generation engine: every front end's requests, decoded together.

    engine = Engine(llm, n_parallel=4, max_queued=16)
    handle = engine.submit(prompt_ids, max_tokens=256, sampler=Sampler(params))
    for event in handle.events(stop=["\\n\\n"]):  # or handle.tokens(): the token ids
        ...
    handle.cancel()  # from any thread: the reply ends ("cancelled") before its next token

A request becomes a sequence with its own Slot: a cache and the ids it holds. A slot kept
between requests (a Session's, or one of the engine's own with reuse_slots=True) is reused as
far as the new prompt starts with what it holds, or back to a checkpoint taken one token before
the end of its last prompt (conv states cannot be rewound; see Slot.place).

A step runs every active sequence in one forward call: one row for each sequence that is
decoding, and a chunk of each prompt still being read. With nothing decoding the chunk is big
(PREFILL_CHUNK tokens, prefill at full speed); while something decodes it is sized so that the
whole step takes about STEP_BUDGET_S, from the prompt tokens/s of the last steps that read
prompts (PrefillRate), so a new prompt holds the running streams up by about that much a token,
and a short prompt gets its first token within a step or two. Then each sequence with fresh
logits samples its next token. Caches move on only when a forward call completes (cache.Batch):
whatever stops a step (Ctrl-C, cancel, an error in a kernel) leaves every sequence where it was
before the step, and it simply runs again.

Nobody has to start the engine: a consumer waiting for its next token runs the next step, for
every sequence, unless another thread is running one (then it waits for that). One caller needs
no thread, and Ctrl-C lands in the step its own loop runs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .cache import Batch, Cache, State
from .errors import LfmEdgeError
from .reply import Event, reply_events
from .sampling import Sampler

if TYPE_CHECKING:
    from .llm import LLM

# Prompt tokens per step while no sequence is decoding: llama.cpp's ubatch. Longer chunks are
# slower, not faster: a 4096-token prompt on the 8B-A1B (Zen 5, interleaved runs) took 288.8 tok/s
# in chunks of 512 and 261.4 in chunks of 2048 (2 threads; 141.7 and 128.7 on 1), as each
# chunk's activations and the MoE's buffers (4x the size) fall out of the caches; the weights'
# extra passes cost less. Ctrl-C waits for at most one chunk.
PREFILL_CHUNK = 512
# while others decode, a step's prompt chunk is sized to take about STEP_BUDGET_S, within
# MIN_CHUNK..SHARED_CHUNK tokens (the 8B model prefills ~40 tokens/s on 2 AVX2 cores: ~40 a step)
STEP_BUDGET_S = 1.0
MIN_CHUNK = 16
SHARED_CHUNK = 256


@dataclass
class GenerationStats:
    """What one generation did; filled in as it runs."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose state was reused, not recomputed
    completion_tokens: int = 0
    prefill_s: float = 0.0  # time to first token: waiting and prompt processing included
    decode_s: float = 0.0
    finish_reason: str | None = None  # "stop", "length" or "cancelled"

    @property
    def decode_tps(self) -> float:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else 0.0


class PrefillRate:
    """Tokens per second of the steps that read prompt chunks, as an exponentially weighted mean
    (weight `alpha` for the newest step): what sizes the next chunk. None until one is measured."""

    def __init__(self, alpha: float = 0.3):
        self.alpha = alpha
        self.tps: float | None = None

    def add(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        tps = tokens / seconds
        self.tps = tps if self.tps is None else self.alpha * tps + (1 - self.alpha) * self.tps


class QueueFull(LfmEdgeError):
    """The engine's queue of waiting requests is full."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(eq=False)
class Slot:
    """A cache and what it holds, kept between requests so that a prompt that starts the same
    way is not computed again. One request uses a slot at a time."""

    cache: Cache
    ids: list[int] = field(default_factory=list)  # the tokens whose state the cache holds, in order
    mark: tuple[State, list[int]] | None = None  # the state one token before the last prompt's end
    busy: bool = False  # a sequence is using it (changed under the engine's lock)
    last_used: float = 0.0

    def place(self, prompt: Sequence[int]) -> int:
        """Make the cache hold the longest start of `prompt` it can without recomputing, and
        at least one token less than all of it (the last one gives the logits); returns its length.

        Attention rewinds to any position, but a conv state only to a checkpoint: so either the
        prompt continues what the cache holds, or it starts with the ids of the mark (the last
        prompt less its final token, typically a chat's history up to "<|im_start|>assistant"),
        or everything is computed afresh.
        """
        reuse = common_prefix(self.ids, prompt)
        if reuse == len(self.ids) and reuse < len(prompt):
            return reuse  # the cache holds a prefix of the prompt: continue from it
        if self.mark is not None:
            state, ids = self.mark
            if len(ids) < len(prompt) and list(prompt[: len(ids)]) == ids:
                self.cache.restore(state)
                self.ids = list(ids)
                return len(ids)
        self.cache.reset()
        self.ids = []
        return 0


class Handle:
    """One request in the engine: read it with tokens() or events(), stop it with cancel().

    `stats` fills in as it runs. Stopping the iteration early (close(), break and the garbage
    collector, an exception in the caller) ends the request without a finish reason of its own.
    """

    def __init__(
        self,
        engine: Engine,
        ids: list[int],
        prompt: list[int],
        max_tokens: int,
        sampler: Sampler,
        slot: Slot | None,
        stats: GenerationStats,
        cancel: threading.Event | None,
        history: list[int],
        keep_mark: bool,
    ):
        self.engine = engine
        self.ids = ids  # what the cache must hold: the prompt, then each token made
        self.prompt = prompt
        self.n_prompt = len(ids)  # ids[:n_prompt] is read as prompt; the rest was generated
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.slot = slot
        self.stats = stats
        self.history = history  # what the sampler sees: the prompt and the reply so far
        self.keep_mark = keep_mark
        self.generated = 0
        self.finished = False
        self.error: BaseException | None = None
        self._cancel = cancel if cancel is not None else threading.Event()
        self._closing = False
        self._continues = False  # continue_cache: the cache is the caller's, taken as it is
        self._out: deque[int] = deque()  # tokens made, not yet read
        self._staged: tuple[int, np.ndarray] | None = None  # (cache length they follow, logits [V])
        self._submitted = time.perf_counter()
        self._first_logits: float | None = None

    # -- for the caller ------------------------------------------------------------
    def cancel(self) -> None:
        """End the request before its next token ("cancelled"); safe from any thread."""
        self._cancel.set()
        self.engine._poke()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def tokens(self) -> Iterator[int]:
        """The token ids of the reply as they are made (an end-of-generation token is not one)."""
        engine = self.engine
        try:
            while True:
                with engine._lock:
                    token = self._out.popleft() if self._out else None
                    done = token is None and self.finished
                if token is not None:
                    yield token
                elif done:
                    break
                else:
                    engine._advance(self)
            if self.error is not None:
                raise self.error
        finally:
            if not self.finished:
                engine._close(self)

    def events(self, stop: Sequence[str] = (), raw: bool = False) -> Iterator[Event]:
        """The reply as events (lfm_edge.reply): text, reasoning, tool calls, a stop string, the end."""
        tokens = self.tokens()
        try:
            yield from reply_events(self.engine.llm.tokenizer, tokens, self.prompt, list(stop), raw=raw, stats=self.stats)
        finally:  # a stop string ends the request now
            tokens.close()

    # -- for the engine ----------------------------------------------------------
    def _ready(self) -> bool:
        """Logits for what the cache holds wait to be sampled: staged by a step that then
        committed (one that did not leaves them behind a cache length that differs), and no
        token sampled from them yet."""
        return self._staged is not None and self._staged[0] == self.slot.cache.pos == len(self.ids)


class Engine:
    """Sequences with their own caches, advanced together one step at a time.

    n_parallel: sequences decoded together; more wait in a queue of at most max_queued (None:
    no limit), and submit() raises QueueFull beyond it. reuse_slots: keep up to n_parallel
    caches between requests that bring no slot of their own, each new request taking the one
    that already holds most of its prompt (llama-server's slots); otherwise such a request gets
    a fresh cache, freed when it ends. step_budget_s, min_chunk, shared_chunk: the length of a
    step that reads a prompt while others decode, and the bounds of its chunk (see chunk_size);
    clock: seconds, for timing those steps.
    """

    def __init__(
        self,
        llm: LLM,
        n_parallel: int = 8,
        max_queued: int | None = None,
        reuse_slots: bool = False,
        step_budget_s: float = STEP_BUDGET_S,
        min_chunk: int = MIN_CHUNK,
        shared_chunk: int = SHARED_CHUNK,
        clock=time.perf_counter,
    ):
        if n_parallel < 1:
            raise LfmEdgeError(f"n_parallel must be at least 1, got {n_parallel}")
        self.llm = llm
        self.n_parallel = n_parallel
        self.max_queued = max_queued
        self.reuse_slots = reuse_slots
        self.step_budget_s = step_budget_s
        self.min_chunk = min_chunk
        self.shared_chunk = shared_chunk
        self.clock = clock
        self.prefill_rate = PrefillRate()
        self._lock = threading.Lock()  # the queue, the active list, slots' busy flags, handles' output
        self._changed = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # one step at a time
        self._queue: deque[Handle] = deque()
        self._active: list[Handle] = []
        self._slots: list[Slot] = []  # the engine's own slots (reuse_slots)

    # -- requests --------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        sampler: Sampler,
        *,
        slot: Slot | None = None,
        stats: GenerationStats | None = None,
        cancel: threading.Event | None = None,
        keep_mark: bool | None = None,
    ) -> Handle:
        """Queue a request: the reply to the token ids `prompt` (the whole prompt: a slot is
        reused as far as it holds its start). slot: a Slot kept by the caller (a Session's);
        keep_mark: take the checkpoint that lets the next request rewind to this prompt's
        end (by default, for slots that are kept). cancel: an Event that cancels when set."""
        ids = list(self.llm._check_ids(prompt))
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(ids)
        kept = slot is not None or self.reuse_slots
        handle = Handle(self, ids, list(ids), max_tokens, sampler, slot, stats, cancel, list(ids),
                        kept if keep_mark is None else keep_mark)
        self._enqueue(handle)
        return handle

    def continue_cache(
        self,
        cache: Cache,
        prompt: Sequence[int],
        max_tokens: int,
        sampler: Sampler,
        *,
        stats: GenerationStats | None = None,
        cancel: threading.Event | None = None,
        logits: np.ndarray | None = None,
        history: list[int] | None = None,
    ) -> Handle:
        """Queue a request that continues a cache the caller manages (LLM.decode_tokens,
        sample_tokens): `prompt` after what it holds, or, given the `logits` of what it
        holds, nothing to read. `history` (appended to) is what the sampler sees."""
        ids = list(self.llm._check_ids(prompt)) if len(prompt) else []
        if cache.pos + len(ids) > cache.n_ctx:
            raise LfmEdgeError(f"the prompt does not fit: {cache.pos + len(ids)} tokens for a context of {cache.n_ctx}")
        if not ids and logits is None:
            raise LfmEdgeError("expected a non-empty list of token ids")
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(ids)
        unknown = [-1] * cache.pos  # whatever the cache holds: never matched by a prompt
        slot = Slot(cache, ids=list(unknown))
        handle = Handle(self, unknown + ids, ids, max_tokens, sampler, slot, stats, cancel,
                        history if history is not None else list(ids), keep_mark=False)
        handle._continues = True
        if logits is not None:
            handle._staged = (cache.pos, logits)
        self._enqueue(handle)
        return handle

    def _enqueue(self, handle: Handle) -> None:
        with self._lock:
            free = self.n_parallel - len(self._active)
            if self.max_queued is not None and len(self._queue) - free >= self.max_queued:
                raise QueueFull(f"the server is busy: {self.n_parallel} requests are running and "
                                f"{self.max_queued} waiting; try again shortly")
            self._queue.append(handle)
            self._changed.notify_all()

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._active)

    # -- driving ---------------------------------------------------------------
    def step(self) -> int:
        """Run one step for every sequence; returns the tokens it ran through the model."""
        with self._step_lock:
            ran = self._step()
        with self._lock:
            self._changed.notify_all()
        return ran

    def _advance(self, handle: Handle) -> None:
        """Run the next step, unless another thread is running one: then wait for it to end
        (a thread that waited for the step lock instead could miss its tokens while the other
        thread ran step after step). Either way `handle` may have a token afterwards."""
        if self._step_lock.acquire(blocking=False):
            try:
                with self._lock:
                    if handle._out or handle.finished:
                        return
                ran = self._step()
            finally:
                self._step_lock.release()
            with self._lock:
                self._changed.notify_all()  # the step is over: its tokens are out
            if ran:
                return
        with self._lock:  # a step is running elsewhere, or there was nothing to run: wait a little
            if not (handle._out or handle.finished):
                self._changed.wait(0.05)

    def _poke(self) -> None:
        """End cancelled or abandoned requests now, unless a step is running (it will)."""
        if self._step_lock.acquire(blocking=False):
            try:
                self._reap()
            finally:
                self._step_lock.release()

    def _close(self, handle: Handle) -> None:
        """The caller stopped reading `handle`."""
        with self._lock:
            handle._closing = True
            if handle in self._queue:  # never started: nothing to undo
                self._queue.remove(handle)
                handle.finished = True
                return
        self._poke()

    # -- one step (the caller holds _step_lock) ----------------------------------
    def _step(self) -> int:
        self._reap()
        self._admit()
        with self._lock:
            active = list(self._active)
        for h in active:
            if h._ready():  # left by a step whose sampling was interrupted
                self._sample(h)
        plan = self._plan([h for h in active if not h.finished])
        if not plan:
            return 0
        caches = [h.slot.cache for h, _, _ in plan]
        lengths = [n for _, _, n in plan]
        ids = np.array([t for h, pos, n in plan for t in h.ids[pos : pos + n]], dtype=np.int32)
        wanting = [(i, h, pos + n) for i, (h, pos, n) in enumerate(plan) if pos + n == len(h.ids)]
        ends = np.cumsum(lengths)
        logit_rows = np.array([ends[i] - 1 for i, _, _ in wanting], dtype=np.int64)
        try:
            batch = Batch(caches, lengths)
            with self.llm._compute:
                start = self.clock()
                logits = self.llm.model.forward(ids, batch, logit_rows)  # [len(wanting), V]
                seconds = self.clock() - start
        except Exception as e:  # a kernel failed: these requests end with its error, their caches as they were
            for h, _, _ in plan:
                self._finish(h, error=e)
            return int(ids.size)
        if any(pos < h.n_prompt for h, pos, _ in plan):  # a step that read a prompt: its speed sizes the next chunks
            self.prefill_rate.add(int(ids.size), seconds)
        for j, (_, h, end) in enumerate(wanting):
            h._staged = (end, logits[j])  # valid once the cache's length is `end`
        batch.commit()
        for _, h, _ in wanting:
            if h._ready():
                self._sample(h)
        return int(ids.size)

    def _reap(self) -> None:
        with self._lock:
            gone = [h for h in self._active if h._closing or h.cancelled]
        for h in gone:
            self._finish(h, None if h._closing else "cancelled")

    def _admit(self) -> None:
        with self._lock:
            for h in list(self._queue):
                if len(self._active) >= self.n_parallel:
                    break
                if h.cancelled:
                    self._queue.remove(h)
                    h.finished, h.stats.finish_reason = True, "cancelled"
                    continue
                if h.slot is None:
                    h.slot = self._free_slot(h.ids)
                elif h.slot.busy:
                    continue  # its slot's last request has not ended yet
                self._queue.remove(h)
                h.slot.busy = True
                h.slot.last_used = time.perf_counter()
                if not h._continues:
                    h.stats.cached_tokens = h.slot.place(h.ids)
                self._active.append(h)

    def _free_slot(self, prompt: list[int]) -> Slot:
        """A slot for a request without one (under _lock)."""
        if not self.reuse_slots:
            return Slot(self.llm.new_cache())
        free = [s for s in self._slots if not s.busy]
        # the slot holding most of the prompt; else a new one while there is room (the others
        # keep their conversations), else the one unused for longest
        best = max(free, key=lambda s: (common_prefix(s.ids, prompt), -s.last_used), default=None)
        if best is not None and (common_prefix(best.ids, prompt) > 0 or len(self._slots) >= self.n_parallel):
            return best
        slot = Slot(self.llm.new_cache())
        self._slots.append(slot)
        return slot

    def _plan(self, live: list[Handle]) -> list[tuple[Handle, int, int]]:
        """(sequence, first position, tokens) of each sequence in the next forward call."""
        plan = []
        decoding = sum(not h._ready() and h.n_prompt <= h.slot.cache.pos < len(h.ids) for h in live)
        budget = self.chunk_size(decoding)
        for h in live:
            if h.cancelled:
                self._finish(h, "cancelled")
                continue
            pos = h.slot.cache.pos
            if h._ready() or pos >= len(h.ids):
                continue
            if pos >= h.n_prompt:  # decoding: its one token is never held back
                plan.append((h, pos, len(h.ids) - pos))
                continue
            end = len(h.ids)
            if h.keep_mark and pos < h.n_prompt - 1:
                end = h.n_prompt - 1  # stop one token short, for the mark
            elif h.keep_mark:
                h.slot.mark = (h.slot.cache.checkpoint(), h.ids[:pos])
            n = min(end - pos, budget)
            if n > 0:
                budget -= n
                plan.append((h, pos, n))
        return plan

    def chunk_size(self, decoding: int) -> int:
        """Prompt tokens the next step may read beside `decoding` sequences' decode rows: all it
        can (PREFILL_CHUNK) when none decode; else what fits the step budget at the measured
        prefill speed (the decode rows counted as prompt tokens), within min_chunk..shared_chunk.
        Before any speed is measured, min_chunk: the first such step measures it."""
        if not decoding:
            return PREFILL_CHUNK
        tps = self.prefill_rate.tps
        fit = self.min_chunk if tps is None else int(tps * self.step_budget_s) - decoding
        return min(self.shared_chunk, max(self.min_chunk, fit))

    def next_token(self, h: Handle, logits: np.ndarray) -> int:
        """The token `h` picks from `logits` [V]: its sampler's choice, within its grammar if it
        has one. (Tests replace this to make the model say a given text.)"""
        return h.sampler(logits, h.history)

    def _sample(self, h: Handle) -> None:
        """The next token of `h` from its staged logits, or its end."""
        _, logits = h._staged
        now = time.perf_counter()
        if h._first_logits is None:
            h._first_logits = now
            h.stats.prefill_s = now - h._submitted
        if h.cancelled:
            return self._finish(h, "cancelled")
        if h.generated >= h.max_tokens:
            return self._finish(h, "length")
        if not np.isfinite(logits).all():  # one pass over [V]: cheap next to a decode step
            return self._finish(h, error=self.llm.file.error(
                "the model computed NaN or infinite logits; its weights are probably corrupt"))
        try:
            token = self.next_token(h, logits)
        except Exception as e:  # e.g. a grammar that fails: this request's error alone
            return self._finish(h, error=e)
        if token in self.llm.tokenizer.eog_ids:
            return self._finish(h, "stop")
        h.ids.append(token)  # from here on the logits are used (_ready)
        h._staged = None
        h.generated += 1
        h.stats.completion_tokens += 1
        h.history.append(token)
        h.stats.decode_s = time.perf_counter() - h._first_logits
        with self._lock:
            h._out.append(token)
        if h.sampler.is_done():  # the grammar is complete: only an end token could follow
            self._finish(h, "stop")
        elif h.slot.cache.pos >= h.slot.cache.n_ctx or h.generated >= h.max_tokens:
            self._finish(h, "length")  # the last token is never fed: the next prompt starts with it

    def _finish(self, h: Handle, reason: str | None = None, error: BaseException | None = None) -> None:
        """End `h` and free its slot (by the thread running steps)."""
        if reason is not None:
            h.stats.finish_reason = reason
        if h._first_logits is not None:
            h.stats.decode_s = time.perf_counter() - h._first_logits
        with self._lock:
            h.error = error
            h.finished = True
            if h in self._active:
                self._active.remove(h)
                h.slot.ids = h.ids[: h.slot.cache.pos]
                h.slot.busy = False
            self._changed.notify_all()
