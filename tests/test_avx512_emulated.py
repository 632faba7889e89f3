"""The AVX-512 VNNI kernels on a CPU without AVX-512: csrc/qmatmul_avx512.cpp compiled against
SIMDe's emulation of the intrinsics (tests/avx512_emulated/), bit for bit against the scalar
twins for every packed type (tests/avx512_emulated/harness.cpp), and its attention within the
float32 tolerance of tests/test_attention.py (tests/avx512_emulated/attention_harness.cpp).
Where the CPU runs AVX-512 the other kernel tests run that table natively, so this one only
matters elsewhere; it needs a C++ compiler and SIMDe's headers (`pip install simde-py`), and
AVX2 + FMA to run the emulation with fused multiply-adds (SIMDe splits each 512-bit operation
into native 256-bit ones)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lfm_edge import native
from simde_headers import simde_include

HERE = Path(__file__).parent / "avx512_emulated"
CSRC = Path(__file__).parent.parent / "csrc"


FLAGS = ["-std=c++17", "-O1", "-mavx2", "-mfma", "-mf16c", "-w"]

pytestmark = [
    pytest.mark.skipif("avx512" in native.available_isas(), reason="AVX-512 runs natively: the other kernel tests cover it"),
    pytest.mark.skipif("avx2" not in native.available_isas(), reason="the emulation runs on AVX2 + FMA"),
    pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler"),
    pytest.mark.skipif(simde_include() is None, reason="SIMDe headers not installed (pip install simde-py)"),
]


@pytest.fixture(scope="module")
def kernel_objects(tmp_path_factory) -> list[str]:
    """The emulated AVX-512 unit, its scalar twin and what they use, compiled once."""
    out = tmp_path_factory.mktemp("avx512_emulated")
    objects = []
    for source, include in [("qmatmul_avx512.cpp", [f"-I{HERE}", f"-I{simde_include()}"]),
                            ("qmatmul_scalar.cpp", []), ("pack.cpp", [])]:
        obj = out / (source + ".o")
        subprocess.run(["g++", *FLAGS, *include, f"-I{CSRC}", "-c", str(CSRC / source), "-o", str(obj)], check=True)
        objects.append(str(obj))
    return objects


def run_harness(source: str, objects: list[str], tmp_path: Path) -> str:
    exe = tmp_path / "harness"
    subprocess.run(["g++", *FLAGS, f"-I{CSRC}", str(HERE / source), *objects, "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    return run.stdout.strip()


def test_avx512_kernels_give_the_scalar_bits(kernel_objects, tmp_path):
    out = run_harness("harness.cpp", kernel_objects, tmp_path)
    assert out.endswith("0 of 576 cases differ"), out[-500:]


def test_avx512_attention_agrees_with_the_scalar_twin(kernel_objects, tmp_path):
    """Both attention paths, float32 and float16 caches, an infinite key and a NaN value."""
    out = run_harness("attention_harness.cpp", kernel_objects, tmp_path)
    assert out.endswith("0 of 40 attention cases differ"), out[-500:]
