"""The compiled kernels (``lfm_edge._C``) and the choice of instruction set they run on.

At import the best instruction set this CPU supports is active, unless the environment variable
``LFM_EDGE_ISA`` (scalar | avx2 | avxvnni | avx512 | amx) asks for another one. "amx" is the
AVX-512 kernels with AMX tiles for Q4_0 / Q8_0 prompts (16 tokens and more).

Weight types are GGML ids (``gguf.GGMLQuantizationType`` values work); ``qtypes()`` lists the
ones the kernels read, {name: id}: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL (blocks
of 32 weights) and Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS (super-blocks of 256: k % 256 == 0). A
weight matrix is n rows of k values in GGUF's on-disk row layout, handed over as a C-contiguous
buffer of exactly ``n * row_bytes(qtype, k)`` bytes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from lfm_edge.errors import LfmEdgeError


def missing_extension(error: ImportError, package: Path = Path(__file__).resolve().parent) -> LfmEdgeError:
    """What to do when lfm_edge._C cannot be imported (`package`: the lfm_edge folder imported).

    The usual cause: Python runs in the source folder after `pip install .`, so `import lfm_edge`
    finds the folder's uncompiled sources before the installed package (python -m, pytest).
    """
    root = package.parent
    built = any(package.glob("_C.*.so")) or any(package.glob("_C.*.pyd"))
    if (root / "pyproject.toml").is_file() and (root / "csrc").is_dir() and not built:
        return LfmEdgeError(
            f"this Python imports lfm_edge from the source folder {root}, which has no compiled kernels "
            "(the current folder comes first on sys.path): run it from another folder to use the installed "
            f"lfm-edge, or build the kernels in place with `pip install -e .` in {root}"
        )
    return LfmEdgeError(
        f"the lfm-edge C++ extension (lfm_edge._C) cannot load ({error}); "
        "reinstall lfm-edge with `pip install .` in its source folder (a C++17 compiler is needed)"
    )


try:
    from lfm_edge import _C
except ImportError as error:
    raise missing_extension(error) from error

__all__ = [
    "ISA_ENV_VAR",
    "KNOWN_ISAS",
    "AttentionLayer",
    "ConvLayer",
    "LayerStack",
    "DECODE_STREAMINGS",
    "PACK_FORMAT",
    "PackedMatrix",
    "attention",
    "available_isas",
    "decode_streaming",
    "dequantize",
    "gated_short_conv",
    "get_rows",
    "isa",
    "kernel_time_ns",
    "linear",
    "matmul",
    "moe",
    "pool_stats",
    "qtypes",
    "quantize_activations",
    "rms_norm",
    "rope",
    "route",
    "row_bytes",
    "set_threads",
    "short_conv",
    "silu_mul",
    "threads",
    "use_decode_streaming",
    "use_isa",
]

ISA_ENV_VAR = "LFM_EDGE_ISA"
KNOWN_ISAS = ("scalar", "avx2", "avxvnni", "avx512", "amx")  # lowest first

# y = x @ W.T -> float32 [T, n]; x: float32 C-contiguous [T, k]
matmul = _C.matmul
# W -> float32 [n, k]
dequantize = _C.dequantize
# W[ids] -> float32 [len(ids), k]; ids: 1-D int32/int64
get_rows = _C.get_rows
# bytes in one row of k weights of a type
row_bytes = _C.row_bytes
# the weight types the kernels read: {name: GGML id}
qtypes = _C.qtypes

# A matrix (or a stack of n_mats, e.g. experts) ready for `linear` / `moe`:
# PackedMatrix(w, qtype, n, k, n_mats=1). The quantized types are repacked once, losslessly,
# into 16-row groups (csrc/packed.h); float types are borrowed as stored.
# PackedMatrix.from_packed(bytes, ...) borrows matrices already packed (packed_bytes() saved).
PackedMatrix = _C.PackedMatrix
# the version of the packed layouts: saved packed matrices of another version are not read
PACK_FORMAT = _C.PACK_FORMAT
# y = x @ W[index].T -> float32 [T, n]; int8 activations for the quantized types, exact float32
# for the float types
linear = _C.linear
# sum_j weights[t, j] * SwiGLU_{experts[t, j]}(x[t]) -> [T, H]; gate/up/down: PackedMatrix stacks
moe = _C.moe
# a conv layer and its FFN in one call (ops.conv_layer): ConvLayer(operator_norm, ffn_norm, eps,
# in_proj, kernel, out_proj, gate, up, down[, router, expert_bias, top_k, normalize, scale]: a
# sparse MoE of expert stacks), called as layer(x [T, H], state [L-1, H])
ConvLayer = _C.ConvLayer
# an attention layer and its FFN in one call (ops.attention_layer): AttentionLayer(operator_norm,
# ffn_norm, eps, wq, wk, wv, wo, q_norm, k_norm, n_heads, rope_base, gate, up, down[, as
# ConvLayer's]), called as layer(x [T, H], k, v [n_kv, capacity, d], start)
AttentionLayer = _C.AttentionLayer
# a model's decoder layers in one call (ops.decoder_layers): LayerStack([ConvLayer | AttentionLayer,
# ...]), called as stack(x [T, H], conv_states [n_conv, L-1, H], [(k, v) per attention layer], start)
LayerStack = _C.LayerStack
# the int8 activations the packed kernels use: (q int8 [T, k], d [T, k/32], sum int32 [T, k/32])
quantize_activations = _C.quantize_activations
# the small ops, as lfm_edge.ops documents them
rms_norm = _C.rms_norm
silu_mul = _C.silu_mul
short_conv = _C.short_conv
gated_short_conv = _C.gated_short_conv
rope = _C.rope
attention = _C.attention
route = _C.route
# nanoseconds spent inside kernels (GIL released) since import, every thread's calls summed
kernel_time_ns = _C.kernel_time_ns
# {"stalls", "solo_jobs"}: how often the pool found a helper thread off its core (see threadpool.cpp)
pool_stats = _C.pool_stats


def set_threads(n: int) -> None:
    """Run every kernel on n threads (the caller's included); the pool is made once and kept."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise LfmEdgeError(f"n_threads must be a positive integer, got {n!r}")
    _C.set_threads(n)


def threads() -> int:
    """Threads the kernels use (by default one per core this process may run on)."""
    return _C.threads()


def available_isas() -> list[str]:
    """Instruction sets compiled in and supported by this CPU, lowest first."""
    return _C.cpu_isas()


def isa() -> str:
    """The instruction set the kernels use now."""
    return _C.isa()


def _set_isa(name: str, described_as: str) -> None:
    """Makes ``name`` active, or raises LfmEdgeError that starts with ``described_as``."""
    if name not in KNOWN_ISAS:
        raise LfmEdgeError(
            f"{described_as} is not an instruction set lfm-edge knows; "
            f"use one of {', '.join(KNOWN_ISAS)}"
        )
    if name not in available_isas():
        raise LfmEdgeError(
            f"{described_as} is not available here; "
            f"this CPU and build support {', '.join(available_isas())}"
        )
    _C.set_isa(name)


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run the kernels on instruction set ``name`` inside the block (process-wide, so not for
    use while another thread is calling kernels)."""
    previous = isa()
    _set_isa(name, f"instruction set {name!r}")
    try:
        yield
    finally:
        _C.set_isa(previous)


DECODE_STREAMINGS = ("prefetch-l2", "nontemporal")


def decode_streaming() -> str:
    """How the AVX-512 decode kernels stream weights from memory: 'prefetch-l2' (the default on
    Intel) or 'nontemporal' (on AMD). The results are the same bits either way."""
    return _C.decode_streaming()


@contextlib.contextmanager
def use_decode_streaming(name: str) -> Iterator[None]:
    """Stream decode's weights the way ``name`` says inside the block (process-wide, like use_isa)."""
    if name not in DECODE_STREAMINGS:
        raise LfmEdgeError(f"decode streaming {name!r} is not one of {', '.join(DECODE_STREAMINGS)}")
    previous = decode_streaming()
    _C.set_decode_streaming(name)
    try:
        yield
    finally:
        _C.set_decode_streaming(previous)


def _apply_isa_from_environment() -> None:
    value = os.environ.get(ISA_ENV_VAR, "")
    if value.strip():
        _set_isa(value.strip().lower(), f"{ISA_ENV_VAR}={value!r}")


_apply_isa_from_environment()
