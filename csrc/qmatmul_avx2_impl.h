// The AVX2-width int8-activation kernels, written once and compiled into two translation units
// with their own flags: qmatmul_avx2.cpp (vpmaddubsw + vpmaddwd) and qmatmul_avxvnni.cpp
// (vpdpbusd on ymm). The packed 16-row blocks (packed.h) against int8 activations, each 16-row
// group as two halves of 8 rows; the tiles that qmatmul_impl.h runs over the row groups. In
// prefill a tile holds 8 rows x 4 tokens in registers. Same bits as the scalar twins in
// qmatmul_scalar.cpp: every integer sum is exact. The unit defines in namespace lfm's anonymous
// namespace, before including this:
//
//   namespace this_isa = ...;   its namespace in qmatmul.h (this defines this_isa::quantize_row)
//   kTokenTile                  tokens that share each unpacked weight block (prefill)
//   add_products<kRun>(o, u, s, run, dot)
//                               the dot-product step: adds the products u x s (unsigned x signed
//                               bytes, 4 to each int32 lane) of operand o to dot. Operands count
//                               from 0 in each dot product and come in whole runs of kRun (how
//                               many may share int16 sums: kInt16Run), so the unit may sum a run
//                               in `run` before adding it to dot; every sum stays exact
//
// Internal linkage for everything but the table entries (see kernels.h).
#pragma once

#include <immintrin.h>

#include <cstring>
#include <limits>

#include "formats.h"
#include "kernels.h"
#include "packed.h"
#include "qmatmul.h"

namespace lfm {
namespace {

static inline __m256i broadcast4(const int8_t* p) {  // 4 activation bytes into every lane
    int32_t v;
    std::memcpy(&v, p, sizeof v);
    return _mm256_set1_epi32(v);
}

// y[0, min(rows, 8)) from one 8-row half's sums.
static inline void store_half(__m256 acc, int rows, float* y) {
    if (rows >= 8) {
        _mm256_storeu_ps(y, acc);
        return;
    }
    alignas(32) float out[8];
    _mm256_store_ps(out, acc);
    std::memcpy(y, out, sizeof(float) * static_cast<size_t>(rows));
}

// A tile's loop over the blocks of one row group, for its two 8-row halves h: step(group, i, h,
// prefetch, acc) adds step i's products (a block, or a K-quant sub-block) of the row group whose
// blocks start at `group` for half h to the TT token accumulators. Decode (TT == 1) does both
// halves in one pass, so the weights stream once from memory as stored; a token tile does one
// half per pass, so that its TT accumulators, TT dot products and the unpacked operands fit the
// 16 registers (the second pass finds the row group in cache).
//
// Decode may also run G full row groups side by side, `spacing` groups apart (their outputs
// 16 * spacing rows apart): G streams from memory at once instead of one. The hardware
// prefetcher keeps more lines in flight for two streams than for one (Zen 3, 2 threads: the
// read probe gives 21 GB/s with one stream a thread and 26 with two; the GEMV's gains are at
// kDecodeStreams). Each output is still the same sums in the same order, so G changes no bit.
template <int TT, int G, class Block, class Step>
static inline void over_halves(const Block* blocks, int64_t n_blocks, int64_t spacing, int64_t n_steps, int rows,
                               float* y, int64_t ldy, int64_t t0, int64_t row0, const Step& step) {
    static_assert(G == 1 || TT <= 2, "row groups side by side are for decode: one or two tokens");
    constexpr int kPerPass = TT == 1 ? 2 : 1;
    for (int first = 0; first < 2 && 8 * first < rows; first += kPerPass) {
        __m256 acc[G][kPerPass][TT];
        for (int g = 0; g < G; ++g) {
            for (int p = 0; p < kPerPass; ++p) {
                for (int t = 0; t < TT; ++t) acc[g][p][t] = _mm256_setzero_ps();
            }
        }
        for (int64_t i = 0; i < n_steps; ++i) {
            for (int g = 0; g < G; ++g) {
                for (int p = 0; p < kPerPass; ++p) {
                    step(blocks + g * spacing * n_blocks, i, first + p, first + p == 0, acc[g][p]);
                }
            }
        }
        for (int g = 0; g < G; ++g) {
            for (int p = 0; p < kPerPass; ++p) {
                const int h = first + p;
                if (8 * h >= rows) break;
                for (int t = 0; t < TT; ++t) {
                    store_half(acc[g][p][t], rows - 8 * h, y + (t0 + t) * ldy + row0 + g * spacing * kRowGroup + 8 * h);
                }
            }
        }
    }
}

// The 8 operands (weights 4o..4o+3 of 8 rows) of half h of a Q4_0x16-style nibble array.
static inline void unpack_nibbles(const uint8_t* qs, int h, __m256i w[8]) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    for (int c = 0; c < 4; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 64 * c + 32 * h));
        w[c] = _mm256_and_si256(v, low);
        w[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
}

// Adds `value` to the bytes of operand o whose bit is set in half h of its 64-bit mask qh[8o ..]:
// byte i of the half takes bit i of 32 bits, so spread byte i / 8 over 8 bytes and test.
static inline void add_mask_bits(const uint8_t* qh, int h, int8_t value, __m256i w[8]) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
    const __m256i v = _mm256_set1_epi8(value);
    for (int o = 0; o < 8; ++o) {
        int32_t bits;
        std::memcpy(&bits, qh + 8 * o + 4 * h, sizeof bits);
        const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits), spread);
        const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
        w[o] = _mm256_add_epi8(w[o], _mm256_and_si256(set, v));
    }
}

