"""The committed goldens (tests/golden/) come from transformers, and the tiny checkpoint
writer is deterministic: rebuild each checkpoint into tmp_path, recompute with
transformers, compare.  Skips cleanly when torch / transformers are not installed."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from lfm_edge import tiny_models  # noqa: E402


@pytest.fixture(scope="module")
def live():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import make_goldens

    return make_goldens


@pytest.mark.parametrize("name", tiny_models.MODELS)
def test_model_goldens_match_transformers(live, name, tmp_path):
    ckpt = tiny_models.write_checkpoint(name, tmp_path)
    got = live.compute_model_goldens(ckpt)
    with np.load(GOLDEN / f"{name}.npz") as want:
        assert got["prompt_ids"].shape == (live.PROMPT_LEN,)
        assert got["greedy_ids"].shape == (live.GREEDY_NEW,)
        np.testing.assert_array_equal(got["prompt_ids"], want["prompt_ids"])
        np.testing.assert_array_equal(got["greedy_prompt_ids"], want["greedy_prompt_ids"])
        np.testing.assert_array_equal(got["greedy_ids"], want["greedy_ids"])
        assert got["logits"].shape == want["logits"].shape
        assert want["logits"].dtype == np.float32
        scale = float(np.abs(want["logits"]).max())
        err = float(np.abs(got["logits"] - want["logits"]).max())
        assert err <= 1e-5 * scale, f"max |diff| {err} > 1e-5 * {scale}"


def test_tokenizer_goldens_match_transformers(live, tmp_path):
    ckpt = tiny_models.write_checkpoint("moe", tmp_path)
    got = json.loads(json.dumps(live.compute_tokenizer_goldens(ckpt)))
    want = json.loads((GOLDEN / "tokenizer.json").read_text(encoding="utf-8"))
    assert got == want


def test_tokenizer_json_matches_golden_ids(tmp_path):
    """Needs only `tokenizers`: the written tokenizer.json reproduces the golden ids."""
    tokenizers = pytest.importorskip("tokenizers")
    ckpt = tiny_models.write_checkpoint("dense", tmp_path)
    tok = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    want = json.loads((GOLDEN / "tokenizer.json").read_text(encoding="utf-8"))
    assert tok.get_vocab_size(with_added_tokens=True) == want["vocab_size"]
    for case in want["strings"]:
        assert tok.encode(case["text"], add_special_tokens=True).ids == case["ids"], case["text"]
        assert (tok.encode(case["text"], add_special_tokens=False).ids
                == case["ids_no_special"]), case["text"]
    for name in tiny_models.MODELS:
        with np.load(GOLDEN / f"{name}.npz") as g:
            assert g["logits"].shape[1] == tiny_models.CONFIGS[name]["vocab_size"]


def test_checkpoint_writer_is_byte_identical(tmp_path):
    pytest.importorskip("tokenizers")
    for name in tiny_models.MODELS:
        a = tiny_models.write_checkpoint(name, tmp_path / "a")
        b = tiny_models.write_checkpoint(name, tmp_path / "b")
        files = sorted(p.name for p in a.iterdir())
        assert files == sorted(p.name for p in b.iterdir())
        for f in files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f"{name}/{f}"
