"""Choosing the next token from logits.

The steps and their order are transformers' (repetition penalty, then
temperature, top-k, top-p, min-p), each matching its logits processor;
llama.cpp's samplers of the same names compute the same filters. Temperature
0 is greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from .errors import LfmEdgeError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.3
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at; -1: all
    seed: int | None = None

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            integral = "int" in str(f.type)
            if value is None and f.name == "seed":
                continue
            whole = isinstance(value, int) or isinstance(value, float) and value.is_integer()  # (float(10**400) overflows)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (integral and not whole):
                kind = "an integer" if integral else "a number"
                raise LfmEdgeError(f"{f.name} must be {kind}, got {value!r}")
            if integral:
                object.__setattr__(self, f.name, int(value))
        if self.seed is not None and self.seed < 0:
            raise LfmEdgeError(f"seed must be >= 0, got {self.seed}")
        if not (self.temperature >= 0):
            raise LfmEdgeError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LfmEdgeError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LfmEdgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise LfmEdgeError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise LfmEdgeError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.repeat_last_n < -1:
            raise LfmEdgeError(f"repeat_last_n must be >= -1, got {self.repeat_last_n}")

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """Make tokens already seen less likely: positive logits divided, negative multiplied."""
    if penalty == 1.0 or not len(history):
        return logits
    ids = np.unique(np.asarray(history, dtype=np.int64))
    seen = logits[ids]
    logits = logits.copy()
    logits[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - np.max(logits))
    return z / z.sum()


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the most likely tokens whose probabilities add up to at least p."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, kind="stable")  # ascending, as transformers sorts
    cumulative = np.cumsum(softmax(logits[order]))
    drop = cumulative <= 1.0 - p
    drop[-1] = False  # always keep the most likely token
    out = logits.copy()
    out[order[drop]] = -np.inf
    return out


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens less likely than min_p times the most likely one."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)
    return np.where(probs < min_p * probs.max(), -np.inf, logits)


class Constraint(Protocol):
    """What a sequence may write next (lfm_edge.grammar.Constraint is one)."""

    def mask(self, logits: np.ndarray) -> np.ndarray: ...  # forbidden tokens to -inf, in place
    def advance(self, token: int) -> None: ...  # the token chosen
    def is_done(self) -> bool: ...  # complete: nothing but an end-of-generation token may follow


class Sampler:
    """One sequence's sampler: its parameters, its random state, and the constraint its
    reply follows, if any (applied before temperature and the filters, so they only
    ever see allowed tokens)."""

    def __init__(self, params: SamplingParams, constraint: Constraint | None = None):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.constraint = constraint

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """The next token for logits [V], given the ids so far."""
        token = self._choose(logits, history)
        if self.constraint is not None:
            self.constraint.advance(token)
        return token

    def is_done(self) -> bool:
        """The constraint is complete: end the reply without another step."""
        return self.constraint is not None and self.constraint.is_done()

    def _choose(self, logits: np.ndarray, history: Sequence[int]) -> int:
        p = self.params
        window = history if p.repeat_last_n == -1 else history[len(history) - p.repeat_last_n :] if p.repeat_last_n else []
        logits = logits.astype(np.float32)  # a copy: the caller's logits stay as they are
        logits = apply_repetition_penalty(logits, window, p.repetition_penalty)
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64) / p.temperature  # float64: finite float32 logits stay finite (no inf - inf = NaN)
        logits = min_p_filter(top_p_filter(top_k_filter(logits, p.top_k), p.top_p), p.min_p)
        probs = softmax(logits.astype(np.float64))
        return int(self.rng.choice(probs.size, p=probs))