// ---- the 32-weight blocks, streamed: operands c and c + 4 (weights 4c..4c+3 and 16+4c..16+4c+3
// of 8 rows) are made from one 32-byte load and used at once, as few registers live as possible

// The bytes to add to operand o of half h for the bits set in its 64-bit mask qh[8o ..]: byte i
// of the half takes bit i of 32 bits, so spread byte i / 8 over 8 bytes and test.
static inline __m256i mask_bits(const uint8_t* qh, int h, int o, __m256i value) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
    int32_t bits;
    std::memcpy(&bits, qh + 8 * o + 4 * h, sizeof bits);
    const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits), spread);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit), value);
}

static inline void nibble_pair(const uint8_t* qs, int h, int c, __m256i* lo, __m256i* hi) {
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 64 * c + 32 * h));
    *lo = _mm256_and_si256(v, low);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
}

static inline void iq4_pair(const uint8_t* qs, int h, int c, __m256i* lo, __m256i* hi) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Values)));
    nibble_pair(qs, h, c, lo, hi);
    *lo = _mm256_shuffle_epi8(table, *lo);
    *hi = _mm256_shuffle_epi8(table, *hi);
}

static inline void five_bit_pair(const uint8_t* qs, const uint8_t* qh, int h, int c, __m256i* lo, __m256i* hi) {
    const __m256i sixteen = _mm256_set1_epi8(16);
    nibble_pair(qs, h, c, lo, hi);
    *lo = _mm256_add_epi8(*lo, mask_bits(qh, h, c, sixteen));
    *hi = _mm256_add_epi8(*hi, mask_bits(qh, h, c + 4, sixteen));
}

// Operands c and c + 4 of half h of a block: unsigned (at most 31) but for Q8_0 and IQ4_NL, whose
// operands are signed (kSignedOperands).
static inline void operand_pair(const Q4_0x16& blk, int h, int c, __m256i* lo, __m256i* hi) {
    nibble_pair(blk.qs, h, c, lo, hi);
}
static inline void operand_pair(const Q4_1x16& blk, int h, int c, __m256i* lo, __m256i* hi) {
    nibble_pair(blk.qs, h, c, lo, hi);
}
static inline void operand_pair(const Q5_0x16& blk, int h, int c, __m256i* lo, __m256i* hi) {
    five_bit_pair(blk.qs, blk.qh, h, c, lo, hi);
}
static inline void operand_pair(const Q5_1x16& blk, int h, int c, __m256i* lo, __m256i* hi) {
    five_bit_pair(blk.qs, blk.qh, h, c, lo, hi);
}
static inline void operand_pair(const Q8_0x16& blk, int h, int c, __m256i* lo, __m256i* hi) {
    const __m256i offset = _mm256_set1_epi8(static_cast<char>(0x80));  // stored w + 128: back to int8
    *lo = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs + 64 * c + 32 * h)), offset);
    *hi = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.qs + 64 * (c + 4) + 32 * h)), offset);
}
static inline void operand_pair(const IQ4_NLx16& blk, int h, int c, __m256i* lo, __m256i* hi) {
    iq4_pair(blk.qs, h, c, lo, hi);
}

