"""The AVX-VNNI kernels on a CPU without AVX-VNNI: csrc/qmatmul_avxvnni.cpp compiled with AVX2
and SIMDe's emulation of vpdpbusd on ymm (tests/avx512_emulated/immintrin.h), bit for bit against
the scalar twins for every packed type, odd row and token counts included
(tests/avx512_emulated/harness.cpp built for avxvnni). Where the CPU has AVX-VNNI the other
kernel tests run that table natively; this needs a C++ compiler, SIMDe's headers
(`pip install simde-py`) and AVX2 + FMA."""

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


@pytest.mark.skipif("avxvnni" in native.available_isas(), reason="AVX-VNNI runs natively: the other kernel tests cover it")
@pytest.mark.skipif("avx2" not in native.available_isas(), reason="the emulation runs on AVX2 + FMA")
@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
@pytest.mark.skipif(simde_include() is None, reason="SIMDe headers not installed (pip install simde-py)")
def test_avxvnni_kernels_give_the_scalar_bits(tmp_path):
    objects = []
    for source, include in [("qmatmul_avxvnni.cpp", [f"-I{HERE}", f"-I{simde_include()}"]),
                            ("qmatmul_scalar.cpp", []), ("pack.cpp", [])]:
        obj = tmp_path / (source + ".o")
        subprocess.run(["g++", *FLAGS, *include, f"-I{CSRC}", "-c", str(CSRC / source), "-o", str(obj)], check=True)
        objects.append(str(obj))
    exe = tmp_path / "harness"
    subprocess.run(["g++", *FLAGS, "-DLFM_EDGE_EMULATED_ISA=avxvnni", f"-I{CSRC}", str(HERE / "harness.cpp"),
                    *objects, "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert run.stdout.strip().endswith("0 of 576 cases differ"), run.stdout[-500:]
