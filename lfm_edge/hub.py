"""Finding a model: a local .gguf path, or a Hugging Face hub reference.

`LiquidAI/LFM2-8B-A1B-GGUF` means that repository's Q4_0 file;
`LiquidAI/LFM2-8B-A1B-GGUF:Q8_0` picks another quantization. Files come from
the Hugging Face cache when they are there, and are otherwise downloaded into
it by huggingface_hub (progress bar, resumable).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import LfmEdgeError

DEFAULT_MODEL = "LiquidAI/LFM2-8B-A1B-GGUF"
DEFAULT_QUANT = "Q4_0"
HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<quant>[\w.-]+))?$")


def how_to_get_a_model(repo: str, quant: str) -> str:
    return (
        f"download it on a connected machine with `huggingface-cli download {repo} --include '*{quant}*.gguf'` "
        f"(or `lfm-edge run -m {repo}:{quant} ...` there), pass a local file with -m PATH.gguf, "
        "or try the pipeline with a tiny random model: `lfm-edge demo-model demo.gguf`"
    )


def resolve_model(ref: str | None) -> Path:
    """The local path of the GGUF file `ref` names (a path, or a hub reference)."""
    ref = ref or DEFAULT_MODEL
    path = Path(os.path.expanduser(ref))
    if path.exists() or ref.endswith(".gguf") or os.sep in ref.replace("/", "", 1) or not HUB_REF.match(ref):
        return local_model_file(path, ref)
    m = HUB_REF.match(ref)
    repo, quant = m.group("repo"), (m.group("quant") or DEFAULT_QUANT).upper()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise LfmEdgeError(f"{ref}: hub references need the huggingface_hub package (pip install huggingface_hub)") from None
    pattern = f"*{quant}*.gguf"
    found = _pick(_snapshot(snapshot_download, repo, pattern, local_only=True, errors=(LocalEntryNotFoundError,)), quant)
    if found:
        return found
    try:
        folder = _snapshot(snapshot_download, repo, pattern, local_only=False, errors=())
    except LocalEntryNotFoundError:
        raise LfmEdgeError(
            f"{repo}:{quant} is not in the local Hugging Face cache and the hub cannot be reached; "
            + how_to_get_a_model(repo, quant)
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise LfmEdgeError(f"{repo}:{quant}: download failed ({e}); " + how_to_get_a_model(repo, quant)) from None
    found = _pick(folder, quant)
    if not found:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:  # the folder is only what the cache holds
            raise LfmEdgeError(
                f"{repo}:{quant} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                + how_to_get_a_model(repo, quant)
            )
        raise LfmEdgeError(f"{repo} has no {quant} GGUF file; choose another with {repo}:QUANT (e.g. :Q8_0)")
    return found


def local_model_file(path: Path, ref: str) -> Path:
    """`path` if it is a file one can read a model from; a directory or a pipe is refused, since
    reading one would fail with a confusing error or, for a FIFO, wait forever."""
    if not path.exists():
        raise LfmEdgeError(f"{ref}: no such file")
    if path.is_dir():
        raise LfmEdgeError(f"{ref}: is a directory; -m takes a .gguf file (or a hub reference)")
    if not path.is_file():
        raise LfmEdgeError(f"{ref}: is not a regular file (a pipe or a device?); -m takes a .gguf file")
    return path


def _snapshot(download, repo: str, pattern: str, local_only: bool, errors: tuple) -> Path | None:
    try:
        return Path(download(repo_id=repo, allow_patterns=[pattern], local_files_only=local_only))
    except errors:
        return None


def _pick(folder: Path | None, quant: str) -> Path | None:
    if folder is None:
        return None
    files = sorted(p for p in folder.rglob("*.gguf") if quant in p.name.upper() and p.is_file())
    return files[0] if files else None