// The offset every weight carries (subtracted as offset * sum(a)).
static inline int32_t offset_of(const Q4_0x16&) { return 8; }
static inline int32_t offset_of(const Q5_0x16&) { return 16; }
template <class Block>
static inline int32_t offset_of(const Block&) { return 0; }

template <class Block>
constexpr bool kSignedOperands = false;
template <>
constexpr bool kSignedOperands<Q8_0x16> = true;
template <>
constexpr bool kSignedOperands<IQ4_NLx16> = true;

// Operands whose products the AVX2 unit's dot step may add as int16 pair sums (vpmaddubsw)
// before one vpmaddwd widens them to int32 (one vpmaddwd per run instead of one per operand).
// With |a| <= 127 a pair sum is at most 2 * 15 * 127 = 3810 for nibbles (8 operands sum below
// 2^15), 2 * 31 * 127 = 7874 for 5-bit quants (4 do), and up to 2 * 128 * 127 = 32512 for the
// signed types (1 only). The sums stay exact integers, so the results are the scalar twin's bits.
// vpdpbusd sums in int32 and ignores the run.
template <class Block>
constexpr int kInt16Run = 8;
template <>
constexpr int kInt16Run<Q5_0x16> = 4;
template <>
constexpr int kInt16Run<Q5_1x16> = 4;
template <>
constexpr int kInt16Run<Q8_0x16> = 1;
template <>
constexpr int kInt16Run<IQ4_NLx16> = 1;
template <>
constexpr int kInt16Run<Q5_Kx16> = 4;

// Row groups a decode tile reads side by side (qmatmul_impl.h; over_halves). More streams help
// where a tile is cheap next to its bytes; where unpacking is dear (6-bit, 2- and 3-bit, IQ4_XS)
// the tile is bound by arithmetic already and the extra accumulators spill. Measured with a GEMV
// from DRAM ([7168, 2048] matrices, 160 MB of them) on the Zen 3 VM's vpmaddubsw unit, GB/s at 1 /
// 2 threads, one stream -> the count chosen, means of two runs that vary by up to 15%: Q4_0 10.7 /
// 18.4 -> 20.6 / 25.5, Q8_0 12.7 / 20.3 -> 18.5 / 26.6, Q4_1 14.6 / 21.4 -> 18.5 / 25.1, Q4_K 15.9
// / 20.2 -> 16.9 / 22.8 (4 streams); Q5_0 13.7 / 21.1 -> 15.3 / 23.9, Q5_1 13.6 / 22.3 -> 14.9 /
// 23.6, Q5_K 13.0 / 20.7 -> 14.1 / 21.2 (2; IQ4_NL no worse). 8 streams spill for Q4_0 (13.2 /
// 14.2), 4 for Q5_K, Q6_K, Q2_K and Q3_K (10-30% slower).
template <class Block>
constexpr int kDecodeStreams = 1;
template <>
constexpr int kDecodeStreams<Q4_0x16> = 4;
template <>
constexpr int kDecodeStreams<Q4_1x16> = 4;
template <>
constexpr int kDecodeStreams<Q8_0x16> = 4;
template <>
constexpr int kDecodeStreams<Q4_Kx16> = 4;
template <>
constexpr int kDecodeStreams<Q5_0x16> = 2;
template <>
constexpr int kDecodeStreams<Q5_1x16> = 2;
template <>
constexpr int kDecodeStreams<IQ4_NLx16> = 2;
template <>
constexpr int kDecodeStreams<Q5_Kx16> = 2;
static inline bool decode_side_by_side() { return true; }  // on every CPU (kernels.h: DecodeStreaming is AVX-512's)

