"""Builds lfm-edge: the Python package plus one C++ extension, lfm_edge._C, built with CMake.

pip install .        # a wheel (build isolation fetches setuptools, pybind11 and cmake)
pip install -e .     # editable: the extension lands in lfm_edge/ next to the sources
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    init = (ROOT / "lfm_edge" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', init, re.MULTILINE).group(1)


class CMakeExtension(Extension):
    """An extension whose sources CMakeLists.txt in source_dir lists, not setuptools."""

    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    """Configures and builds with CMake in the build temp dir, then copies the module to where
    setuptools expects it (inside the source tree for editable installs)."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        import pybind11

        config = "Debug" if self.debug else "Release"
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = cmake_command()
        subprocess.run(
            [
                cmake,
                "-S", str(ext.source_dir),
                "-B", str(build_dir),
                f"-DCMAKE_BUILD_TYPE={config}",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir / 'out'}",
                # e.g. LFM_EDGE_SANITIZE=address,undefined (see tests/sanitize.sh)
                f"-DLFM_EDGE_SANITIZE={os.environ.get('LFM_EDGE_SANITIZE', '')}",
            ],
            check=True,
        )
        jobs = str(os.cpu_count() or 1)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--config", config, "--parallel", jobs],
            check=True,
        )

        built = sorted((build_dir / "out").glob("_C.*"))
        if len(built) != 1:
            raise RuntimeError(f"expected one built _C module in {build_dir / 'out'}: {built}")
        destination = Path(self.get_ext_fullpath(ext.name))
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], destination)


def cmake_command() -> str:
    """The cmake from the PyPI package (build isolation installs it), else the one on PATH."""
    try:
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except (ImportError, AttributeError):
        return "cmake"


setup(
    name="lfm-edge",
    version=read_version(),
    description="A CPU inference runtime for Liquid AI's LFM2 and LFM2-MoE models",
    python_requires=">=3.10",
    # every package under lfm_edge/ (a hand-kept list once left lfm_edge.server out of the wheel),
    # plus quantize/ installed as lfm_edge.quantize
    packages=find_packages(include=["lfm_edge", "lfm_edge.*"]) + ["lfm_edge.quantize"],
    package_dir={"lfm_edge.quantize": "quantize"},
    ext_modules=[CMakeExtension("lfm_edge._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    # huggingface_hub: hub downloads into the shared cache, with resume and progress bars
    # llguidance: constrained decoding (JSON schema / regex / Lark token masks); MIT, abi3 wheels
    # isal: ISA-L's CRC-32 for the weight cache's check, where it has wheels (else zlib's)
    install_requires=["numpy", "gguf", "tokenizers", "jinja2>=3.1.5", "huggingface_hub", "llguidance",
                      "isal; platform_machine in 'x86_64 AMD64 aarch64 arm64'"],
    # simde-py: SIMDe's headers, so tests/test_avx512_emulated.py can check the AVX-512 kernels
    # on a CPU without AVX-512
    extras_require={"test": ["pytest", "pytest-benchmark", "safetensors", "pexpect", "openai", "ollama", "simde-py"]},
    entry_points={"console_scripts": ["lfm-edge = lfm_edge.cli:main"]},
    zip_safe=False,
)
