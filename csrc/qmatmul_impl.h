// The int8-activation matmul driver (PackedMatmulFn in kernels.h) and the entries of qmatmul.h,
// written once and compiled into each instruction set's translation unit
// (qmatmul_{scalar,avx2,avxvnni,avx512}.cpp) with that unit's flags. The unit defines its kernels
// in namespace lfm's anonymous namespace first, then includes this:
//
//   namespace this_isa = ...;   its namespace in qmatmul.h; it defines this_isa::quantize_row
//   kTokenTile                  tokens (1 to 4) that share each loaded weight block
//   kDecodeStreams<Block>       row groups a decode tile reads side by side (1: one at a time)
//   decode_side_by_side()       whether it does so now (the AVX-512 unit asks DecodeStreaming)
//   row_group_tile<Block, TT>   for the 32-weight blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL)
//   k_affine_tile<Block, TT>    for Q4_Kx16 and Q5_Kx16
//   scaled16_tile<Block, TT>    for Q6_Kx16 and Q3_Kx16 (a signed scale per 16 weights)
//   q2_k_tile<TT>               for Q2_Kx16
//   iq4_xs_tile<TT>             for IQ4_XSx16
//     each (x, t0, blocks, n_blocks, rows, y, ldy, row0): y[t0 + t, row0 + r] for t < TT and
//     r < rows, from the n_blocks packed blocks of one row group and the quantized tokens.
//
// Each output is one token against one row, so the tiling changes no result (see kernels.h).
// Internal linkage only (see kernels.h), but for the entries of qmatmul.h, which are named per
// instruction set.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_impl.h"
#include "formats.h"
#include "kernels.h"
#include "packed.h"
#include "qmatmul.h"

