"""The operations the architecture files are built from.

Each op takes float32 activations (tokens first) and weights as `packed.Linear`
matrices (made once at load) or float32 vectors. The architecture files call
only these functions, so a faster kernel replaces an op here without touching
the model code. Everything heavy runs in the native extension (`native`), on its
thread pool with the GIL released; `reference` holds the numpy twin of each op.

Quantized matrices (every type but F32 / F16 / BF16) multiply int8-quantized activations (blocks of 32, one
float32 scale each); float matrices keep exact float32 activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import native, reference
from .cache import KVCache
from .gguf_file import Tensor
from .packed import Linear


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def linear(x: np.ndarray, w: Linear | Tensor) -> np.ndarray:
    """y = x @ W^T for x [T, K] and a weight W [N, K]; returns [T, N]."""
    if not isinstance(w, Linear):
        return reference.linear(x, w)  # a stored tensor that was never packed
    return native.linear(_f32(x), w.native)


def expert_linear(x: np.ndarray, w: Linear | Tensor, expert: int) -> np.ndarray:
    """`linear` with expert `expert` of a stacked weight W [E, N, K]."""
    if not isinstance(w, Linear):
        return reference.expert_linear(x, w, expert)
    return native.linear(_f32(x), w.native, expert)


def embedding(w: Tensor, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of a stored [V, H] table, as float32 [T, H]."""
    n, k = w.shape
    return native.get_rows(w.data, int(w.qtype), n, k, np.ascontiguousarray(ids, dtype=np.int32))


