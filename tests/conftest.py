"""Shared fixtures: tiny checkpoints written by lfm_edge/tiny_models.py and
converted to GGUF by the project's own quantize tool, once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).parent
GOLDEN = TESTS / "golden"
sys.path.insert(0, str(TESTS))

# A test run that a non-interactive shell started in the background (`cmd &`) inherits SIGINT
# ignored, and so would every chat and server the tests start: their Ctrl-C tests would wait for
# a stop that cannot come. Caught here, SIGINT is back to its default in each child (exec resets
# a caught signal, but keeps an ignored one).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from lfm_edge import native, tiny_models, weight_cache  # noqa: E402

# Every load in the run, the tests' own and their subprocesses', saves its packed weights to a
# directory of the run's (so later loads of a model read them back), never to the user's cache.
_WEIGHT_CACHE = tempfile.mkdtemp(prefix="lfm-edge-test-weight-cache-")
os.environ[weight_cache.ENV_VAR] = _WEIGHT_CACHE
atexit.register(shutil.rmtree, _WEIGHT_CACHE, ignore_errors=True)

from lfm_edge.quantize.convert import convert  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> the Hugging Face directory of tiny model `name`."""
    root = tmp_path_factory.mktemp("hf")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = tiny_models.write_checkpoint(name, root / name)
        return made[name]

    return get


@pytest.fixture(scope="session")
def gguf_path(checkpoint, tmp_path_factory):
    """gguf_path(name, type) -> that checkpoint converted to a GGUF file of `type`."""
    root = tmp_path_factory.mktemp("gguf")
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, out_type: str = "f32") -> Path:
        key = (name, out_type)
        if key not in made:
            made[key] = convert(checkpoint(name), root / f"{name}-{out_type}.gguf", out_type, log=lambda *_: None)
        return made[key]

    return get


@pytest.fixture(scope="session")
def golden():
    """golden(name) -> the committed transformers outputs for tiny model `name`."""

    def get(name: str) -> dict[str, np.ndarray]:
        with np.load(GOLDEN / f"{name}.npz") as z:
            return {k: z[k] for k in z.files}

    return get


@pytest.fixture(scope="session", autouse=True)
def run_outside_the_source_tree(tmp_path_factory):
    """Commands the tests start (`python -m lfm_edge ...`) must import the installed
    package, with its compiled extension, not the bare sources in this checkout:
    `python -m` puts the working directory first on sys.path."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


@pytest.fixture(scope="session")
def llama_quantized(gguf_path, tmp_path_factory):
    """llama_quantized(ftype) -> tiny model `moe_k` (256-wide rows) as llama.cpp's quantizer
    writes it from our f32 file for `ftype`, in llama.cpp's spelling ("Q4_K_M", "IQ4_XS")."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    root = tmp_path_factory.mktemp("llama-quantized")
    made: dict[str, Path] = {}

    def get(ftype: str) -> Path:
        if ftype not in made:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
            out = root / f"moe_k-{ftype}.gguf"
            source = str(gguf_path("moe_k", "f32")).encode()
            assert llama_cpp.llama_model_quantize(source, str(out).encode(), ctypes.byref(params)) == 0
            made[ftype] = out
        return made[ftype]

    return get


@pytest.fixture
def llama_cpp_plain_buffers(monkeypatch):
    """Keep llama.cpp (llama-cpp-python) on its plain CPU buffers.

    A native build on a CPU with AMX repacks Q8_0/Q4_0 weights for AMX, and that path
    crashes on this machine (on the tiny models' 64-wide rows, and on multi-token batches of
    the full-size model): a llama.cpp limitation, not a problem of our files, which run on the
    plain CPU path. Llama() does not expose `use_extra_bufts`, so the default params are patched.
    """
    lib = pytest.importorskip("llama_cpp.llama_cpp")
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    monkeypatch.setattr(lib, "llama_model_default_params", params)


@pytest.fixture(params=native.available_isas())
def isa(request):
    """Each instruction set this CPU and build can run, made active for the test."""
    with native.use_isa(request.param):
        yield request.param


@pytest.fixture(params=[1, 2], ids=lambda n: f"{n}threads")
def threads(request):
    """The kernels on 1, then 2 threads; the pool's size is restored after."""
    before = native.threads()
    native.set_threads(request.param)
    yield request.param
    native.set_threads(before)
