"""The numpy reference of every op in `ops`: slow, simple, and the yardstick the
native kernels are tested against (tests/test_kernels*.py, tests/test_native_model.py).

Matrix products multiply float32 activations with the exactly dequantized
weights (`native.matmul`, the float32 path), so for quantized files they
differ from `ops`, whose kernels quantize activations to int8.
"""

from __future__ import annotations

import numpy as np

from . import native
from .gguf_file import Tensor
from .packed import Linear


def stored(w: Tensor | Linear) -> Tensor:
    return w.tensor if isinstance(w, Linear) else w


def linear(x: np.ndarray, w: Tensor | Linear) -> np.ndarray:
    """y = x @ W^T for x [T, K] and a stored weight W [N, K]; returns [T, N]."""
    t = stored(w)
    n, k = t.shape
    return native.matmul(np.ascontiguousarray(x, dtype=np.float32), t.data, int(t.qtype), n, k)


def expert_linear(x: np.ndarray, w: Tensor | Linear, expert: int) -> np.ndarray:
    """`linear` with expert `expert` of a stacked weight W [E, N, K]."""
    t = stored(w)
    n_expert, n, k = t.shape
    per_expert = t.nbytes // n_expert
    rows = t.data[expert * per_expert : (expert + 1) * per_expert]
    return native.matmul(np.ascontiguousarray(x, dtype=np.float32), rows, int(t.qtype), n, k)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight."""
    variance = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x / np.sqrt(variance + np.float32(eps))).astype(np.float32) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def swiglu(x: np.ndarray, gate, up, down) -> np.ndarray:
    """down(silu(gate(x)) * up(x)), the FFN of every LFM2 layer."""
    return linear(silu(linear(x, gate)) * linear(x, up), down)


def conv_layer(x: np.ndarray, state: np.ndarray, w) -> np.ndarray:
    """A conv layer and its FFN, dense or (with w.router) a sparse MoE (w: ops.ConvLayerWeights),
    for one sequence's x [T, H]."""
    x = x + linear(gated_short_conv(linear(rms_norm(x, w.operator_norm, w.eps), w.in_proj), state, w.kernel), w.out_proj)
    return feed_forward_block(x, w)


def attention_layer(x: np.ndarray, cache, start: int, w) -> np.ndarray:
    """An attention layer and its FFN (w: ops.AttentionLayerWeights), for one sequence's x [T, H] at
    positions start ..; their keys and values go into `cache` (a KVCache)."""
    t, d = x.shape[0], w.q_norm.size
    h = rms_norm(x, w.operator_norm, w.eps)
    q, k, v = (linear(h, m).reshape(t, -1, d) for m in (w.wq, w.wk, w.wv))
    positions = np.arange(start, start + t)
    q = rope(rms_norm(q, w.q_norm, w.eps), positions, w.rope_base)
    k = rope(rms_norm(k, w.k_norm, w.eps), positions, w.rope_base)
    keys, values = cache.append(start, k, v)
    x = x + linear(attention(q, keys, values, start), w.wo)
    return feed_forward_block(x, w)


def decoder_layers(x: np.ndarray, conv_states: np.ndarray, kv: list, start: int, stack) -> np.ndarray:
    """All of a model's layers (stack: ops.LayerStack) for one sequence's x [T, H] at positions start ..:
    the conv layers on the rows of conv_states in turn, the attention layers on the caches kv."""
    convs, caches = iter(conv_states), iter(kv)
    for layer in stack.layers:
        if hasattr(layer, "kernel"):  # a ConvLayerWeights
            x = conv_layer(x, next(convs), layer)
        else:
            x = attention_layer(x, next(caches), start, layer)
    return x


def feed_forward_block(x: np.ndarray, w) -> np.ndarray:
    """x + the layer's FFN of rms_norm(x, w.ffn_norm): a dense SwiGLU, or with w.router a sparse MoE."""
    h = rms_norm(x, w.ffn_norm, w.eps)
    if w.router is None:
        return x + swiglu(h, w.gate, w.up, w.down)
    experts, weights = route(linear(h, w.router), w.expert_bias, w.top_k, w.normalize, w.scale)
    return x + moe(h, experts, weights, w.gate, w.up, w.down)