def to_float(w: Tensor) -> np.ndarray:
    """A small stored tensor (a norm, a bias, a conv kernel) as float32 in its shape."""
    return native.dequantize(w.data, int(w.qtype), w.n_rows, w.n_cols).reshape(w.shape)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * weight."""
    return native.rms_norm(_f32(x), weight, eps)


silu = reference.silu


def swiglu(x: np.ndarray, gate: Linear, up: Linear, down: Linear) -> np.ndarray:
    """down(silu(gate(x)) * up(x)), the FFN of every LFM2 layer.

    Natively this is `moe` with one expert of weight 1 for every token: gate and
    up in one pass over the thread pool, silu and the product in C++.
    """
    if not all(isinstance(w, Linear) and w.n_mats == 1 for w in (gate, up, down)):
        return linear(silu(linear(x, gate)) * linear(x, up), down)
    t = x.shape[0]
    one_expert = np.zeros((t, 1), dtype=np.int32)  # [T, 1]
    return native.moe(_f32(x), one_expert, np.ones((t, 1), dtype=np.float32), gate.native, up.native, down.native)


@dataclass(frozen=True, kw_only=True)
class FeedForwardWeights:
    """The FFN that ends every LFM2 layer, as ConvLayerWeights and AttentionLayerWeights hold it
    (keyword fields, after each layer's own): a dense SwiGLU, or with a router LFM2-MoE's sparse
    MoE, whose gate, up and down are stacks of experts."""

    gate: Linear  # [F, H], or [E, F, H] with a router
    up: Linear  # as gate
    down: Linear  # [H, F], or [E, H, F] with a router
    router: Linear | None = None  # [E, H]
    expert_bias: np.ndarray | None = None  # [E]
    top_k: int = 0
    normalize: bool = True
    scale: float = 1.0

    def native_ffn(self) -> dict | None:
        """The FFN arguments of a native layer (ConvLayer, AttentionLayer), or None when one of its
        matrices was never packed."""
        dense = self.router is None
        matrices = (self.gate, self.up, self.down) + (() if dense else (self.router,))
        if not all(isinstance(m, Linear) for m in matrices) or (dense and self.gate.n_mats != 1):
            return None
        return dict(gate=self.gate.native, up=self.up.native, down=self.down.native,
                    router=None if dense else self.router.native, expert_bias=self.expert_bias, top_k=self.top_k,
                    normalize=self.normalize, scale=self.scale)


@dataclass(frozen=True)
class ConvLayerWeights(FeedForwardWeights):
    """A whole LFM2 layer of a gated short conv and its FFN, for `conv_layer`: its weights, and the
    native layer made from them once at load (None when a matrix was never packed)."""

    operator_norm: np.ndarray  # [H]
    ffn_norm: np.ndarray  # [H]
    eps: float
    in_proj: Linear  # [3H, H]
    kernel: np.ndarray  # [H, L]
    out_proj: Linear  # [H, H]
    native: object = field(init=False, default=None, compare=False)

    def __post_init__(self):
        ffn = self.native_ffn()
        if ffn is not None and all(isinstance(w, Linear) for w in (self.in_proj, self.out_proj)):
            layer = native.ConvLayer(self.operator_norm, self.ffn_norm, self.eps, self.in_proj.native, self.kernel,
                                     self.out_proj.native, **ffn)
            object.__setattr__(self, "native", layer)


def conv_layer(x: np.ndarray, state: np.ndarray, w: ConvLayerWeights) -> np.ndarray:
    """One sequence's tokens x [T, H] through a conv layer and its FFN:
        x = x + out_proj(gated_short_conv(in_proj(rms_norm(x, operator_norm)), state, kernel))
        h = rms_norm(x, ffn_norm)
        x = x + swiglu(h, gate, up, down)                   # dense
        x = x + moe(h, *route(linear(h, router), ...), gate, up, down)   # with a router
    in one native call: the same ops in the same order, so the same bits as calling them one by
    one (reference.conv_layer), without the Python between them, a tenth of a short decode step.
    state [L-1, H] moves on in place."""
    if w.native is None:
        return reference.conv_layer(x, state, w)
    return w.native(_f32(x), state)


@dataclass(frozen=True)
class AttentionLayerWeights(FeedForwardWeights):
    """A whole LFM2 attention layer and its FFN, for `attention_layer`: its weights, and the native
    layer made from them once at load (None when a matrix was never packed)."""

    operator_norm: np.ndarray  # [H]
    ffn_norm: np.ndarray  # [H]
    eps: float
    wq: Linear  # [n_head * d, H]
    wk: Linear  # [n_kv * d, H]
    wv: Linear  # [n_kv * d, H]
    wo: Linear  # [H, n_head * d]
    q_norm: np.ndarray  # [d]
    k_norm: np.ndarray  # [d]
    n_head: int
    rope_base: float
    native: object = field(init=False, default=None, compare=False)

    def __post_init__(self):
        ffn = self.native_ffn()
        if ffn is not None and all(isinstance(w, Linear) for w in (self.wq, self.wk, self.wv, self.wo)):
            layer = native.AttentionLayer(self.operator_norm, self.ffn_norm, self.eps, self.wq.native,
                                          self.wk.native, self.wv.native, self.wo.native, self.q_norm, self.k_norm,
                                          self.n_head, self.rope_base, **ffn)
            object.__setattr__(self, "native", layer)


def attention_layer(x: np.ndarray, cache: KVCache, start: int, w: AttentionLayerWeights) -> np.ndarray:
    """One sequence's tokens x [T, H], at positions start .., through an attention layer and its FFN:
        h = rms_norm(x, operator_norm)
        q, k, v = linear(h, wq), linear(h, wk), linear(h, wv)          # per head: [T, heads, d]
        q, k = rope(rms_norm(q, q_norm), ...), rope(rms_norm(k, k_norm), ...)
        x = x + linear(attention(q, *cache.append(start, k, v), start), wo)
        x = x + the FFN, as conv_layer's
    in one native call with the same bits as the ops one by one (reference.attention_layer); the
    keys and values are written into `cache` as KVCache.append writes them."""
    if w.native is None:
        return reference.attention_layer(x, cache, start, w)
    return w.native(_f32(x), cache.keys, cache.values, start)


@dataclass(frozen=True)
class LayerStack:
    """A model's decoder layers (each a ConvLayerWeights or an AttentionLayerWeights), for
    `decoder_layers`, and the native stack made from them once at load (None when a layer has no
    native form)."""

    layers: tuple  # of ConvLayerWeights | AttentionLayerWeights, in order
    native: object = field(init=False, default=None, compare=False)

    def __post_init__(self):
        if self.layers and all(layer.native is not None for layer in self.layers):
            object.__setattr__(self, "native", native.LayerStack([layer.native for layer in self.layers]))


def decoder_layers(x: np.ndarray, conv_states: np.ndarray, kv: list[KVCache], start: int, stack: LayerStack) -> np.ndarray:
    """One sequence's tokens x [T, H], at positions start .., through all of a model's layers:
    conv_layer and attention_layer in turn, the conv layers' states the rows of conv_states
    [n_conv, L-1, H] (updated in place) and the attention layers' caches kv, in order. One native
    call for a whole decode step's layers, with the same bits as the layers one by one."""
    if stack.native is None:
        return reference.decoder_layers(x, conv_states, kv, start, stack)
    return stack.native(_f32(x), conv_states, [(c.keys, c.values) for c in kv], start)


def short_conv(bx: np.ndarray, state: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Causal depthwise convolution of width L over the sequence, with carried state.

    bx: [T, H] the gated input B*x; state: [L-1, H] the last L-1 inputs before
    this call (zeros at the start), updated in place to the last L-1 inputs
    after it; kernel: [H, L], where kernel[:, L-1] weighs the current token.
    Returns [T, H].
    """
    return native.short_conv(_f32(bx), state, kernel)


def gated_short_conv(bcx: np.ndarray, state: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """C * conv(B * x) in one pass, for bcx [T, 3H] = in_proj's (B, C, x); state and
    kernel as in short_conv. Returns [T, H]."""
    return native.gated_short_conv(_f32(bcx), state, kernel)


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """NeoX-style rotary embedding: the two halves of each head rotate together.

    x: [T, n_heads, head_dim]; positions: [T].
    """
    return native.rope(_f32(x), positions, base)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_start: int) -> np.ndarray:
    """Causal grouped-query attention of T new queries over a KV cache.

    q: [T, n_heads, d], the queries at positions q_start .. q_start+T-1;
    k, v: [n_kv_heads, capacity, d] float32 or float16 (a `KVCache`'s arrays),
    of which the first q_start + T positions are attended to. Returns
    [T, n_heads*d]. The softmax is computed online over tiles of keys: no
    [T, S] score matrix.
    """
    return native.attention(_f32(q), k, v, q_start)


def gated_short_conv_per_sequence(
    bcx: np.ndarray, windows: list[tuple[slice, np.ndarray]], kernel: np.ndarray
) -> np.ndarray:
    """gated_short_conv of several sequences' rows of one batch (cache.Batch.conv): each
    sequence's rows `rows` of bcx [T, 3H] run along its own window. Returns [T, H]."""
    if len(windows) == 1:
        return gated_short_conv(bcx, windows[0][1], kernel)
    return np.concatenate([gated_short_conv(bcx[rows], window, kernel) for rows, window in windows])


def attention_per_sequence(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, caches: list[tuple[slice, KVCache, int]]
) -> np.ndarray:
    """Each sequence's new keys and values [T, n_kv, d] stored in its KVCache, and its
    queries [T, n_heads, d] attending over that cache (cache.Batch.kv: rows, cache, first
    position). Returns [T, n_heads*d]."""
    out = []
    for rows, cache, start in caches:
        keys, values = cache.append(start, k[rows], v[rows])
        out.append(attention(q[rows], keys, values, start))
    return out[0] if len(out) == 1 else np.concatenate(out)


def route(
    logits: np.ndarray, expert_bias: np.ndarray | None, top_k: int, normalize: bool, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid router: which experts each token uses, and with what weight.

    logits: [T, E]. The bias shifts only the choice of experts; the weights
    are the unbiased sigmoid scores of the chosen ones. Returns the expert
    ids [T, k] (best first, ties to the lower id) and their weights [T, k].
    """
    return native.route(_f32(logits), expert_bias, top_k, normalize, scale)


def moe(
    x: np.ndarray, experts: np.ndarray, weights: np.ndarray, gate: Linear, up: Linear, down: Linear
) -> np.ndarray:
    """Sum over each token's chosen experts of weight * SwiGLU_e(x).

    x: [T, H]; experts, weights: [T, k]; gate/up: [E, F, H]; down: [E, H, F].
    One native call: tokens grouped by expert, each expert one matmul over its
    tokens, reading only the chosen experts' weights.
    """
    if not all(isinstance(w, Linear) for w in (gate, up, down)):
        return reference.moe(x, experts, weights, gate, up, down)
    return native.moe(_f32(x), experts, _f32(weights), gate.native, up.native, down.native)
