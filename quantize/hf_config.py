"""What a Hugging Face LFM2 / LFM2-MoE config.json means, by transformers' rules.

Published config.json files come in several forms: the original LFM2 release
(`block_*` keys, `full_attn_idxs`, no `layer_types`, no `intermediate_size`,
`tie_embedding`), later ones with both forms, and transformers 5's
(`layer_types`, `rope_parameters`, `tie_word_embeddings`). `read_config`
turns any of them into one `ModelConfig`, applying exactly what
transformers 5 does (`Lfm2Config.__post_init__`, `Lfm2MLP`,
`Lfm2MoeConfig`, `PreTrainedConfig.convert_rope_params_to_dict`), with
transformers' defaults for missing keys. A config that transformers would
load into something llama.cpp's format cannot hold, or whose keys contradict
each other, raises LfmEdgeError with one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lfm_edge.errors import LfmEdgeError

ARCH = {"lfm2": "lfm2", "lfm2_moe": "lfm2moe"}
LAYER_TYPES = ("conv", "full_attention")

# transformers 5's defaults (Lfm2Config / Lfm2MoeConfig class attributes)
DEFAULTS: dict[str, dict[str, Any]] = {
    "lfm2": {"vocab_size": 65536, "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 32},
    "lfm2_moe": {"vocab_size": 65536, "hidden_size": 2048, "intermediate_size": 7168, "num_hidden_layers": 32},
}
COMMON_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 128_000,
    "norm_eps": 1e-5,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": True,
    "conv_bias": False,
    "conv_L_cache": 3,
}
MOE_DEFAULTS: dict[str, Any] = {
    "moe_intermediate_size": 1792,
    "num_dense_layers": 2,
    "num_experts_per_tok": 4,
    "num_experts": 32,
    "use_expert_bias": True,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": True,
}
DEFAULT_ROPE_THETA = 1_000_000.0  # Lfm2Config.default_theta, Lfm2MoeConfig.default_theta


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # "lfm2" | "lfm2_moe"
    arch: str  # GGUF architecture: "lfm2" | "lfm2moe"
    n_layer: int
    hidden: int
    n_head: int
    n_head_kv: int
    layer_types: tuple[str, ...]  # "conv" | "full_attention", one per layer
    ff_dense: int  # width of the dense SwiGLU layers (after LFM2's auto-adjust)
    n_vocab: int
    n_ctx: int
    norm_eps: float
    rope_theta: float
    conv_L_cache: int
    tied: bool  # the output head is the embedding matrix
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    # LFM2-MoE only (0 / defaults for dense LFM2)
    n_expert: int = 0
    n_expert_used: int = 0
    ff_expert: int = 0
    n_dense_layers: int = 0
    use_expert_bias: bool = True
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    @property
    def moe(self) -> bool:
        return self.model_type == "lfm2_moe"

    def is_attention(self, layer: int) -> bool:
        return self.layer_types[layer] != "conv"  # transformers' test (Lfm2DecoderLayer)

    def is_dense(self, layer: int) -> bool:
        """The layer's FFN is one SwiGLU (all of LFM2's; LFM2-MoE's first n_dense_layers)."""
        return not self.moe or layer < self.n_dense_layers