// The exact integer dot products of half h (8 rows) of one block with the 32 activations of
// each of TT tokens (token t's at a + t * lda), before the offset: each operand is unpacked
// once and used by every token. Unsigned operands are at most 31; signed ones at most 128 in
// magnitude, their sign moved onto the activation so that the unsigned side is |w|: either way,
// with |a| <= 127, a pair of products stays below 2^15.
template <int kRun, bool kSigned, int TT, class Pair>
static inline void streamed_dots(const int8_t* a, int64_t lda, const Pair& pair, __m256i (&dot)[TT]) {
    __m256i run[TT];
    for (int t = 0; t < TT; ++t) dot[t] = run[t] = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
        __m256i w[2];  // weights 4c .. 4c+3 and 16+4c .. 16+4c+3
        pair(c, &w[0], &w[1]);
        for (int i = 0; i < 2; ++i) {
            const int o = 2 * c + i;  // operands in the order they are summed
            for (int t = 0; t < TT; ++t) {
                const __m256i a4 = broadcast4(a + t * lda + 16 * i + 4 * c);
                if constexpr (kSigned) {
                    add_products<kRun>(o, _mm256_sign_epi8(w[i], w[i]), _mm256_sign_epi8(a4, w[i]), run[t], dot[t]);
                } else {
                    add_products<kRun>(o, w[i], a4, run[t], dot[t]);
                }
            }
        }
    }
}

// One row group for TT tokens (kTokenTile, 4, in prefill): each unpacked operand (8 rows x 4
// weights) is used by the TT tokens from a register.
template <class Block, int TT, int G = 1>
void row_group_tile(const QuantizedRows& x, int64_t t0, const Block* blocks, int64_t nb,
                    int rows, float* y, int64_t ldy, int64_t row0, RowGroupStreams<G> streams = {0}) {
    over_halves<TT, G>(blocks, nb, streams.spacing, nb, rows, y, ldy, t0, row0,
                       [&](const Block* group, int64_t b, int h, bool prefetch, __m256 (&acc)[TT]) {
        const Block& blk = group[b];
        if (prefetch) prefetch_weights(&blk, sizeof(Block));
        __m256i dots[TT];
        streamed_dots<kInt16Run<Block>, kSignedOperands<Block>>(
            x.q + t0 * x.k + b * kQuantBlock, x.k,
            [&](int c, __m256i* lo, __m256i* hi) { operand_pair(blk, h, c, lo, hi); }, dots);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.d + 8 * h)));
        for (int t = 0; t < TT; ++t) {
            const int64_t token = t0 + t;
            const int32_t a_sum = x.sum[token * nb + b];
            const __m256i dot = _mm256_sub_epi32(dots[t], _mm256_set1_epi32(offset_of(blk) * a_sum));
            const __m256 dx = _mm256_set1_ps(x.d[token * nb + b]);
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(dot), acc[t]);
            if constexpr (kHasMin<Block>) {
                const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.m + 8 * h)));
                acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(mw, dx), _mm256_set1_ps(static_cast<float>(a_sum)), acc[t]);
            }
        }
    });
}

// ---- K-quants (packed.h), each 16-row group as two halves of 8 rows like the blocks above

static inline const Q4_Kx16& low_part(const Q4_Kx16& blk) { return blk; }
static inline const Q4_Kx16& low_part(const Q5_Kx16& blk) { return blk.low; }

// Operands c and c + 4 of half h of sub-block j, unsigned (at most 15 / 31).
static inline void k_operand_pair(const Q4_Kx16& blk, int j, int h, int c, __m256i* lo, __m256i* hi) {
    nibble_pair(blk.qs[j], h, c, lo, hi);
}
static inline void k_operand_pair(const Q5_Kx16& blk, int j, int h, int c, __m256i* lo, __m256i* hi) {
    five_bit_pair(blk.low.qs[j], blk.qh[j], h, c, lo, hi);
}

