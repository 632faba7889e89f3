"""The installed package holds every package of the source tree.

CI installs lfm-edge as a wheel (`pip install .`), not from the checkout, so a package left out
of setup.py's list imports here in an editable install and fails only there.
"""

import importlib.util
from pathlib import Path

import pytest

import lfm_edge

SOURCE = Path(__file__).resolve().parent.parent


def source_packages() -> list[str]:
    names = [".".join(p.parent.relative_to(SOURCE).parts) for p in (SOURCE / "lfm_edge").rglob("__init__.py")]
    names += ["lfm_edge.quantize"] if (SOURCE / "quantize" / "__init__.py").exists() else []
    return sorted(n for n in names if "__pycache__" not in n)


def test_the_source_tree_has_the_packages_we_know():
    assert {"lfm_edge", "lfm_edge.commands", "lfm_edge.models", "lfm_edge.server", "lfm_edge.quantize"} <= set(
        source_packages()
    )


@pytest.mark.parametrize("name", source_packages())
def test_every_source_package_is_installed(name):
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"{name} is in the source tree but not in the installed lfm_edge ({lfm_edge.__file__})"
