"""The server's use of the model: every request a sequence of one generation engine.

This is the one module of the server that drives generation. Up to `parallel` requests
decode together (lfm_edge.engine: one forward call a step for all of them, each with its own
cache); more wait in the engine's queue, and beyond `max_queued` waiting a request is refused
with a 503 (Retry-After). The engine keeps `parallel` caches, and a request takes the one that
already holds most of its prompt (the next turn of a chat continues its state, as `Session`
does). A cancelled generation (the client went away) stops before its next token.
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

from ..engine import Engine, QueueFull
from ..errors import LfmEdgeError
from ..llm import LLM, GenerationStats, make_sampling_params
from ..reply import Event, reply_events
from ..sampling import Sampler
from .protocol import Job, RequestError, TokenLogprob

RETRY_AFTER_S = 2  # what a 503 for a full queue tells the client to wait

log = logging.getLogger("lfm_edge.server")


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
    """The model's engine, shared by all requests, and what they did."""

    def __init__(self, llm: LLM, model_id: str, defaults: dict[str, Any] | None = None, parallel: int = 4,
                 max_queued: int = 16):
        self.llm = llm
        self.model_id = model_id
        if defaults is None:
            from ..commands.common import card_defaults

            defaults = card_defaults(llm)
        make_sampling_params(defaults)
        self.defaults = dict(defaults)
        self.created = int(time.time())
        self.engine = Engine(llm, n_parallel=parallel, max_queued=max_queued, reuse_slots=True)
        self.finished: Counter[str] = Counter()  # generations by finish reason
        self.recent: deque[GenerationStats] = deque(maxlen=64)
        self.closing = threading.Event()
        self._running: set[threading.Event] = set()  # the cancel events of the generations under way
        self._running_lock = threading.Lock()

    @property
    def queued(self) -> int:
        """Requests generating or waiting to."""
        return self.engine.active + self.engine.queued

    def generate(
        self,
        job: Job,
        stats: GenerationStats,
        cancel: threading.Event,
        trace: Trace | None = None,
        abandoned: Callable[[], bool] | None = None,
    ) -> Iterator[Event]:
        """The reply to `job` as events (lfm_edge.reply); stops early when `cancel` is set.
        `abandoned()` is asked before the request is queued: True cancels at once (the client
        left). `trace` collects the token ids and logprobs. A full queue is a RequestError (503)."""
        trace = trace if trace is not None else Trace()
        stats.prompt_tokens = len(job.prompt)
        if self.closing.is_set():
            raise RequestError("the server is shutting down", status=503)
        with self._running_lock:
            self._running.add(cancel)
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
            with self._running_lock:
                self._running.discard(cancel)
            self.record(job, stats)

    def _decode(self, job: Job, stats: GenerationStats, cancel: threading.Event, trace: Trace) -> Iterator[Event]:
        """Generation proper, on the engine. A completion is a raw continuation: all text, no
        reasoning or tool calls."""
        sampler = Sampler(job.sampling, job.constraint)
        if job.logprobs is not None:
            sampler = LoggingSampler(sampler, job.logprobs, trace.logprobs)
        try:
            handle = self.engine.submit(job.prompt, job.max_tokens, sampler, stats=stats, cancel=cancel)
        except QueueFull as e:
            raise RequestError(str(e), code="queue_full", status=503) from None
        except LfmEdgeError as e:  # not expected after the checks of protocol, but a sentence all the same
            raise RequestError(str(e)) from None
        tokens = handle.tokens()
        try:
            yield from reply_events(
                self.llm.tokenizer, self._noted(tokens, trace), job.prompt, job.stop,
                raw=job.kind == "completion", stats=stats,
            )
        except LfmEdgeError as e:
            raise RequestError(str(e)) from None
        finally:
            tokens.close()  # a stop string or a client that left ends the request now
        del trace.logprobs[len(trace.ids):]  # a sampled end token is not part of the reply

    @staticmethod
    def _noted(tokens: Iterator[int], trace: Trace) -> Iterator[int]:
        for t in tokens:
            trace.ids.append(t)
            yield t

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
        """Stop the running generations and refuse new ones."""
        self.closing.set()
        with self._running_lock:
            for cancel in self._running:
                cancel.set()
