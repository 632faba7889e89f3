"""The server's use of the model: jobs run one at a time on one model state.

This is the one module of the server that drives generation (the batched engine of
lfm_edge/engine.py replaces it here, behind the same `Runner.generate`). Requests run in
arrival order (`FifoLock`): the model has one state, and requests are never mixed into it.
A request that continues the previous one (the next turn of a chat) reuses its state, as
`Session` does. A cancelled generation (the client went away) stops at its next token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LfmEdgeError
from ..llm import LLM, GenerationStats, make_sampling_params
from ..reply import Event, reply_events
from ..sampling import Sampler
from ..session import common_prefix
from .protocol import Job, RequestError, TokenLogprob

log = logging.getLogger("lfm_edge.server")


class FifoLock:
    """A lock that serves waiters in the order they came (threading.Lock promises no order)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._now_serving = 0

    def __enter__(self) -> FifoLock:
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._now_serving == ticket)
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._now_serving += 1
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        """Requests holding or waiting for the lock."""
        with self._cond:
            return self._next_ticket - self._now_serving


@dataclass
class Trace:
    """What a generation made besides its events: the token ids, and their logprobs if asked."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


class LoggingSampler(Sampler):
    """A Sampler that also notes each chosen token's log-probability under the model (the
    logits before penalties, temperature, filters and grammar) and the `top` likeliest."""

    def __init__(self, sampler: Sampler, top: int, out: list[TokenLogprob]):
        super().__init__(sampler.params, sampler.constraint)
        self.top, self.out = top, out

    def __call__(self, logits: np.ndarray, history) -> int:
        token = super().__call__(logits, history)
        x = logits.astype(np.float64)
        logz = float(np.max(x) + np.log(np.sum(np.exp(x - np.max(x)))))
        top: tuple[tuple[int, float], ...] = ()
        if self.top:
            best = np.argpartition(-x, self.top - 1)[: self.top]
            best = best[np.argsort(-x[best], kind="stable")]
            top = tuple((int(i), float(x[i] - logz)) for i in best)
        self.out.append(TokenLogprob(token, float(x[token] - logz), top))
        return token


class Runner:
    """The model with one state, shared by all requests in turn, and what they did."""

    def __init__(self, llm: LLM, model_id: str, defaults: dict[str, Any] | None = None):
        self.llm = llm
        self.model_id = model_id
        if defaults is None:
            from ..commands.common import card_defaults

            defaults = card_defaults(llm)
        make_sampling_params(defaults)
        self.defaults = dict(defaults)
        self.created = int(time.time())
        self.turn = FifoLock()
        self.cache = llm.new_cache()
        self.cached: list[int] = []  # the ids whose state self.cache holds
        self.mark = None  # (checkpoint, ids): the state one token before the last prompt's end
        self.finished: Counter[str] = Counter()  # generations by finish reason
        self.recent: deque[GenerationStats] = deque(maxlen=64)
        self.closing = threading.Event()
        self.current_cancel: threading.Event | None = None
        self.busy_since: float | None = None  # when the running generation started (for /api/ps)

    def generate(
        self,
        job: Job,
        stats: GenerationStats,
        cancel: threading.Event,
        trace: Trace | None = None,
        abandoned: Callable[[], bool] | None = None,
    ) -> Iterator[Event]:
        """The reply to `job` as events (lfm_edge.reply), once its turn comes; stops early
        when `cancel` is set. `abandoned()` is asked when the turn comes: True cancels at once
        (the client left while waiting). `trace` collects the token ids and logprobs."""
        trace = trace if trace is not None else Trace()
        stats.prompt_tokens = len(job.prompt)
        with self.turn:
            if self.closing.is_set():
                raise RequestError("the server is shutting down", status=503)
            self.current_cancel, self.busy_since = cancel, time.time()
            try:
                if abandoned is not None and abandoned():
                    cancel.set()
                else:
                    yield from self._decode(job, stats, cancel, trace)
            except BaseException:
                stats.finish_reason = "error"
                raise
            finally:
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                self.current_cancel, self.busy_since = None, None
                self.record(job, stats)

    def _decode(self, job: Job, stats: GenerationStats, cancel: threading.Event, trace: Trace) -> Iterator[Event]:
        """Generation proper (only while holding self.turn). A completion is a raw
        continuation: all text, no reasoning or tool calls."""
        history = list(job.prompt)
        sampler = Sampler(job.sampling, job.constraint)
        if job.logprobs is not None:
            sampler = LoggingSampler(sampler, job.logprobs, trace.logprobs)
        try:
            logits = self._prefill(job.prompt, stats)
            prefilled = (stats.prompt_tokens, stats.cached_tokens, stats.prefill_s)
            start = time.perf_counter()
            tokens = self.llm.sample_tokens(logits, history, job.max_tokens, sampler, self.cache, stats, cancel)
            try:
                yield from reply_events(
                    self.llm.tokenizer, self._noted(tokens, trace), job.prompt, job.stop,
                    raw=job.kind == "completion", stats=stats,
                )
            finally:  # what the prefill did is ours to report, whatever the sampling loop counts
                stats.prompt_tokens, stats.cached_tokens, stats.prefill_s = prefilled
            stats.decode_s = time.perf_counter() - start
            del trace.logprobs[len(trace.ids):]  # a sampled end token is not part of the reply
        except LfmEdgeError as e:  # not expected after the checks of protocol, but a sentence all the same
            self._forget()
            raise RequestError(str(e)) from None
        except BaseException:
            self._forget()
            raise
        else:
            # every token of `history` but (perhaps) the last was fed to the cache
            self.cached = history[: self.cache.pos]

    @staticmethod
    def _noted(tokens: Iterator[int], trace: Trace) -> Iterator[int]:
        for t in tokens:
            trace.ids.append(t)
            yield t

    def _forget(self) -> None:
        """The state is unknown: start afresh next time."""
        self.cached, self.mark = [], None
        self.cache.reset()

    def _prefill(self, prompt: list[int], stats: GenerationStats):
        """Session's prefix reuse: continue from the cache, or from the last prompt's end, or afresh."""
        start = time.perf_counter()
        reuse = common_prefix(self.cached, prompt)
        if reuse == len(self.cached) and reuse < len(prompt):
            pass  # the cache holds a prefix of the prompt
        elif self.mark is not None and len(self.mark[1]) <= reuse and len(self.mark[1]) < len(prompt):
            checkpoint, ids = self.mark
            self.cache.restore(checkpoint)
            reuse = len(ids)
        else:
            self.cache.reset()
            reuse = 0
        self.cached = []  # until the prefill below succeeds
        stats.cached_tokens = reuse
        if reuse < len(prompt) - 1:
            self.llm.prefill(prompt[reuse:-1], self.cache)
        self.mark = (self.cache.checkpoint(), prompt[:-1])
        logits = self.llm.prefill(prompt[-1:], self.cache)
        self.cached = list(prompt)
        stats.prefill_s = time.perf_counter() - start
        return logits

    def record(self, job: Job, stats: GenerationStats) -> None:
        self.finished[stats.finish_reason or "error"] += 1
        self.recent.append(stats)
        log.info(
            "%s %s: %d prompt tokens (%d reused), %d generated, %.1f tok/s, %s",
            job.kind,
            job.id,
            stats.prompt_tokens,
            stats.cached_tokens,
            stats.completion_tokens,
            stats.decode_tps,
            stats.finish_reason,
        )

    def close(self) -> None:
        """Stop the running generation and refuse new ones."""
        self.closing.set()
        if self.current_cancel is not None:
            self.current_cancel.set()
