"""LFM2-MoE (LFM2-8B-A1B, LFM2.5-8B-A1B, LFM2-24B-A2B): LFM2 with sparse MoE FFNs.

Reads like transformers' `modeling_lfm2_moe.py`: the first
`num_dense_layers` layers keep a dense SwiGLU, the rest route each token to
the top-k of E SwiGLU experts with a sigmoid router. GGUF arch `lfm2moe`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import ops
from ..gguf_file import GGUFFile
from . import lfm2

SIGMOID_GATING = 2  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


@dataclass(frozen=True)
class ModelArgs(lfm2.ModelArgs):
    n_expert: int = 0
    n_expert_used: int = 0
    expert_ffn_dim: int = 0
    n_dense_layers: int = 0
    normalize_expert_weights: bool = True
    expert_weights_scale: float = 1.0  # transformers' routed_scaling_factor

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelArgs:
        a = f.arch
        gating = f.get(f"{a}.expert_gating_func", int, SIGMOID_GATING)
        if gating != SIGMOID_GATING:
            raise f.error(f"{a}.expert_gating_func = {gating} is not the sigmoid router LFM2-MoE uses")
        # llama.cpp writes neither of the last two keys for lfm2moe and assumes
        # normalised, unscaled weights, which is what the published models use
        scale = f.get(f"{a}.expert_weights_scale", float, 1.0)
        args = super().from_gguf(
            f,
            n_expert=f.get(f"{a}.expert_count", int),
            n_expert_used=f.get(f"{a}.expert_used_count", int),
            expert_ffn_dim=f.get(f"{a}.expert_feed_forward_length", int),
            n_dense_layers=f.get(f"{a}.leading_dense_block_count", int, 0),
            normalize_expert_weights=f.get(f"{a}.expert_weights_norm", bool, True),
            expert_weights_scale=scale if scale != 0.0 else 1.0,
        )
        if not 0 < args.n_expert_used <= args.n_expert:
            raise f.error(f"{a}.expert_used_count = {args.n_expert_used} is not within 1..{args.n_expert}")
        return args


class SparseMoE:
    """Sigmoid-routed top-k mixture of SwiGLU experts."""

    def __init__(self, args: ModelArgs, w: lfm2.Weights, i: int):
        h, e, f = args.hidden, args.n_expert, args.expert_ffn_dim
        self.top_k = args.n_expert_used
        self.normalize = args.normalize_expert_weights
        self.scale = args.expert_weights_scale
        self.router = w.linear(f"blk.{i}.ffn_gate_inp.weight", (e, h))
        # expert_bias only picks the top-k; it never weighs the outputs
        self.expert_bias = w.vector(f"blk.{i}.exp_probs_b.bias", (e,))
        self.gate, self.up = w.gate_up(f"blk.{i}.ffn_gate_exps.weight", f"blk.{i}.ffn_up_exps.weight", (e, f, h))
        self.down = w.linear(f"blk.{i}.ffn_down_exps.weight", (e, h, f))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        logits = ops.linear(x, self.router)  # [T, E]
        experts, weights = ops.route(logits, self.expert_bias, self.top_k, self.normalize, self.scale)
        return ops.moe(x, experts, weights, self.gate, self.up, self.down)

    def layer_weights(self) -> dict:
        """This FFN's part of an ops.ConvLayerWeights or ops.AttentionLayerWeights."""
        return dict(gate=self.gate, up=self.up, down=self.down, router=self.router, expert_bias=self.expert_bias,
                    top_k=self.top_k, normalize=self.normalize, scale=self.scale)


class Model(lfm2.Model):
    def feed_forward(self, args: ModelArgs, w: lfm2.Weights, i: int):
        return lfm2.MLP(args, w, i) if i < args.n_dense_layers else SparseMoE(args, w, i)