static inline __m256 u8x8_to_ps(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Q4_K / Q5_K: acc += (s dx) dot - (mn dx) sum(a) per sub-block of 32 (as the scalar twin).
template <class Block, int TT, int G = 1>
void k_affine_tile(const QuantizedRows& x, int64_t t0, const Block* blocks, int64_t nsb, int rows,
                   float* y, int64_t ldy, int64_t row0, RowGroupStreams<G> streams = {0}) {
    const int64_t nb = x.k / kQuantBlock;
    over_halves<TT, G>(blocks, nsb, streams.spacing, 8 * nsb, rows, y, ldy, t0, row0,
                       [&](const Block* group, int64_t b, int h, bool prefetch, __m256 (&acc)[TT]) {
        const Block& blk = group[b / 8];
        const int j = static_cast<int>(b % 8);
        if (prefetch) prefetch_weights(reinterpret_cast<const char*>(&blk) + sizeof blk / 8 * j, sizeof blk / 8);
        const Q4_Kx16& low = low_part(blk);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(low.d + 8 * h)));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(low.dmin + 8 * h)));
        const __m256 scale = _mm256_mul_ps(d, u8x8_to_ps(low.sc[j] + 8 * h));  // exact
        const __m256 min = _mm256_mul_ps(dmin, u8x8_to_ps(low.m[j] + 8 * h));  // exact
        __m256i dots[TT];
        streamed_dots<kInt16Run<Block>, false>(
            x.q + t0 * x.k + b * kQuantBlock, x.k,
            [&](int c, __m256i* lo, __m256i* hi) { k_operand_pair(blk, j, h, c, lo, hi); }, dots);
        for (int t = 0; t < TT; ++t) {
            const int64_t token = t0 + t;
            const __m256 dx = _mm256_set1_ps(x.d[token * nb + b]);
            const __m256 sum = _mm256_set1_ps(static_cast<float>(x.sum[token * nb + b]));
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(scale, dx), _mm256_cvtepi32_ps(dots[t]), acc[t]);
            acc[t] = _mm256_fnmadd_ps(_mm256_mul_ps(min, dx), sum, acc[t]);
        }
    });
}

// The 2-bit fields of half h of a Q6_Kx16.qh-style q2[128] (operand 4v + s at bits 2s, 2s+1 of
// the bytes at 64 v), each moved to bits kShift, kShift + 1 of operand w[4v + s], the rest 0.
template <int kShift>
static inline void unpack_pairs(const uint8_t* q2, int h, __m256i w[8]) {
    const __m256i two_bits = _mm256_set1_epi8(static_cast<char>(3 << kShift));
    for (int v = 0; v < 2; ++v) {
        const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q2 + 64 * v + 32 * h));
        for (int s4 = 0; s4 < 4; ++s4) {
            const int move = kShift - 2 * s4;  // 16-bit shifts: the mask drops the neighbours' bits
            const __m256i moved = move >= 0 ? _mm256_slli_epi16(hb, move) : _mm256_srli_epi16(hb, -move);
            w[4 * v + s4] = _mm256_and_si256(moved, two_bits);
        }
    }
}

// Block j's operands for half h, unsigned, and the offset of every quant (weight = sc (u - off)).
static inline int32_t unpack_scaled16(const Q6_Kx16& blk, int j, int h, __m256i w[8]) {
    __m256i high[8];
    unpack_nibbles(blk.ql[j], h, w);
    unpack_pairs<4>(blk.qh[j], h, high);
    for (int o = 0; o < 8; ++o) w[o] = _mm256_or_si256(w[o], high[o]);
    return 32;
}
static inline int32_t unpack_scaled16(const Q3_Kx16& blk, int j, int h, __m256i w[8]) {
    unpack_pairs<0>(blk.q2[j], h, w);
    add_mask_bits(blk.qh[j], h, 4, w);
    return 4;
}

// The dot product of 4 unsigned operands (16 weights) with 16 activations, plus `init`: for the
// AVX2 unit's int16 sums kRun operands at a time (u <= 63: pair sums <= 16002, so 2 fit; u <= 7:
// 4 do).
template <int kRun>
static inline __m256i dot16(const __m256i* w, const int8_t* a, __m256i init) {
    __m256i run = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) add_products<kRun>(i, w[i], broadcast4(a + 4 * i), run, init);
    return init;
}

