// Repacking GGUF Q4_0 / Q8_0 / K-quant matrices into the kernels' 16-row layouts (packed.h), done once at
// load. Baseline flags: this is plain byte shuffling.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace lfm {

// The types that are repacked (all but the float types).
static inline bool is_packed_type(QType qtype) {
    return qtype == QType::Q4_0 || qtype == QType::Q8_0 || qtype == QType::Q4_K ||
           qtype == QType::Q5_K || qtype == QType::Q6_K;
}
static inline bool is_k_quant(QType qtype) {
    return qtype == QType::Q4_K || qtype == QType::Q5_K || qtype == QType::Q6_K;
}

// Bytes of a packed matrix of n rows of k weights (a packed type; k a multiple of its block:
// 32 for Q4_0 / Q8_0, 256 for the K-quants).
int64_t packed_bytes(QType qtype, int64_t n, int64_t k);

// Bytes of one GGUF row of k weights of qtype.
int64_t gguf_row_bytes(QType qtype, int64_t k);

// Packs row groups [group_begin, group_end) of the n x k GGUF matrix `src` into `dst` (the
// whole packed matrix); rows past n are zero.
void pack_row_groups(QType qtype, const uint8_t* src, int64_t n, int64_t k, int64_t group_begin,
                     int64_t group_end, uint8_t* dst);

}  // namespace lfm
