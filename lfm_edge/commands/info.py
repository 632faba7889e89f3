"""`lfm-edge info FILE`: what a GGUF model file holds, checked as a load would."""

from __future__ import annotations

import argparse
from collections import Counter

from gguf import LlamaFileType

from .. import weight_cache
from ..errors import LfmEdgeError
from ..gguf_file import GGUFFile
from ..hub import resolve_model
from ..models import build_model
from ..tokenizer import GGUFTokenizer


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="a .gguf file or a hub reference")
    p.add_argument("-m", "--model", dest="model_option", default=None, metavar="MODEL",
                   help="the same, as a flag (as the other commands take it)")


def main(args: argparse.Namespace) -> int:
    if args.model is not None and args.model_option is not None:
        raise LfmEdgeError("two models: give it as an argument or with -m, not both")
    ref = args.model if args.model is not None else args.model_option
    if ref is None:
        raise LfmEdgeError("info needs a model: lfm-edge info -m FILE.gguf (or a hub reference)")
    f = GGUFFile(resolve_model(ref))
    model = build_model(f)
    tok = GGUFTokenizer(f)
    a = model.args
    layers = "".join("A" if a.is_attention(i) else "c" for i in range(a.n_layer))
    print(f"file:        {f.path}")
    print(f"name:        {f.metadata.get('general.name', '?')}")
    print(f"arch:        {a.arch}  ({a.n_layer} layers: {layers}; A = attention, c = short conv)")
    print(f"hidden:      {a.hidden}, heads {a.n_head}, head_dim {a.head_dim}, ffn {a.ffn_dim}")
    if hasattr(a, "n_expert"):
        print(f"experts:     {a.n_expert} (top {a.n_expert_used}), width {a.expert_ffn_dim}, "
              f"dense layers {a.n_dense_layers}")
    print(f"vocab:       {tok.n_vocab}, bos {tok.bos_id}, eos {tok.eos_id}")
    print(f"context:     {a.n_ctx_train}, rope base {a.rope_base:g}")
    print(f"file type:   {file_type(f)}")
    print(f"tensors:     {len(f.tensors)}: {type_mix(f)}")
    print(f"packed:      {packed_weights(f, model)}")
    return 0


def packed_weights(f: GGUFFile, model) -> str:
    """Where the weight cache keeps this file's packed matrices, or what the next load does."""
    packed = weight_cache.packed_nbytes(model.matrices)
    if not packed:
        return "nothing to pack (float weights are read from the file as they are)"
    directory = weight_cache.default_dir()
    if directory is None:
        return f"{packed / 1e9:.2f} GB, packed at every load ({weight_cache.ENV_VAR} is off)"
    saved = weight_cache.saved_for(f, directory)
    if saved is not None:
        return f"{packed / 1e9:.2f} GB, saved in {saved}: loads map it"
    return f"{packed / 1e9:.2f} GB, not saved yet: the next load saves them to {directory}"


def file_type(f: GGUFFile) -> str:
    """The mix llama-quantize says it wrote (general.file_type), e.g. "Q3_K_M"."""
    value = f.metadata.get("general.file_type")
    if value is None:
        return "not stated"
    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"unknown ({value})"


def type_mix(f: GGUFFile) -> str:
    """Tensors per type and each type's share of the bytes, the largest share first:
    "Q3_K 20 (61%), Q5_K 9 (27%), Q6_K 1 (11%), F32 26 (0.4%)"."""
    count: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    for t in f.tensors.values():
        count[t.qtype.name] += 1
        nbytes[t.qtype.name] += t.nbytes
    total = sum(nbytes.values()) or 1

    def share(name: str) -> str:
        pct = 100 * nbytes[name] / total
        return f"{pct:.0f}%" if pct >= 1 else f"{pct:.1g}%"

    order = sorted(count, key=lambda name: (-nbytes[name], name))
    return ", ".join(f"{name} {count[name]} ({share(name)})" for name in order)