namespace lfm {
namespace {

static_assert(kTokenTile >= 1 && kTokenTile <= 4, "the driver's leftover tiles have 1 to 3 tokens");

template <class A, class B>
constexpr bool kSame = false;
template <class A>
constexpr bool kSame<A, A> = true;

// Packed blocks of 32 weights; the others hold super-blocks of 256.
template <class Block>
constexpr bool kBlock32 = kSame<Block, Q4_0x16> || kSame<Block, Q4_1x16> || kSame<Block, Q5_0x16> ||
                          kSame<Block, Q5_1x16> || kSame<Block, Q8_0x16> || kSame<Block, IQ4_NLx16>;

// The unit's tile kernel for each packed type: one row group, or, given `streams` (a
// RowGroupStreams<kDecodeStreams<Block>>: decode only, where that is above 1), that many full
// row groups side by side.
template <int TT, class Block, class... Streams>
void tile(const QuantizedRows& x, int64_t t0, const Block* blocks, int64_t n_blocks, int rows,
          float* y, int64_t ldy, int64_t row0, Streams... streams) {
    if constexpr (kBlock32<Block>) {
        row_group_tile<Block, TT>(x, t0, blocks, n_blocks, rows, y, ldy, row0, streams...);
    } else if constexpr (kSame<Block, Q4_Kx16> || kSame<Block, Q5_Kx16>) {
        k_affine_tile<Block, TT>(x, t0, blocks, n_blocks, rows, y, ldy, row0, streams...);
    } else if constexpr (kSame<Block, Q6_Kx16> || kSame<Block, Q3_Kx16>) {
        scaled16_tile<Block, TT>(x, t0, blocks, n_blocks, rows, y, ldy, row0, streams...);
    } else if constexpr (kSame<Block, Q2_Kx16>) {
        q2_k_tile<TT>(x, t0, blocks, n_blocks, rows, y, ldy, row0, streams...);
    } else {
        static_assert(kSame<Block, IQ4_XSx16>, "a packed type without a tile kernel");
        iq4_xs_tile<TT>(x, t0, blocks, n_blocks, rows, y, ldy, row0, streams...);
    }
}

// Row groups read side by side by a tile of TT tokens: the unit's kDecodeStreams<Block> for one
// token; for two (two sequences decoding together, or an expert two of them chose), half as many,
// as each stream then holds twice the accumulators. AVX-512's 32 registers hold two streams'
// accumulators for three and four tokens as well (a few sequences decoding together, a short
// prompt's experts): from DRAM on the AMX VM, a [1792, 2048] Q4_0 matrix for 3 tokens took 152
// instead of 185 us on 1 thread (103 instead of 114 on 2), for 4 tokens 170 instead of 187 (116
// and 118); the 1.2B decoding 3 sequences together on 2 threads went 83-87 -> 94-100 tok/s, 4
// sequences 111-112 -> 116-117. Four streams were no faster on 1 thread and slower on 2. AVX2
// has 16 registers: one stream from three tokens on.
#if defined(__AVX512F__)
constexpr int kMaxStreamedTokens = 4;
#else
constexpr int kMaxStreamedTokens = 2;
#endif
template <class Block, int TT>
constexpr int kStreamsFor = TT == 1 ? kDecodeStreams<Block> : TT <= kMaxStreamedTokens ? kDecodeStreams<Block> / 2 : 1;

// The first of [group_begin, group_end) that a TT-token tile reading kStreamsFor<Block, TT> row
// groups side by side leaves: the range's full row groups cut into that many equal runs, the
// next group of each run read at once; group_begin itself where there is one stream.
template <class Block, int TT>
int64_t side_by_side(const QuantizedRows& x, const Block* blocks, int64_t n_blocks, int64_t n_rows,
                     int64_t group_begin, int64_t group_end, float* y, int64_t ldy) {
    constexpr int kStreams = kStreamsFor<Block, TT>;
    if constexpr (kStreams > 1) {
        if (!decode_side_by_side()) return group_begin;
        const int64_t full_end = group_end < n_rows / kRowGroup ? group_end : n_rows / kRowGroup;
        const int64_t spacing = (full_end - group_begin) / kStreams;
        for (int64_t g = group_begin; g < group_begin + spacing; ++g) {
            tile<TT>(x, 0, blocks + g * n_blocks, n_blocks, kRowGroup, y, ldy, g * kRowGroup,
                     RowGroupStreams<kStreams>{spacing});
        }
        if (spacing > 0) group_begin += kStreams * spacing;
    }
    return group_begin;
}

// Row groups [group_begin, group_end) of a packed matrix, kTokenTile tokens at a time, then
// the tokens left over as one smaller tile. One to four tokens (decode; kStreamsFor says which
// counts this unit reads so) first read runs of full row groups side by side (side_by_side), as one
// tile; the groups left over are read one by one.
template <class Block>
void matmul_row_groups(const QuantizedRows& x, const uint8_t* w, int64_t n_rows,
                       int64_t group_begin, int64_t group_end, float* y, int64_t ldy) {
    const int64_t n_blocks = x.k / (kBlock32<Block> ? kQuantBlock : kSuperBlock);  // per row group
    const auto* blocks = reinterpret_cast<const Block*>(w);  // [groups][n_blocks]
    static_assert(kDecodeStreams<Block> >= 1, "a decode tile reads at least one row group");
    if (x.n_tokens == 1) {
        group_begin = side_by_side<Block, 1>(x, blocks, n_blocks, n_rows, group_begin, group_end, y, ldy);
    } else if (x.n_tokens == 2) {
        group_begin = side_by_side<Block, 2>(x, blocks, n_blocks, n_rows, group_begin, group_end, y, ldy);
    } else if (x.n_tokens == 3) {
        group_begin = side_by_side<Block, 3>(x, blocks, n_blocks, n_rows, group_begin, group_end, y, ldy);
    } else if (x.n_tokens == 4) {
        group_begin = side_by_side<Block, 4>(x, blocks, n_blocks, n_rows, group_begin, group_end, y, ldy);
    }
    for (int64_t g = group_begin; g < group_end; ++g) {
        const int64_t row0 = g * kRowGroup;
        const int rows = static_cast<int>(n_rows - row0 < kRowGroup ? n_rows - row0 : kRowGroup);
        const Block* row_group = blocks + g * n_blocks;
        int64_t t = 0;
        for (; t + kTokenTile <= x.n_tokens; t += kTokenTile) {
            tile<kTokenTile>(x, t, row_group, n_blocks, rows, y, ldy, row0);
        }
        const int64_t left = x.n_tokens - t;  // fewer than kTokenTile
        if constexpr (kTokenTile > 3) {
            if (left == 3) tile<3>(x, t, row_group, n_blocks, rows, y, ldy, row0);
        }
        if constexpr (kTokenTile > 2) {
            if (left == 2) tile<2>(x, t, row_group, n_blocks, rows, y, ldy, row0);
        }
        if constexpr (kTokenTile > 1) {
            if (left == 1) tile<1>(x, t, row_group, n_blocks, rows, y, ldy, row0);
        }
    }
}

}  // namespace

#define LFM_EDGE_QMATMUL_ENTRY(name, Block)                                                    \
    void this_isa::matmul_##name##_packed(const QuantizedRows& x, const uint8_t* w, int64_t n_rows, \
                                          int64_t group_begin, int64_t group_end, float* y,      \
                                          int64_t ldy) {                                         \
        matmul_row_groups<Block>(x, w, n_rows, group_begin, group_end, y, ldy);                  \
    }

