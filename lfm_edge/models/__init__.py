"""The architectures lfm-edge runs, keyed by their GGUF `general.architecture`."""

from __future__ import annotations

from ..gguf_file import GGUFFile
from ..weight_cache import WeightCache
from . import lfm2, lfm2_moe

ARCHITECTURES = {
    "lfm2": lfm2,
    "lfm2moe": lfm2_moe,
}


def build_model(f: GGUFFile, cache: WeightCache | None = None) -> lfm2.Model:
    """The model a GGUF file describes, its tensors checked against its metadata; its matrices
    read from `cache` if it holds them, else packed and saved to it."""
    module = ARCHITECTURES.get(f.arch)
    if module is None:
        names = ", ".join(sorted(ARCHITECTURES))
        raise f.error(f"architecture '{f.arch}' is not supported (lfm-edge runs: {names})")
    args = module.ModelArgs.from_gguf(f)
    weights = lfm2.Weights(f, cache)
    model = module.Model(args, weights)
    if len(f.tensors) > len(weights.used):  # llama.cpp refuses them too ("wrong number of tensors")
        first = next(name for name in f.tensors if name not in weights.used)
        raise f.error(f"holds {len(f.tensors) - len(weights.used)} tensors that {f.arch} does not use "
                      f"(the first is {first})")
    if cache is not None:
        cache.finish(model.matrices)
    return model