def auto_adjusted_ff_dim(ff: int, auto_adjust: bool, multiplier: float | None, multiple_of: int) -> int:
    """transformers' Lfm2MLP width: 2/3 of block_ff_dim, scaled, rounded up to multiple_of.

    (llama.cpp's converter rounds even when the multiplier is None; transformers, whose
    weights these are, does not.)
    """
    if not auto_adjust:
        return ff
    ff = int(2 * ff / 3)
    if multiplier is not None:
        ff = int(multiplier * ff)
        ff = multiple_of * ((ff + multiple_of - 1) // multiple_of)
    return ff


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def read_layer_types(cfg: dict, model_type: str, n_layer: int, where: str) -> tuple[str, ...]:
    layer_types = cfg.get("layer_types")
    idxs = cfg.get("full_attn_idxs")
    if idxs is not None:
        if not isinstance(idxs, list) or not all(isinstance(i, int) and 0 <= i < n_layer for i in idxs):
            raise LfmEdgeError(f"{where}: full_attn_idxs must list layer numbers 0..{n_layer - 1}, got {idxs!r}")
    if layer_types is None:
        if model_type == "lfm2_moe":
            # Lfm2MoeConfig has no full_attn_idxs rule: transformers cannot build this model
            raise LfmEdgeError(f"{where}: an lfm2_moe config needs layer_types (one 'conv' or 'full_attention' per layer)")
        # Lfm2Config: full_attn_idxs names the attention layers; neither key means every layer is attention
        attn = set(idxs) if idxs is not None else set(range(n_layer))
        return tuple("full_attention" if i in attn else "conv" for i in range(n_layer))
    if not isinstance(layer_types, list) or len(layer_types) != n_layer:
        raise LfmEdgeError(f"{where}: layer_types must list the type of each of the {n_layer} layers (num_hidden_layers)")
    unknown = sorted({t for t in layer_types if t not in LAYER_TYPES}, key=str)
    if unknown:
        raise LfmEdgeError(f"{where}: layer type {unknown[0]!r} is not supported (expected 'conv' or 'full_attention')")
    if idxs is not None and sorted(idxs) != [i for i, t in enumerate(layer_types) if t == "full_attention"]:
        raise LfmEdgeError(f"{where}: full_attn_idxs {sorted(idxs)} and layer_types name different attention layers")
    return tuple(layer_types)


def read_rope_theta(cfg: dict, where: str) -> float:
    """rope_parameters (transformers 5) or rope_scaling (older) first, then top-level rope_theta."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise LfmEdgeError(f"{where}: rope_parameters must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise LfmEdgeError(f"{where}: per-layer-type rope_parameters are not supported (LFM2 has one RoPE)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise LfmEdgeError(f"{where}: rope_type {rope_type!r} is not supported (LFM2 uses plain RoPE, 'default')")
    theta = params.get("rope_theta", cfg.get("rope_theta", DEFAULT_ROPE_THETA))
    return float(theta)


def read_config(cfg: dict, where: str = "config.json") -> ModelConfig:
    """The model `cfg` (a parsed config.json) describes; `where` names it in errors."""
    model_type = cfg.get("model_type")
    if model_type not in ARCH:
        raise LfmEdgeError(f"{where}: model_type {model_type!r} is not supported (expected lfm2 or lfm2_moe)")
    c = {**COMMON_DEFAULTS, **DEFAULTS[model_type], **(MOE_DEFAULTS if model_type == "lfm2_moe" else {})}
    c.update({k: v for k, v in cfg.items() if v is not None or k.endswith("_token_id")})
    n_layer = int(c["num_hidden_layers"])
    hidden = int(c["hidden_size"])
    n_head, n_head_kv = int(c["num_attention_heads"]), int(c["num_key_value_heads"])
    if n_layer < 1 or hidden < 1 or n_head < 1 or n_head_kv < 1:
        raise LfmEdgeError(f"{where}: num_hidden_layers, hidden_size and the head counts must be positive")
    if hidden % n_head or n_head % n_head_kv:
        raise LfmEdgeError(
            f"{where}: {n_head} attention heads do not divide hidden_size {hidden}, "
            f"or {n_head_kv} key/value heads do not divide {n_head}")
    layer_types = read_layer_types(cfg, model_type, n_layer, where)
    if c["conv_bias"]:
        raise LfmEdgeError(f"{where}: conv_bias = true is not supported (the GGUF layout has no conv biases)")
    # Lfm2Config / Lfm2MoeConfig: tie_embedding, when present, overrides tie_word_embeddings
    tied = bool(cfg.get("tie_embedding", c["tie_word_embeddings"]))
    if model_type == "lfm2":
        # Lfm2Config: block_ff_dim, when present, overrides intermediate_size
        ff = cfg.get("block_ff_dim", c["intermediate_size"])
        if "block_ff_dim" in cfg and "intermediate_size" in cfg and cfg["block_ff_dim"] != cfg["intermediate_size"]:
            raise LfmEdgeError(f"{where}: block_ff_dim {cfg['block_ff_dim']} and intermediate_size "
                               f"{cfg['intermediate_size']} disagree")
        ff_dense = auto_adjusted_ff_dim(
            int(ff),
            bool(cfg.get("block_auto_adjust_ff_dim", True)),
            cfg.get("block_ffn_dim_multiplier", 1.0),
            int(cfg.get("block_multiple_of", 256)),
        )
    else:
        ff_dense = int(c["intermediate_size"])
    common = dict(
        model_type=model_type,
        arch=ARCH[model_type],
        n_layer=n_layer,
        hidden=hidden,
        n_head=n_head,
        n_head_kv=n_head_kv,
        layer_types=layer_types,
        ff_dense=ff_dense,
        n_vocab=int(c["vocab_size"]),
        n_ctx=int(c["max_position_embeddings"]),
        norm_eps=float(c["norm_eps"]),
        rope_theta=read_rope_theta(cfg, where),
        conv_L_cache=int(c["conv_L_cache"]),
        tied=tied,
        bos_id=_first_id(c["bos_token_id"]),
        eos_id=_first_id(c["eos_token_id"]),
        pad_id=_first_id(c["pad_token_id"]),
    )
    if model_type == "lfm2":
        return ModelConfig(**common)
    n_expert, n_used = int(c["num_experts"]), int(c["num_experts_per_tok"])
    n_dense = int(c["num_dense_layers"])
    if not 1 <= n_used <= n_expert:
        raise LfmEdgeError(f"{where}: num_experts_per_tok {n_used} must be between 1 and num_experts {n_expert}")
    if not 0 <= n_dense <= n_layer:
        raise LfmEdgeError(f"{where}: num_dense_layers {n_dense} must be between 0 and num_hidden_layers {n_layer}")
    return ModelConfig(
        **common,
        n_expert=n_expert,
        n_expert_used=n_used,
        ff_expert=int(c["moe_intermediate_size"]),
        n_dense_layers=n_dense,
        use_expert_bias=bool(c["use_expert_bias"]),
        norm_topk_prob=bool(c["norm_topk_prob"]),
        routed_scaling_factor=float(c["routed_scaling_factor"]),
    )
