"""Per-sequence state: a KV cache for attention layers, a conv state for conv layers."""

from __future__ import annotations

import copy

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
        self.keys[:, start:end] = k.transpose(1, 0, 2)
        self.values[:, start:end] = v.transpose(1, 0, 2)
        return self.keys, self.values


class ConvState:
    """The last L-1 gated inputs (B*x) of one short-conv layer."""

    def __init__(self, kernel_size: int, hidden: int):
        self.window = np.zeros((kernel_size - 1, hidden), dtype=np.float32)  # [L-1, H]


class Cache:
    """Everything one sequence needs to continue: per-layer state and its length."""

    def __init__(self, layers: list[KVCache | ConvState], n_ctx: int):
        self.layers = layers
        self.n_ctx = n_ctx
        self.pos = 0  # tokens consumed so far

    def copy(self) -> Cache:
        return copy.deepcopy(self)

    def checkpoint(self) -> Checkpoint:
        """What it takes to come back to this position later.

        Keys and values past a position are simply overwritten, so rewinding
        attention needs only the position; a conv state is recurrent and must
        be saved. That is [L-1, H] floats per conv layer, a few hundred KB.
        """
        return Checkpoint(self.pos, [s.window.copy() if isinstance(s, ConvState) else None for s in self.layers])

    def restore(self, cp: Checkpoint) -> None:
        for state, window in zip(self.layers, cp.windows):
            if window is not None:
                state.window[...] = window
        self.pos = cp.pos

    def reset(self) -> None:
        for state in self.layers:
            if isinstance(state, ConvState):
                state.window[...] = 0.0
        self.pos = 0


class Checkpoint:
    def __init__(self, pos: int, windows: list[np.ndarray | None]):
        self.pos = pos
        self.windows = windows
