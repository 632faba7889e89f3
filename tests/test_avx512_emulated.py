"""The AVX-512 VNNI kernels on a CPU without AVX-512: csrc/qmatmul_avx512.cpp compiled against
SIMDe's emulation of the intrinsics (tests/avx512_emulated/), bit for bit against the scalar
twins for every packed type (tests/avx512_emulated/harness.cpp). Where the CPU runs AVX-512 the
other kernel tests run that table natively, so this one only matters elsewhere; it needs a C++
compiler and SIMDe's headers (`pip install simde-py`), and AVX2 + FMA to run the emulation with
fused multiply-adds (SIMDe splits each 512-bit operation into native 256-bit ones)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lfm_edge import native

HERE = Path(__file__).parent / "avx512_emulated"
CSRC = Path(__file__).parent.parent / "csrc"


def simde_include() -> str | None:
    try:
        import simde_py
    except ImportError:
        return None
    return simde_py.get_include()


@pytest.mark.skipif("avx512" in native.available_isas(), reason="AVX-512 runs natively: the other kernel tests cover it")
@pytest.mark.skipif("avx2" not in native.available_isas(), reason="the emulation runs on AVX2 + FMA")
@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
@pytest.mark.skipif(simde_include() is None, reason="SIMDe headers not installed (pip install simde-py)")
def test_avx512_kernels_give_the_scalar_bits(tmp_path):
    flags = ["-std=c++17", "-O1", "-mavx2", "-mfma", "-mf16c", "-w"]
    objects = []
    for source, include in [("qmatmul_avx512.cpp", [f"-I{HERE}", f"-I{simde_include()}"]),
                            ("qmatmul_scalar.cpp", []), ("pack.cpp", [])]:
        obj = tmp_path / (source + ".o")
        subprocess.run(["g++", *flags, *include, f"-I{CSRC}", "-c", str(CSRC / source), "-o", str(obj)], check=True)
        objects.append(str(obj))
    exe = tmp_path / "harness"
    subprocess.run(["g++", *flags, f"-I{CSRC}", str(HERE / "harness.cpp"), *objects, "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert run.stdout.strip().endswith("0 of 432 cases differ"), run.stdout[-500:]