LFM_EDGE_QMATMUL_ENTRY(q4_0, Q4_0x16)
LFM_EDGE_QMATMUL_ENTRY(q4_1, Q4_1x16)
LFM_EDGE_QMATMUL_ENTRY(q5_0, Q5_0x16)
LFM_EDGE_QMATMUL_ENTRY(q5_1, Q5_1x16)
LFM_EDGE_QMATMUL_ENTRY(q8_0, Q8_0x16)
LFM_EDGE_QMATMUL_ENTRY(iq4_nl, IQ4_NLx16)
LFM_EDGE_QMATMUL_ENTRY(q2_k, Q2_Kx16)
LFM_EDGE_QMATMUL_ENTRY(q3_k, Q3_Kx16)
LFM_EDGE_QMATMUL_ENTRY(q4_k, Q4_Kx16)
LFM_EDGE_QMATMUL_ENTRY(q5_k, Q5_Kx16)
LFM_EDGE_QMATMUL_ENTRY(q6_k, Q6_Kx16)
LFM_EDGE_QMATMUL_ENTRY(iq4_xs, IQ4_XSx16)

#undef LFM_EDGE_QMATMUL_ENTRY

void this_isa::attention(const AttentionArgs& a, int64_t kv_head, int64_t t_begin, int64_t t_end) {
    attention_rows(a, kv_head, t_begin, t_end);
}

namespace {

// silu(v) = v / (1 + e^-v) with an exponential of a non-positive argument only (attention_impl.h):
// with e = e^-|v|, v / (1 + e) where v >= 0 and v e / (1 + e) below, e taken as 0 below -87
// (where e^v leaves the normal floats; exp_nonpositive would clamp it there). So silu's limits
// are kept: -0 far below zero, NaN for NaN and -inf (-inf * 0), +inf for +inf.
static inline Vec vsilu(Vec v) {
    const Vec one = vset1(1.0f);
    const Vec e = vexp_nonpositive(vsub(vzero(), vabs(v)));
    const Vec e_below = vselect_nonnegative(vadd(v, vset1(87.0f)), e, vzero());
    return vdiv(vmul(v, vselect_nonnegative(v, one, e_below)), vadd(one, e));
}

}  // namespace

void this_isa::silu_mul(float* h, const float* u, int64_t n) {
    int64_t i = 0;
    for (; i + kWidth <= n; i += kWidth) vstore(h + i, vmul(vsilu(vload(h + i)), vload(u + i)));
    if (i < n) {  // the tail through a vector's lanes as well, padded with zeros
        float hv[kWidth] = {}, uv[kWidth] = {};
        std::copy(h + i, h + n, hv);
        std::copy(u + i, u + n, uv);
        vstore(hv, vmul(vsilu(vload(hv)), vload(uv)));
        std::copy(hv, hv + (n - i), h + i);
    }
}

}  // namespace lfm
