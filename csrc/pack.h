// Repacking GGUF matrices of the quantized types into the kernels' 16-row layouts (packed.h),
// done once at load. Baseline flags: this is plain byte shuffling.
#pragma once

#include <cstdint>

#include "kernels.h"
#include "qtypes.h"

namespace lfm {

// Bytes of a packed matrix of n rows of k weights (a packed type, k a multiple of its block).
int64_t packed_bytes(QType qtype, int64_t n, int64_t k);

// Bytes of one GGUF row of k weights of qtype (k a multiple of its block).
int64_t gguf_row_bytes(QType qtype, int64_t k);

// Packs row groups [group_begin, group_end) of the n x k GGUF matrix `src` into `dst` (the
// whole packed matrix); rows past n are zero.
void pack_row_groups(QType qtype, const uint8_t* src, int64_t n, int64_t k, int64_t group_begin,
                     int64_t group_end, uint8_t* dst);

// The inverse (unpack.cpp), for the tests: the n x k packed matrix `packed` back into its GGUF
// bytes dst (n rows of gguf_row_bytes(qtype, k)).
void unpack_matrix(QType qtype, const uint8_t* packed, int64_t n, int64_t k, uint8_t* dst);

}  // namespace lfm