def short_conv(bx: np.ndarray, state: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Causal depthwise convolution of width L over the sequence, with carried state.

    bx: [T, H] the gated input B*x; state: [L-1, H] the last L-1 inputs before
    this call (zeros at the start), updated in place to the last L-1 inputs
    after it; kernel: [H, L], where kernel[:, L-1] weighs the current token.
    Returns [T, H].
    """
    t = bx.shape[0]
    width = kernel.shape[1]
    window = np.concatenate([state, bx], axis=0)  # [L-1+T, H]
    y = np.zeros_like(bx)
    for j in range(width):
        y += window[j : j + t] * kernel[:, j]
    state[...] = window[t:]
    return y


def gated_short_conv(bcx: np.ndarray, state: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """C * conv(B * x) for bcx [T, 3H] = (B, C, x); state and kernel as in short_conv."""
    b, c, x = np.split(bcx, 3, axis=-1)  # each [T, H]
    return c * short_conv(b * x, state, kernel)


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """NeoX-style rotary embedding: the two halves of each head rotate together.

    x: [T, n_heads, head_dim]; positions: [T].
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # [T, half]
    cos = np.cos(angles).astype(np.float32)[:, None, :]
    sin = np.sin(angles).astype(np.float32)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_start: int) -> np.ndarray:
    """Causal grouped-query attention of T new queries over a KV cache.

    q: [T, n_heads, d], the queries at positions q_start .. q_start+T-1;
    k, v: [n_kv_heads, capacity, d] (float32 or float16), of which the first
    S = q_start + T positions are attended to. Returns [T, n_heads*d].
    """
    t, n_heads, d = q.shape
    n_kv = k.shape[0]
    s = q_start + t
    dtype = np.result_type(q.dtype, np.float32)
    k, v = k[:, :s].astype(dtype), v[:, :s].astype(dtype)  # [n_kv, S, d]
    group = n_heads // n_kv
    out = np.empty((t, n_heads, d), dtype=np.float32)
    # key j is visible to query i when j <= q_start + i
    mask = np.arange(s)[None, :] > (q_start + np.arange(t))[:, None]  # [T, S]
    scale = np.float32(1.0 / np.sqrt(d))
    for h in range(n_kv):
        qh = q[:, h * group : (h + 1) * group, :]  # [T, G, d]
        scores = np.einsum("tgd,sd->gts", qh, k[h]) * scale  # [G, T, S]
        scores[:, mask] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[:, h * group : (h + 1) * group, :] = np.einsum("gts,sd->tgd", p, v[h])
    return out.reshape(t, n_heads * d)


def route(
    logits: np.ndarray, expert_bias: np.ndarray | None, top_k: int, normalize: bool, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid router: which experts each token uses, and with what weight.

    logits: [T, E]. The bias shifts only the choice of experts; the weights
    are the unbiased sigmoid scores of the chosen ones. Returns the expert
    ids [T, k] (best first) and their weights [T, k].
    """
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))  # [T, E]
    choice = scores if expert_bias is None else scores + expert_bias
    # stable argsort on the negated scores: ties go to the lower expert id, as torch.topk does on CPU
    experts = np.argsort(-choice, axis=-1, kind="stable")[:, :top_k]  # [T, k]
    weights = np.take_along_axis(scores, experts, axis=-1)
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + np.float32(1e-6))
    return experts, (weights * np.float32(scale)).astype(np.float32)


def moe(x: np.ndarray, experts: np.ndarray, weights: np.ndarray, gate, up, down) -> np.ndarray:
    """Sum over each token's chosen experts of weight * SwiGLU_e(x).

    x: [T, H]; experts, weights: [T, k]; gate/up: [E, F, H]; down: [E, H, F].
    Only the chosen experts' weights are read: tokens are grouped by expert.
    """
    out = np.zeros_like(x)
    for e in np.unique(experts):
        tokens, slot = np.nonzero(experts == e)
        xe = x[tokens]
        h = silu(expert_linear(xe, gate, int(e))) * expert_linear(xe, up, int(e))
        out[tokens] += expert_linear(h, down, int(e)) * weights[tokens, slot][:, None]
    return out


# The ops a model calls that have a reference here; tests swap them into `ops`.
OPS = ("linear", "expert_linear", "rms_norm", "silu", "swiglu", "short_conv", "gated_short_conv",
       "rope", "attention", "route", "moe", "conv_layer", "attention_layer", "decoder_layers")
