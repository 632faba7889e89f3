"""Every way a model file or an argument can be wrong gives one clear sentence.

Bad files are made by rewriting a good tiny file with the gguf writer, so each
test changes exactly one thing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

import lfm_edge
from lfm_edge.errors import LfmEdgeError


def rewrite(src: Path, dst: Path, *, arch=None, drop_tensor=None, retype=None, reshape=None, set_key=None,
            values=None) -> Path:
    """Copy a GGUF file, changing one thing: set_key = (key, value) gives a key a value of
    another type; values = {key: value} replaces existing keys' values, keeping their types."""
    r = GGUFReader(src)
    a = arch or r.fields["general.architecture"].contents()
    w = GGUFWriter(dst, a)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        value = values[key] if values and key in values else field.contents()
        if set_key and key == set_key[0]:
            value, vtype = set_key[1], GGUFValueType.get_type(set_key[1])
        if vtype == GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    for t in r.tensors:
        if t.name == drop_tensor:
            continue
        data = np.asarray(t.data)
        qtype = GGMLQuantizationType(int(t.tensor_type))
        if retype and t.name == retype:
            # relabel an f32 tensor's bytes as another type: same size, other meaning
            w.add_tensor(t.name, data.view(np.uint8).reshape(data.shape[0], -1) if data.ndim > 1 else data.view(np.uint8),
                         raw_dtype=GGMLQuantizationType.I8)
            continue
        if reshape and t.name == reshape:
            data = data.reshape(-1)[: data.size // 2 * 2].reshape(2, -1)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w.add_tensor(t.name, data)
        else:
            w.add_tensor(t.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def load_error(path) -> str:
    with pytest.raises(LfmEdgeError) as e:
        lfm_edge.load(path)
    return str(e.value)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lfm_edge", *args], capture_output=True, text=True, timeout=300)


def assert_one_sentence(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def good(gguf_path) -> Path:
    return gguf_path("moe", "f32")


def test_the_rewrite_helper_preserves_a_good_file(good, tmp_path, golden):
    copy = rewrite(good, tmp_path / "copy.gguf")
    ids = golden("moe")["prompt_ids"][:20].tolist()
    assert np.array_equal(lfm_edge.load(copy).logits(ids), lfm_edge.load(good).logits(ids))


def test_missing_file(tmp_path):
    msg = load_error(tmp_path / "nope.gguf")
    assert "nope.gguf" in msg and "no such file" in msg


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert "is not a GGUF file" in load_error(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    assert "is not a GGUF file" in load_error(p)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(good, tmp_path, keep):
    p = tmp_path / "cut.gguf"
    data = good.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    msg = load_error(p)
    assert "cut.gguf" in msg and "truncated" in msg


def test_truncated_header(good, tmp_path):
    p = tmp_path / "head.gguf"
    p.write_bytes(good.read_bytes()[:200])
    assert "truncated or corrupt" in load_error(p)


def test_unsupported_architecture(good, tmp_path):
    msg = load_error(rewrite(good, tmp_path / "llama.gguf", arch="llama"))
    assert "architecture 'llama' is not supported" in msg


def test_unsupported_tensor_type(good, tmp_path):
    msg = load_error(rewrite(good, tmp_path / "i8.gguf", retype="blk.0.shortconv.in_proj.weight"))
    assert "blk.0.shortconv.in_proj.weight" in msg and "I8" in msg and "does not support" in msg


def test_missing_tensor(good, tmp_path):
    msg = load_error(rewrite(good, tmp_path / "drop.gguf", drop_tensor="blk.3.ffn_up_exps.weight"))
    assert "blk.3.ffn_up_exps.weight is missing" in msg


def test_shape_disagrees_with_metadata(good, tmp_path):
    msg = load_error(rewrite(good, tmp_path / "shape.gguf", reshape="blk.0.attn_norm.weight"))
    assert "blk.0.attn_norm.weight" in msg and "metadata implies" in msg


def test_metadata_of_the_wrong_type(good, tmp_path):
    msg = load_error(rewrite(good, tmp_path / "key.gguf", set_key=("lfm2moe.block_count", "six")))
    assert "lfm2moe.block_count" in msg


def test_prompt_longer_than_context(good):
    llm = lfm_edge.load(good, n_ctx=16)
    with pytest.raises(LfmEdgeError, match="prompt is 40 tokens but the context holds 16"):
        llm.logits(list(range(2, 42)))
    with pytest.raises(LfmEdgeError, match="context holds 16"):
        list(llm.generate(list(range(2, 42)), max_tokens=4))


def test_bad_arguments(good):
    with pytest.raises(LfmEdgeError, match="n_ctx"):
        lfm_edge.load(good, n_ctx=0)
    with pytest.raises(LfmEdgeError, match="n_threads"):
        lfm_edge.load(good, n_threads=-2)
    llm = lfm_edge.load(good)
    with pytest.raises(LfmEdgeError, match="outside the vocabulary"):
        llm.logits([1, 10**6])
    with pytest.raises(LfmEdgeError, match="temperature"):
        llm.generate("hi", temperature=-1)
    with pytest.raises(LfmEdgeError, match="unknown sampling option 'temprature'"):
        llm.generate("hi", temprature=0.5)
    with pytest.raises(LfmEdgeError, match="role"):
        llm.chat([{"role": "wizard", "content": "hi"}])


def test_cli_reports_bad_files_in_one_sentence(good, tmp_path):
    assert_one_sentence(cli("info", str(tmp_path / "missing.gguf")), "missing.gguf", "no such file")
    notgguf = tmp_path / "x.gguf"
    notgguf.write_text("hello")
    assert_one_sentence(cli("info", str(notgguf)), "not a GGUF file")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-1000])
    assert_one_sentence(cli("info", str(cut)), "truncated")


def test_cli_bad_flag_and_success(good):
    proc = cli("info", "--no-such-flag", str(good))
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr and "Traceback" not in proc.stderr
    ok = cli("info", str(good))
    assert ok.returncode == 0, ok.stderr
    assert "lfm2moe" in ok.stdout and "6 layers: ccAcAc" in ok.stdout


def test_cli_version_names_the_kernel_path():
    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("lfm-edge 0.1.0 (kernels: ")
    assert any(isa in proc.stdout for isa in ("scalar", "avx2", "avx512", "amx"))


def test_quantize_bad_input(tmp_path, checkpoint):
    assert_one_sentence(cli("quantize", str(tmp_path / "nothing"), str(tmp_path / "o.gguf")), "not a directory")
    proc = cli("quantize", str(checkpoint("dense")), str(tmp_path / "o.gguf"), "--type", "q3_k")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert not (tmp_path / "o.gguf").exists()
