"""Per-sequence state, and the rows of a forward call that runs several sequences at once.

A sequence's Cache is two things: keys and values (KVCache, one per attention layer), written in
place, and a committed record (State: the length and every conv layer's window) that is replaced
whole, never changed. A forward call works on a Batch: it writes keys and values past each
cache's length, where nothing reads them yet, and conv windows into copies; `Batch.commit`
then swaps in each cache's new State in one assignment. A step that does not finish (Ctrl-C,
an error in a kernel) therefore leaves every cache as it was before the step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np


class KVCache:
    """Keys and values of one attention layer, preallocated for n_ctx positions.

    Head-major, [n_kv, n_ctx, d], so that attention streams each KV head's keys
    from one contiguous block; float16 by default (as llama.cpp), which halves
    what a decode step reads at long context, or float32.
    """

    def __init__(self, n_ctx: int, n_kv_heads: int, head_dim: int, dtype: np.dtype = np.float16):
        self.keys = np.zeros((n_kv_heads, n_ctx, head_dim), dtype=dtype)  # [n_kv, n_ctx, d]
        self.values = np.zeros((n_kv_heads, n_ctx, head_dim), dtype=dtype)

    def append(self, start: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v [T, n_kv, d] at positions start.. and return the whole cache (keys, values)."""
        end = start + k.shape[0]
        # a value past float16's range becomes inf, silently: corrupt weights are reported once,
        # as non-finite logits, not as a numpy warning on every step
        with np.errstate(over="ignore", invalid="ignore"):
            self.keys[:, start:end] = k.transpose(1, 0, 2)
            self.values[:, start:end] = v.transpose(1, 0, 2)
        return self.keys, self.values


@dataclass(frozen=True)
class State:
    """What a cache holds, as of its last committed step: never written after it is made, so
    it is its own checkpoint. Keys and values past `pos` are simply overwritten later, so
    rewinding attention needs only the position; conv windows are recurrent and are kept
    whole ([L-1, H] floats per conv layer, a few hundred KB)."""

    pos: int  # tokens consumed
    conv: np.ndarray  # [n_conv_layers, L-1, H]: each conv layer's last L-1 gated inputs (B*x)


Checkpoint = State  # what Cache.checkpoint() returns and Cache.restore() takes


class Cache:
    """Everything one sequence needs to continue: per-layer state and its length."""

    def __init__(self, kv: list[KVCache | None], n_ctx: int, kernel_size: int, hidden: int):
        self.kv = kv  # per layer: an attention layer's KVCache, None for a conv layer
        self.n_ctx = n_ctx
        conv_layers = [i for i, c in enumerate(kv) if c is None]
        self.conv_index = {layer: j for j, layer in enumerate(conv_layers)}  # layer -> row of State.conv
        self._zero = State(0, np.zeros((len(conv_layers), kernel_size - 1, hidden), dtype=np.float32))
        self.state = self._zero

    @property
    def pos(self) -> int:
        return self.state.pos

    @property
    def nbytes(self) -> int:
        """What this sequence holds: every attention layer's keys and values for n_ctx positions,
        and every conv layer's window. (A step's new windows are copies of this size, freed at commit.)"""
        return sum(kv.keys.nbytes + kv.values.nbytes for kv in self.kv if kv is not None) + self.state.conv.nbytes

    def copy(self) -> Cache:
        return copy.deepcopy(self)

    def checkpoint(self) -> Checkpoint:
        """What it takes to come back to this position later (free: states are never changed)."""
        return self.state

    def restore(self, cp: Checkpoint) -> None:
        self.state = cp

    def reset(self) -> None:
        self.state = self._zero


class Batch:
    """The new tokens of several sequences in one forward call, each with its own cache.

    Rows are sequence after sequence: `lengths[i]` tokens of `caches[i]`, at positions
    caches[i].pos onwards. Layers that work along a sequence (short conv, attention) take
    their per-sequence parts from `conv(layer)` and `kv(layer)`; everything else runs over
    all rows at once. Nothing a cache's readers see changes until commit().
    """

    def __init__(self, caches: list[Cache], lengths: list[int]):
        if len(caches) != len(lengths) or len({id(c) for c in caches}) != len(caches):
            raise ValueError("a batch needs one length per cache, and each cache once")
        ends = np.cumsum([0, *lengths])
        self.caches = caches
        self.lengths = list(lengths)
        self.rows = [slice(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]
        self.starts = [c.pos for c in caches]
        for c, start, n in zip(caches, self.starts, lengths):
            if start + n > c.n_ctx:
                raise ValueError(f"{start + n} tokens do not fit a cache of {c.n_ctx}")
        self.positions = np.concatenate([np.arange(s, s + n) for s, n in zip(self.starts, lengths)])  # [T]
        self._conv = [c.state.conv.copy() for c in caches]  # the new windows, written by this call

    def conv(self, layer: int) -> list[tuple[slice, np.ndarray]]:
        """Each sequence's rows and its (new) conv window [L-1, H] of `layer`, updated in place."""
        return [(rows, conv[c.conv_index[layer]]) for rows, conv, c in zip(self.rows, self._conv, self.caches)]

    def conv_states(self, i: int) -> np.ndarray:
        """Sequence i's (new) conv windows of every conv layer [n_conv_layers, L-1, H], updated in place."""
        return self._conv[i]

    def kv(self, layer: int) -> list[tuple[slice, KVCache, int]]:
        """Each sequence's rows, its KVCache of `layer` and the position of its first row."""
        return [(rows, c.kv[layer], start) for rows, c, start in zip(self.rows, self.caches, self.starts)]

    def commit(self) -> None:
        """The step is done: each cache moves on, in one assignment."""
        for c, start, n, conv in zip(self.caches, self.starts, self.lengths, self._conv):
            c.state = State(start + n, conv)
