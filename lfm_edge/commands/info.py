"""`lfm-edge info FILE`: what a GGUF model file holds, checked as a load would."""

from __future__ import annotations

import argparse
from collections import Counter

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
    kinds = Counter(t.qtype.name for t in f.tensors.values())
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
    print(f"tensors:     {len(f.tensors)} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})")
    return 0
