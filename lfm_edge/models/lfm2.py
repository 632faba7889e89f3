"""LFM2 (dense): gated short-conv and GQA attention layers, SwiGLU FFN.

Reads like transformers' `modeling_lfm2.py`; tensor and metadata names are
llama.cpp's (`lfm2` in GGUF). The blocks here are shared with `lfm2_moe.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import ops
from ..cache import Batch, Cache, KVCache
from ..gguf_file import GGUFFile, Tensor
from ..packed import Linear
from ..weight_cache import WeightCache


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    n_layer: int
    hidden: int
    n_vocab: int
    n_ctx_train: int
    n_head: int
    n_kv_heads: tuple[int, ...]  # per layer; 0 marks a short-conv layer
    head_dim: int
    norm_eps: float
    rope_base: float
    conv_kernel: int  # L: the conv sees the current token and L-1 before it
    ffn_dim: int  # dense SwiGLU width

    @classmethod
    def from_gguf(cls, f: GGUFFile, **extra) -> ModelArgs:
        a = f.arch
        n_layer = f.get(f"{a}.block_count", int)
        hidden = f.get(f"{a}.embedding_length", int)
        n_head = f.get(f"{a}.attention.head_count", int)
        kv = f.get(f"{a}.attention.head_count_kv", (int, list))
        n_kv_heads = tuple(kv) if isinstance(kv, list) else (kv,) * n_layer
        if len(n_kv_heads) != n_layer:
            raise f.error(f"{a}.attention.head_count_kv has {len(n_kv_heads)} entries for {n_layer} layers")
        if n_head <= 0 or hidden % n_head:
            raise f.error(f"{a}.attention.head_count = {n_head} does not divide the hidden size {hidden}")
        if any(h and (h < 0 or n_head % h) for h in n_kv_heads):
            raise f.error(f"{a}.attention.head_count_kv {list(n_kv_heads)} must divide head_count {n_head}")
        embd = f.tensors.get("token_embd.weight")
        n_vocab = f.get(f"{a}.vocab_size", int, embd.shape[0] if embd is not None else 0)
        return cls(
            arch=a,
            n_layer=n_layer,
            hidden=hidden,
            n_vocab=n_vocab,
            n_ctx_train=f.get(f"{a}.context_length", int),
            n_head=n_head,
            n_kv_heads=n_kv_heads,
            head_dim=f.get(f"{a}.attention.key_length", int, hidden // n_head),
            norm_eps=f.get(f"{a}.attention.layer_norm_rms_epsilon", float),
            rope_base=f.get(f"{a}.rope.freq_base", float, 10000.0),
            conv_kernel=f.get(f"{a}.shortconv.l_cache", int),
            ffn_dim=f.get(f"{a}.feed_forward_length", int),
            **extra,
        )

    def is_attention(self, layer: int) -> bool:
        return self.n_kv_heads[layer] > 0


class Weights:
    """Looks up a model's tensors, checking each against the shape it must have."""

    def __init__(self, f: GGUFFile, cache: WeightCache | None = None):
        self.file = f
        self.used: set[str] = set()  # the names asked for: a file must hold no others
        self.cache = cache  # packed matrices saved by an earlier load, if any
        self.matrices: list[Linear] = []

    def get(self, name: str, shape: tuple[int, ...]) -> Tensor:
        self.used.add(name)
        t = self.file.tensors.get(name)
        if t is None:
            raise self.file.error(f"tensor {name} is missing")
        if t.shape != shape:
            raise self.file.error(
                f"tensor {name} has shape {list(t.shape)} but the metadata implies {list(shape)}"
            )
        return t

    def optional(self, name: str, shape: tuple[int, ...]) -> Tensor | None:
        return self.get(name, shape) if name in self.file.tensors else None

    def has(self, name: str) -> bool:
        return name in self.file.tensors

    def linear(self, name: str, shape: tuple[int, ...]) -> Linear:
        """A weight matrix, repacked once here for the kernels (see `packed`)."""
        return self._linear(self.get(name, shape))

    def vector(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return ops.to_float(self.get(name, shape))

    def gate_up(self, gate: str, up: str, shape: tuple[int, ...]) -> tuple[Linear, Linear]:
        """A SwiGLU's gate and up matrices; the fused kernel reads both in one pass, so they
        must share a type (llama.cpp's quantizer always writes them alike)."""
        g, u = self.get(gate, shape), self.get(up, shape)
        if g.qtype != u.qtype:
            raise self.file.error(
                f"tensors {gate} ({g.qtype.name}) and {up} ({u.qtype.name}) must have the same type"
            )
        return self._linear(g), self._linear(u)

    def _linear(self, t: Tensor) -> Linear:
        linear = Linear(t, self.cache.get(t) if self.cache else None)
        self.matrices.append(linear)
        return linear


class ShortConv:
    """Gated short conv: in_proj -> (B, C, x); y = C * conv(B * x); out_proj."""

    def __init__(self, args: ModelArgs, w: Weights, i: int):
        h = args.hidden
        self.layer = i
        self.kernel = w.vector(f"blk.{i}.shortconv.conv.weight", (h, args.conv_kernel))  # [H, L]
        self.in_proj = w.linear(f"blk.{i}.shortconv.in_proj.weight", (3 * h, h))
        self.out_proj = w.linear(f"blk.{i}.shortconv.out_proj.weight", (h, h))

    def __call__(self, x: np.ndarray, batch: Batch) -> np.ndarray:
        bcx = ops.linear(x, self.in_proj)  # [T, 3H]: B, C, x side by side
        # the conv runs along each sequence's own tokens, from its own window
        y = ops.gated_short_conv_per_sequence(bcx, batch.conv(self.layer), self.kernel)  # [T, H]
        return ops.linear(y, self.out_proj)


class Attention:
    """GQA with per-head RMSNorm on q and k, NeoX RoPE, causal softmax."""

    def __init__(self, args: ModelArgs, w: Weights, i: int):
        d, h = args.head_dim, args.hidden
        self.layer = i
        self.n_head, self.n_kv, self.head_dim = args.n_head, args.n_kv_heads[i], d
        self.eps, self.rope_base = args.norm_eps, args.rope_base
        self.wq = w.linear(f"blk.{i}.attn_q.weight", (self.n_head * d, h))
        self.wk = w.linear(f"blk.{i}.attn_k.weight", (self.n_kv * d, h))
        self.wv = w.linear(f"blk.{i}.attn_v.weight", (self.n_kv * d, h))
        self.wo = w.linear(f"blk.{i}.attn_output.weight", (h, self.n_head * d))
        self.q_norm = w.vector(f"blk.{i}.attn_q_norm.weight", (d,))
        self.k_norm = w.vector(f"blk.{i}.attn_k_norm.weight", (d,))

    def __call__(self, x: np.ndarray, batch: Batch) -> np.ndarray:
        t = x.shape[0]
        q = ops.linear(x, self.wq).reshape(t, self.n_head, self.head_dim)
        k = ops.linear(x, self.wk).reshape(t, self.n_kv, self.head_dim)
        v = ops.linear(x, self.wv).reshape(t, self.n_kv, self.head_dim)
        q = ops.rope(ops.rms_norm(q, self.q_norm, self.eps), batch.positions, self.rope_base)
        k = ops.rope(ops.rms_norm(k, self.k_norm, self.eps), batch.positions, self.rope_base)
        # each sequence attends over its own cache
        return ops.linear(ops.attention_per_sequence(q, k, v, batch.kv(self.layer)), self.wo)


class MLP:
    """Dense SwiGLU: w2(silu(w1 x) * w3 x), stored as ffn_gate/ffn_up/ffn_down."""

    def __init__(self, args: ModelArgs, w: Weights, i: int):
        h, f = args.hidden, args.ffn_dim
        self.gate, self.up = w.gate_up(f"blk.{i}.ffn_gate.weight", f"blk.{i}.ffn_up.weight", (f, h))
        self.down = w.linear(f"blk.{i}.ffn_down.weight", (h, f))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ops.swiglu(x, self.gate, self.up, self.down)

    def layer_weights(self) -> dict:
        """This FFN's part of an ops.ConvLayerWeights or ops.AttentionLayerWeights."""
        return dict(gate=self.gate, up=self.up, down=self.down)


class DecoderLayer:
    """Pre-norm residual layer: operator (conv or attention), then the FFN."""

    def __init__(self, args: ModelArgs, w: Weights, i: int, feed_forward):
        self.eps = args.norm_eps
        self.operator_norm = w.vector(f"blk.{i}.attn_norm.weight", (args.hidden,))
        self.ffn_norm = w.vector(f"blk.{i}.ffn_norm.weight", (args.hidden,))
        self.operator = Attention(args, w, i) if args.is_attention(i) else ShortConv(args, w, i)
        self.feed_forward = feed_forward
        # Each layer also runs as one op (one native call: ops.conv_layer, ops.attention_layer),
        # which __call__ below spells out op by op with the same bits (tests/test_native_model.py).
        ffn = feed_forward.layer_weights()
        op = self.operator
        self.conv_layer = self.attention_layer = None
        if isinstance(op, ShortConv):
            self.conv_layer = ops.ConvLayerWeights(self.operator_norm, self.ffn_norm, self.eps, op.in_proj,
                                                   op.kernel, op.out_proj, **ffn)
        else:
            self.attention_layer = ops.AttentionLayerWeights(self.operator_norm, self.ffn_norm, self.eps, op.wq, op.wk,
                                                             op.wv, op.wo, op.q_norm, op.k_norm, op.n_head,
                                                             op.rope_base, **ffn)

    def __call__(self, x: np.ndarray, batch: Batch) -> np.ndarray:
        # one sequence: the whole layer in one op (several: each its own conv window or cache, below)
        if self.conv_layer is not None:
            windows = batch.conv(self.operator.layer)
            if len(windows) == 1:
                return ops.conv_layer(x, windows[0][1], self.conv_layer)
        if self.attention_layer is not None:
            caches = batch.kv(self.operator.layer)
            if len(caches) == 1:
                _, cache, start = caches[0]
                return ops.attention_layer(x, cache, start, self.attention_layer)
        x = x + self.operator(ops.rms_norm(x, self.operator_norm, self.eps), batch)
        return x + self.feed_forward(ops.rms_norm(x, self.ffn_norm, self.eps))


class Model:
    """Embedding, the decoder layers, the final norm and the (usually tied) output head."""

    def __init__(self, args: ModelArgs, w: Weights):
        self.args = args
        h, v = args.hidden, args.n_vocab
        self.embed = w.get("token_embd.weight", (v, h))
        # llama.cpp stores LFM2's final norm (`embedding_norm`) as token_embd_norm
        self.norm = w.vector("token_embd_norm.weight", (h,))
        # tied embeddings: without output.weight the head reuses token_embd
        self.output = w.linear("output.weight" if w.has("output.weight") else "token_embd.weight", (v, h))
        self.layers = [DecoderLayer(args, w, i, self.feed_forward(args, w, i)) for i in range(args.n_layer)]
        # A sequence's tokens also run through every layer in one op (ops.decoder_layers: one native
        # call), which forward() spells out layer by layer with the same bits; None runs them so
        # (as when a layer has no native form: the others then still run natively).
        stack = ops.LayerStack(tuple(layer.conv_layer or layer.attention_layer for layer in self.layers))
        self.layer_stack = stack if stack.native is not None else None
        self.matrices = list(w.matrices)  # every weight matrix, in the order asked for (the weight cache's)

    def feed_forward(self, args: ModelArgs, w: Weights, i: int):
        return MLP(args, w, i)

    def make_cache(self, n_ctx: int, kv_dtype: type = np.float16) -> Cache:
        a = self.args
        kv = [KVCache(n_ctx, a.n_kv_heads[i], a.head_dim, kv_dtype) if a.is_attention(i) else None for i in range(a.n_layer)]
        return Cache(kv, n_ctx, a.conv_kernel, a.hidden)

    def forward(self, ids: np.ndarray, batch: Batch, logit_rows: np.ndarray | None = None) -> np.ndarray:
        """Run the tokens `ids` [T] of a batch's sequences; returns the logits of rows
        `logit_rows` (all rows if None), [len(logit_rows), V]. The caches move on only
        when the caller commits the batch."""
        x = ops.embedding(self.embed, ids)  # [T, H]
        if self.layer_stack is not None and len(batch.caches) == 1:
            cache = batch.caches[0]
            kv = [c for c in cache.kv if c is not None]
            x = ops.decoder_layers(x, batch.conv_states(0), kv, batch.starts[0], self.layer_stack)
        else:
            for layer in self.layers:
                x = layer(x, batch)
        if logit_rows is not None:
            x = x[logit_rows]
        return ops.linear(ops.rms_norm(x, self.norm, self.args.norm_eps), self.output)

    def __call__(self, ids: np.ndarray, cache: Cache, all_logits: bool = True) -> np.ndarray:
        """Run tokens `ids` [T] after what `cache` holds; returns logits [T, V] (or [1, V])."""
        batch = Batch([cache], [len(ids)])
        logits = self.forward(ids, batch, None if all_logits else np.array([len(ids) - 1]))
        batch.commit()
        return logits
