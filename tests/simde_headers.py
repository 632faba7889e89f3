"""Where SIMDe's headers are, for the emulated-kernel tests (test_avx512_emulated.py,
test_avxvnni_emulated.py) and tests/sanitize.sh."""

from __future__ import annotations

from pathlib import Path


def simde_include() -> str | None:
    """The directory to put on the include path for `#include <simde/x86/avx512.h>`, from the
    simde-py package; None where it is not installed. simde-py 0.1.0's get_include() names the
    `simde` folder itself, one level below that directory, so both are tried."""
    try:
        import simde_py
    except ImportError:
        return None
    include = Path(simde_py.get_include())
    for directory in (include, include.parent):
        if (directory / "simde" / "x86" / "avx512.h").is_file():
            return str(directory)
    return None


if __name__ == "__main__":  # for tests/sanitize.sh
    import sys

    found = simde_include()
    if found is None:
        sys.exit("SIMDe's headers are not installed (pip install simde-py)")
    print(found)