static inline __m256i i8x8_to_epi32(const int8_t* p) {
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

template <class Block>
constexpr int kScaled16Run = 4;  // Q3_K: u <= 7
template <>
constexpr int kScaled16Run<Q6_Kx16> = 2;  // u <= 63

// Q6_K / Q3_K: acc += (d dx) (sc0 (dot0 - off sum0) + sc1 (dot1 - off sum1)), as the scalar twin.
template <class Block, int TT, int G = 1>
void scaled16_tile(const QuantizedRows& x, int64_t t0, const Block* blocks, int64_t nsb, int rows,
                   float* y, int64_t ldy, int64_t row0, RowGroupStreams<G> streams = {0}) {
    const int64_t nb = x.k / kQuantBlock;
    over_halves<TT, G>(blocks, nsb, streams.spacing, 8 * nsb, rows, y, ldy, t0, row0,
                       [&](const Block* group, int64_t b, int h, bool prefetch, __m256 (&acc)[TT]) {
        const Block& blk = group[b / 8];
        const int j = static_cast<int>(b % 8);
        if (prefetch) prefetch_weights(reinterpret_cast<const char*>(&blk) + sizeof blk / 8 * j, sizeof blk / 8);
        __m256i w[8];
        const int32_t offset = unpack_scaled16(blk, j, h, w);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.d + 8 * h)));
        const __m256i sc0 = i8x8_to_epi32(blk.sc[2 * j] + 8 * h);
        const __m256i sc1 = i8x8_to_epi32(blk.sc[2 * j + 1] + 8 * h);
        for (int t = 0; t < TT; ++t) {
            const int64_t token = t0 + t;
            const int8_t* a = x.q + token * x.k + b * kQuantBlock;
            const int32_t* s16 = x.sum16 + token * 2 * nb + 2 * b;
            const __m256i dot0 = dot16<kScaled16Run<Block>>(w, a, _mm256_set1_epi32(-offset * s16[0]));
            const __m256i dot1 = dot16<kScaled16Run<Block>>(w + 4, a + 16, _mm256_set1_epi32(-offset * s16[1]));
            const __m256i combined = _mm256_add_epi32(_mm256_mullo_epi32(sc0, dot0), _mm256_mullo_epi32(sc1, dot1));
            const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(x.d[token * nb + b]));
            acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(combined), acc[t]);
        }
    });
}

// Q2_K: acc += (d dx) (sc0 dot0 + sc1 dot1) - (dmin dx) (m0 sum0 + m1 sum1), as the scalar twin.
template <int TT, int G = 1>
void q2_k_tile(const QuantizedRows& x, int64_t t0, const Q2_Kx16* blocks, int64_t nsb, int rows,
               float* y, int64_t ldy, int64_t row0, RowGroupStreams<G> streams = {0}) {
    const int64_t nb = x.k / kQuantBlock;
    const __m256i nibble = _mm256_set1_epi32(0x0f);
    over_halves<TT, G>(blocks, nsb, streams.spacing, 8 * nsb, rows, y, ldy, t0, row0,
                       [&](const Q2_Kx16* group, int64_t b, int h, bool prefetch, __m256 (&acc)[TT]) {
        const Q2_Kx16& blk = group[b / 8];
        const int j = static_cast<int>(b % 8);
        if (prefetch) prefetch_weights(reinterpret_cast<const char*>(&blk) + sizeof blk / 8 * j, sizeof blk / 8);
        __m256i w[8];
        unpack_pairs<0>(blk.q2[j], h, w);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.d + 8 * h)));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.dmin + 8 * h)));
        const __m256i sm0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk.sm[2 * j] + 8 * h)));
        const __m256i sm1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(blk.sm[2 * j + 1] + 8 * h)));
        const __m256i sc0 = _mm256_and_si256(sm0, nibble), sc1 = _mm256_and_si256(sm1, nibble);
        const __m256i m0 = _mm256_srli_epi32(sm0, 4), m1 = _mm256_srli_epi32(sm1, 4);
        for (int t = 0; t < TT; ++t) {
            const int64_t token = t0 + t;
            const int8_t* a = x.q + token * x.k + b * kQuantBlock;
            const int32_t* s16 = x.sum16 + token * 2 * nb + 2 * b;
            const __m256i dot0 = dot16<4>(w, a, _mm256_setzero_si256());  // u <= 3
            const __m256i dot1 = dot16<4>(w + 4, a + 16, _mm256_setzero_si256());
            const __m256i scaled = _mm256_add_epi32(_mm256_mullo_epi32(sc0, dot0), _mm256_mullo_epi32(sc1, dot1));
            const __m256i mins = _mm256_add_epi32(_mm256_mullo_epi32(m0, _mm256_set1_epi32(s16[0])),
                                                  _mm256_mullo_epi32(m1, _mm256_set1_epi32(s16[1])));
            const __m256 dx = _mm256_set1_ps(x.d[token * nb + b]);
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, dx), _mm256_cvtepi32_ps(scaled), acc[t]);
            acc[t] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(mins), acc[t]);
        }
    });
}

