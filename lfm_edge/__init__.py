"""lfm-edge: a CPU runtime for Liquid AI's LFM2 and LFM2-MoE models.

    import lfm_edge
    llm = lfm_edge.load("LFM2-8B-A1B-Q4_0.gguf")
    for piece in llm.chat([{"role": "user", "content": "Hi!"}]):
        print(piece, end="")
"""

from .errors import LfmEdgeError

__version__ = "0.1.0"
__all__ = ["LLM", "LfmEdgeError", "load", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so `lfm-edge --version` and the error path of the
    # CLI work even when the native extension cannot be loaded.
    if name in ("LLM", "load"):
        from . import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'lfm_edge' has no attribute {name!r}")
