"""Regenerate tests/golden/ from transformers (needs torch + transformers).

    python tests/make_goldens.py            # writes tests/golden/{name}.npz + tokenizer.json
    python tests/make_goldens.py --check    # recompute and compare, write nothing

For every tiny model (lfm_edge/tiny_models.py) the checkpoint is written to a temporary
directory and run with ``AutoModelForCausalLM.from_pretrained(dir, dtype=float32)``, eager
attention.  ``{name}.npz`` holds:

- ``prompt_ids``  int64 [200]: BOS + the tiny tokenizer's encoding of PROMPT_TEXT, cut to 200
- ``logits``      float32 [200, vocab]: one full forward pass over prompt_ids
- ``greedy_prompt_ids`` int64 [n]: BOS + GREEDY_PROMPT_TEXT (a short chat turn)
- ``greedy_ids``  int64 [40]: the tokens ``generate(do_sample=False, max_new_tokens=40)``
  appends, with end-of-sequence stopping disabled (eos is just another token)

``tokenizer.json`` holds, for TOKENIZER_STRINGS, the ids the checkpoint's own tokenizer.json
gives with and without special tokens (BOS), the token strings and the decoded text, plus a
few chat-template renderings (transformers ``apply_chat_template``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
sys.path.insert(0, str(HERE))

from lfm_edge import tiny_models  # noqa: E402

PROMPT_LEN = 200
GREEDY_NEW = 40

PROMPT_TEXT = (
    "<|im_start|>user\n"
    "Bonjour ! Pouvez-vous m'expliquer comment fonctionne un modèle de langage ? "
    "The quick brown fox jumps over the lazy dog, and the fisherman said: the sea remembers. "
    "Der schnelle braune Fuchs springt über den faulen Hund. "
    "今天天气很好，我们去公园散步吧。東京は日本の首都です。서울은 대한민국의 수도입니다. "
    "مرحبا بكم في عالم الذكاء الاصطناعي. Привет, как дела? नमस्ते दुनिया สวัสดีครับ שלום 🚀🍕👍🏽\n"
    "def add(a, b):\n    return a + b    # spaces\n\n\n\tprint(add(2, 40))\n"
    '{"city": "Paris", "temp": 21.5}<|im_end|>\n<|im_start|>assistant\n<think>'
    "Let me think step by step about this question, because it mixes many languages.</think>"
    "Here is the answer in several languages: 1234567 + 89 = 1234656. "
    "Il était une fois une petite fille qui s'appelait Chloé. Ende gut, alles gut!"
)
GREEDY_PROMPT_TEXT = "<|im_start|>user\nBonjour, 世界! 🚀<|im_end|>\n<|im_start|>assistant\n"

TOKENIZER_STRINGS = [
    "",
    "Hello world",
    " Hello world",
    "Hello, world! How are you doing today?",
    "don't can't I'm you're we'll they've she'd IT'S DON'T",
    "Le renard brun rapide saute par-dessus le chien paresseux. Où est l'église ?",
    "Größere Modelle benötigen mehr Speicher; Übersetzung ist schwierig.",
    "快速的棕色狐狸跳过了懒惰的狗。",
    "素早い茶色の狐が怠け者の犬を飛び越えた。カタカナ",
    "빠른 갈색 여우가 게으른 개를 뛰어넘었다.",
    "الثعلب البني السريع يقفز فوق الكلب الكسول.",
    "Привет, мир! नमस्ते สวัสดี שלום",
    "🚀🍕👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ☕",
    "def f(x):\n    return x * 2\n\n\nprint(f(21))\n",
    "\tif x:\n\t\tpass\r\n",
    "a  b   c    d     e",
    "     leading spaces and trailing spaces     ",
    "\n\n\n\nnewlines\n \n  \n",
    "numbers 1 12 123 1234 12345 3.14159 2026-11-22",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<think>reasoning</think>answer",
    "<|tool_call_start|>[get_weather(city=\"Paris\")]<|tool_call_end|>",
    "<|startoftext|><|endoftext|><|pad|><|fim_pre|>x<|fim_mid|>y<|fim_suf|>",
    "<|reserved_4|> is not an added token",
    "<|im_start |> almost special <|im_end",
    "x\u00a0y\u2003z\u200bw",  # no-break space, em space, zero-width space
]

CHAT_CASES = [
    {"messages": [{"role": "user", "content": "What is C. elegans?"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "Bonjour ! 你好"},
                  {"role": "assistant", "content": "Salut ! 👋"},
                  {"role": "user", "content": "Encore ?"}],
     "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant",
                   "content": '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>'},
                  {"role": "tool", "content": '{"temp": 21.5, "unit": "C"}'}],
     "tools": [{"name": "get_weather", "description": "Get the current weather",
                "parameters": {"type": "object",
                               "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}],
     "add_generation_prompt": True},
]


# --------------------------------------------------------------------------------------

def encode_prompts(ckpt: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    ids = tok.encode(PROMPT_TEXT, add_special_tokens=True).ids
    assert len(ids) >= PROMPT_LEN, len(ids)
    greedy = tok.encode(GREEDY_PROMPT_TEXT, add_special_tokens=True).ids
    return np.array(ids[:PROMPT_LEN], dtype=np.int64), np.array(greedy, dtype=np.int64)


def load_model(ckpt: pathlib.Path):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{ckpt.name}: loading problems {bad}"
    model.eval()
    return model


def check_loaded_weights(model, ckpt: pathlib.Path) -> None:
    """Every tensor in the files must reach the model unchanged (experts via the fusion)."""
    import torch
    from safetensors.numpy import load_file

    files = sorted(ckpt.glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    sd = model.state_dict()
    seen = set()
    for name, arr in tensors.items():
        parts = name.split(".")
        if "experts" in parts:
            i = parts.index("experts")
            prefix, e, w = ".".join(parts[:i]), int(parts[i + 1]), parts[i + 2]
            F = arr.shape[0] if w in ("w1", "w3") else arr.shape[1]
            if w == "w1":
                got = sd[f"{prefix}.experts.gate_up_proj"][e, :F]
            elif w == "w3":
                got = sd[f"{prefix}.experts.gate_up_proj"][e, F:]
            else:
                got = sd[f"{prefix}.experts.down_proj"][e]
            seen.add(f"{prefix}.experts.gate_up_proj" if w != "w2" else f"{prefix}.experts.down_proj")
        else:
            got = sd[name]
            seen.add(name)
        assert torch.equal(got, torch.from_numpy(arr)), name
    missing = set(sd) - seen - {"lm_head.weight"}
    assert not missing, missing
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])


def compute_model_goldens(ckpt: pathlib.Path, diagnostics: dict | None = None) -> dict:
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(0)
    model = load_model(ckpt)
    check_loaded_weights(model, ckpt)
    prompt_ids, greedy_prompt = encode_prompts(ckpt)

    router_inputs: list = []
    hooks = []
    for layer in model.model.layers:
        gate = getattr(layer.feed_forward, "gate", None)
        if gate is not None:
            hooks.append(gate.register_forward_hook(
                lambda mod, args, out, L=layer: router_inputs.append(
                    (out[0].detach(), L.feed_forward.expert_bias.detach(), mod.top_k))))
    with torch.no_grad():
        logits = model(torch.from_numpy(prompt_ids)[None]).logits[0].float().numpy()
    for h in hooks:
        h.remove()

    # No end-of-sequence stopping: generate() fills an unset eos_token_id from
    # model.generation_config (eos 7), so clear it there too.
    model.generation_config.eos_token_id = None
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=GREEDY_NEW, min_new_tokens=0,
                               eos_token_id=None, bos_token_id=1, pad_token_id=0,
                               use_cache=True)
    inp = torch.from_numpy(greedy_prompt)[None]
    with torch.no_grad():
        out = model.generate(inp, attention_mask=torch.ones_like(inp), generation_config=gen_cfg)
    greedy_ids = out[0, len(greedy_prompt):].numpy().astype(np.int64)
    assert greedy_ids.shape == (GREEDY_NEW,), greedy_ids.shape

    # Cross-check: greedy == argmax of a fresh full forward at every step (no cache).
    seq = list(greedy_prompt)
    margins = []
    with torch.no_grad():
        for _ in range(GREEDY_NEW):
            last = model(torch.tensor([seq])).logits[0, -1]
            top2 = torch.topk(last, 2).values
            margins.append(float(top2[0] - top2[1]))
            seq.append(int(torch.argmax(last)))
    assert seq[len(greedy_prompt):] == greedy_ids.tolist(), (seq, greedy_ids)

    if diagnostics is not None:
        d = diagnostics.setdefault(ckpt.name, {})
        d["greedy_min_top2_margin"] = min(margins)
        d["greedy_distinct_tokens"] = len(set(greedy_ids.tolist()))
        d["greedy_has_eos"] = bool((greedy_ids == 7).any())
        d["logit_absmax"] = float(np.abs(logits).max())
        d["logit_std"] = float(logits.std())
        d["prompt_argmax_distinct"] = len(set(logits.argmax(-1).tolist()))
        changed, router_margin = [], []
        for router_logits, bias, k in router_inputs:
            scores = router_logits.sigmoid()
            with_b = torch.topk(scores + bias, k).indices.sort(-1).values
            without = torch.topk(scores, k).indices.sort(-1).values
            changed.append(float((with_b != without).any(-1).float().mean()))
            s = torch.sort(scores + bias, -1, descending=True).values
            router_margin.append(float((s[:, k - 1] - s[:, k]).min()))
        if router_inputs:
            d["bias_changes_selection_frac"] = changed
            d["router_min_kth_margin"] = min(router_margin)
    return {"prompt_ids": prompt_ids, "logits": logits.astype(np.float32),
            "greedy_prompt_ids": greedy_prompt, "greedy_ids": greedy_ids}


def compute_tokenizer_goldens(ckpt: pathlib.Path) -> dict:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(ckpt)
    cases = []
    for s in TOKENIZER_STRINGS:
        with_sp = tok.encode(s, add_special_tokens=True)
        no_sp = tok.encode(s, add_special_tokens=False)
        # transformers' own tokenizer must agree with the raw tokenizer.json
        assert hf(s).input_ids == with_sp.ids, s
        assert hf(s, add_special_tokens=False).input_ids == no_sp.ids, s
        cases.append({
            "text": s,
            "ids": with_sp.ids,
            "ids_no_special": no_sp.ids,
            "tokens_no_special": no_sp.tokens,
            "decoded": tok.decode(no_sp.ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(no_sp.ids, skip_special_tokens=True),
        })
    chats = []
    for c in CHAT_CASES:
        text = hf.apply_chat_template(c["messages"], tools=c.get("tools"), tokenize=False,
                                      add_generation_prompt=c["add_generation_prompt"])
        # The template starts with bos_token itself, so no extra BOS when encoding.
        ids = tok.encode(text, add_special_tokens=False).ids
        chats.append({**c, "text": text, "ids": ids})
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    return {"vocab_size": vocab_size, "bos_id": 1, "eos_id": 7, "pad_id": 0,
            "strings": cases, "chat": chats}


def compute_all(work: pathlib.Path, names=None, diagnostics: dict | None = None):
    names = names or tiny_models.MODELS
    models = {}
    tok = None
    for n in names:
        ckpt = tiny_models.write_checkpoint(n, work)
        models[n] = compute_model_goldens(ckpt, diagnostics)
        if tok is None:
            tok = compute_tokenizer_goldens(ckpt)
    return models, tok


def compare_model(name: str, got: dict, want) -> list[str]:
    errs = []
    for k in ("prompt_ids", "greedy_prompt_ids", "greedy_ids"):
        if not np.array_equal(got[k], want[k]):
            errs.append(f"{name}.{k}: {got[k].tolist()} != {want[k].tolist()}")
    a, b = got["logits"], want["logits"]
    if a.shape != b.shape:
        errs.append(f"{name}.logits shape {a.shape} != {b.shape}")
    else:
        rel = float(np.abs(a - b).max() / np.abs(b).max())
        if rel > 1e-5:
            errs.append(f"{name}.logits max rel diff {rel:.3g} > 1e-5")
    return errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with tests/golden, write nothing")
    ap.add_argument("--out", type=pathlib.Path, default=GOLDEN)
    args = ap.parse_args(argv)

    diag: dict = {}
    with tempfile.TemporaryDirectory() as td:
        models, tok = compute_all(pathlib.Path(td), diagnostics=diag)
    print(json.dumps(diag, indent=1))

    if args.check:
        errs = []
        for n, g in models.items():
            with np.load(args.out / f"{n}.npz") as want:
                errs += compare_model(n, g, want)
        want_tok = json.loads((args.out / "tokenizer.json").read_text(encoding="utf-8"))
        if want_tok != json.loads(json.dumps(tok)):
            errs.append("tokenizer.json differs")
        print("\n".join(errs) or "goldens match")
        return 1 if errs else 0

    args.out.mkdir(parents=True, exist_ok=True)
    for n, g in models.items():
        path = args.out / f"{n}.npz"
        np.savez_compressed(path, **g)
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    path = args.out / "tokenizer.json"
    path.write_text(json.dumps(tok, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