// IQ4_XS: acc += (d dx) (sc dot(kIq4Values[u], a)) per sub-block of 32, as the scalar twin.
template <int TT, int G = 1>
void iq4_xs_tile(const QuantizedRows& x, int64_t t0, const IQ4_XSx16* blocks, int64_t nsb, int rows,
                 float* y, int64_t ldy, int64_t row0, RowGroupStreams<G> streams = {0}) {
    const int64_t nb = x.k / kQuantBlock;
    over_halves<TT, G>(blocks, nsb, streams.spacing, 8 * nsb, rows, y, ldy, t0, row0,
                       [&](const IQ4_XSx16* group, int64_t b, int h, bool prefetch, __m256 (&acc)[TT]) {
        const IQ4_XSx16& blk = group[b / 8];
        const int j = static_cast<int>(b % 8);
        if (prefetch) prefetch_weights(reinterpret_cast<const char*>(&blk) + sizeof blk / 8 * j, sizeof blk / 8);
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.d + 8 * h)));
        const __m256i sc = i8x8_to_epi32(blk.sc[j] + 8 * h);
        __m256i dots[TT];
        streamed_dots<1, true>(x.q + t0 * x.k + b * kQuantBlock, x.k,
                               [&](int c, __m256i* lo, __m256i* hi) { iq4_pair(blk.qs[j], h, c, lo, hi); }, dots);
        for (int t = 0; t < TT; ++t) {
            const int64_t token = t0 + t;
            const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(x.d[token * nb + b]));
            acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(_mm256_mullo_epi32(sc, dots[t])), acc[t]);
        }
    });
}

}  // namespace

void this_isa::quantize_row(const float* x, int64_t k, int8_t* q, float* d, int32_t* sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 infinity = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    for (int64_t b = 0; b < k / kQuantBlock; ++b) {
        __m256 v[4];
        __m256 amax = _mm256_setzero_ps();
        __m256 nonfinite = _mm256_setzero_ps();  // lanes where |x| is inf or NaN
        for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(x + b * kQuantBlock + 8 * i);
            const __m256 a = _mm256_andnot_ps(sign, v[i]);
            amax = _mm256_max_ps(amax, a);
            nonfinite = _mm256_or_ps(nonfinite, _mm256_cmp_ps(a, infinity, _CMP_NLT_UQ));
        }
        if (_mm256_movemask_ps(nonfinite) != 0) {  // the block is NaN, as in the scalar twin
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kQuantBlock), _mm256_setzero_si256());
            d[b] = std::numeric_limits<float>::quiet_NaN();
            sum[b] = 0;
            continue;
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float scale = _mm_cvtss_f32(m) / 127.0f;
        const __m256 inverse =
            _mm256_set1_ps(scale >= std::numeric_limits<float>::min() ? 1.0f / scale : 0.0f);
        __m256i qi[4];
        for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));  // ties to even
        // int32 -> int8 with in-lane packs, then undo the lane interleave
        const __m256i q16a = _mm256_packs_epi32(qi[0], qi[1]);
        const __m256i q16b = _mm256_packs_epi32(qi[2], qi[3]);
        const __m256i q8 = _mm256_packs_epi16(q16a, q16b);
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kQuantBlock), _mm256_permutevar8x32_epi32(q8, order));
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        d[b] = scale;
        sum[b] = _mm_cvtsi128_si32(s4);
    }
}

}  // namespace lfm
