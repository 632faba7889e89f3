"""Weight matrices in the layout the kernels stream, made once when a model loads.

GGUF stores quantized matrices (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, the K-quants
Q2_K .. Q6_K, IQ4_XS) row after row; the int8-activation kernels want 16 rows
interleaved per 32-column block or per 256-column super-block (csrc/packed.h,
where the repacking is shown to be lossless), so `Linear` repacks them into memory
of its own at load, letting go of the file's pages as it reads them (or, once
`weight_cache` has saved them, borrows the saved packing). Float matrices
(F32, F16, BF16) are used as stored, straight from the mapped file, through the exact
float32-activation kernels. The stored tensor is kept too: the numpy
reference path (`lfm_edge.reference`) and embedding lookups read it.
"""

from __future__ import annotations

from . import native
from .gguf_file import Tensor


class Linear:
    """A weight matrix W [N, K], or a stack of them [E, N, K] (experts), ready for `ops.linear`."""

    def __init__(self, tensor: Tensor, packed: native.PackedMatrix | None = None):
        """`packed`: the tensor already packed (read from a `weight_cache`); else it is packed here."""
        if len(tensor.shape) not in (2, 3):
            raise ValueError(f"{tensor.name}: a matrix must be 2-D or 3-D, got shape {list(tensor.shape)}")
        *stack, n, k = tensor.shape
        self.tensor = tensor
        self.name, self.qtype, self.shape = tensor.name, tensor.qtype, tensor.shape
        self.n_mats = stack[0] if stack else 1
        # the kernels read the copy, not the file: the packer drops the file's pages it has read
        if packed is None:
            packed = native.PackedMatrix(tensor.data, int(tensor.qtype), n, k, self.n_mats, tensor.mapping)
        self.native = packed

    @property
    def nbytes(self) -> int:
        """Bytes the kernels read for the whole matrix (all experts)."""
        return self.native.nbytes

    def __repr__(self) -> str:
        return f"Linear({self.name}, {self.qtype.name}, {list(self.shape)})"
