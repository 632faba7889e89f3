// The int8-activation kernels, one namespace per instruction set, each defined in its own
// translation unit (qmatmul_scalar.cpp, qmatmul_avx2.cpp, qmatmul_avxvnni.cpp,
// qmatmul_avx512.cpp, qmatmul_amx.cpp) and listed in that instruction set's KernelTable. Declarations only: no
// inline code may live here (see kernels.h on linkage).
#pragma once

#include "kernels.h"

namespace lfm {

// The function type behind PackedMatmulFn (kernels.h), to declare one entry per packed type.
using PackedMatmul = void(const QuantizedRows& x, const uint8_t* w, int64_t n_rows,
                          int64_t group_begin, int64_t group_end, float* y, int64_t ldy);

#define LFM_EDGE_DECLARE_QMATMUL(ns)                                                      \
    namespace ns {                                                                        \
    void quantize_row(const float* x, int64_t k, int8_t* q, float* d, int32_t* sum);      \
    PackedMatmul matmul_q4_0_packed, matmul_q4_1_packed, matmul_q5_0_packed,              \
        matmul_q5_1_packed, matmul_q8_0_packed, matmul_iq4_nl_packed;                     \
    PackedMatmul matmul_q2_k_packed, matmul_q3_k_packed, matmul_q4_k_packed,              \
        matmul_q5_k_packed, matmul_q6_k_packed, matmul_iq4_xs_packed;                     \
    void attention(const AttentionArgs& a, int64_t kv_head, int64_t t_begin, int64_t t_end); \
    void silu_mul(float* h, const float* u, int64_t n);                                    \
    }

LFM_EDGE_DECLARE_QMATMUL(scalar)
LFM_EDGE_DECLARE_QMATMUL(avx2)
LFM_EDGE_DECLARE_QMATMUL(avxvnni)
LFM_EDGE_DECLARE_QMATMUL(avx512)

#undef LFM_EDGE_DECLARE_QMATMUL

// qmatmul_amx.cpp: the AVX-512 table's Q4_0 and Q8_0 entries on AMX tiles (16 tokens at a time),
// and the layout of the activations they read (PackTilesFn).
namespace amx {
PackedMatmul matmul_q4_0_packed, matmul_q8_0_packed;
void pack_tiles(const QuantizedRows& x, int8_t* tiles, float* tile_d);
}

}  // namespace lfm
