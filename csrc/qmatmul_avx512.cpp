// AVX-512 VNNI int8-activation kernels: the packed 16-row blocks (packed.h) against int8
// activations with vpdpbusd; the tiles that qmatmul_impl.h runs over the row groups. Same bits
// as the scalar twins in qmatmul_scalar.cpp. Internal linkage for everything but the table
// entries (see kernels.h).
#include <immintrin.h>

#include <limits>

#include "formats.h"
#include "kernels.h"
#include "packed.h"
#include "qmatmul.h"
#include "reduce_avx512.h"

namespace lfm {
namespace {

namespace this_isa = avx512;
constexpr int kTokenTile = 4;  // tokens that share each unpacked weight block (prefill)
// Row groups a decode tile reads side by side (qmatmul_impl.h; over_groups): four streams from
// memory instead of one keep Sapphire Rapids' L2 streamer busier. A Q4_0 / Q8_0 / Q4_K GEMV from
// DRAM (`pytest bench/ -k gemv`, 2-core SPR VM): 16.0 / 20.2 / 14.6 GB/s with one stream, 21.5 /
// 23.7 / 20.9 with four on 1 thread; 33.1 / 42.6 / 29.3 and 35.9-47.5 / 43.2-48.9 / 45.2-46.4 on
// 2. On the Zen 4 VM they had made no difference to decode. (Those GEMV rates came from a 160 MB
// stack, which a VM's large reported L3 (480 MB on the AMX VMs) partly held: the four-stream
// rates are above the read probe's. The benchmark now sizes its stack from the cache.) From
// DRAM on the AMX VM (2026-12-03, interleaved builds, 8B-A1B decode on 1 / 2 threads): one
// stream 15.6-15.8 / 27.9-28.9 tok/s, four 17.1-17.7 / 30.1-31.8, eight 17.2-17.5 / 29.1-30.0.
// On AMD (kernels.h, DecodeStreaming) decode reads one row group at a time instead.
template <class Block>
constexpr int kDecodeStreams = 4;

static inline bool decode_side_by_side() { return decode_streaming() == DecodeStreaming::kPrefetchL2; }

// Asks for the weights ahead: prompts (and decode on Intel) into L2, decode on AMD
// non-temporally (kernels.h, DecodeStreaming; packed.h). A prompt's later token tiles find the
// row group's weights in cache, where the first tile left them, and ask for nothing.
struct PrefetchL2 {
    void operator()(const void* p, int64_t bytes) const { prefetch_weights(p, bytes); }
};
struct PrefetchNonTemporal {
    void operator()(const void* p, int64_t bytes) const { prefetch_weights_nontemporal(p, bytes); }
};
struct NoPrefetch {
    void operator()(const void*, int64_t) const {}
};

// body(prefetch) with the prefetch the tile of TT tokens from t0 asks for its weights with. The
// choice is made here, once a tile, and each kind compiled on its own: with a branch between two
// kinds in the block loop, gcc 12 dropped both prefetches.
template <int TT, class Body>
static inline void with_weight_prefetch(int64_t t0, const Body& body) {
    if (TT <= 2 && decode_streaming() == DecodeStreaming::kNonTemporal) {
        body(PrefetchNonTemporal{});
    } else if (TT > 2 && t0 > 0) {
        body(NoPrefetch{});
    } else {
        body(PrefetchL2{});
    }
}

// The lanes of rows 0 .. rows - 1 (rows <= 16).
static inline __mmask16 row_mask(int rows) { return static_cast<__mmask16>((1u << rows) - 1); }

// Runs `step` over the n_steps steps (blocks or sub-blocks) of one row group for TT tokens, each
// step adding to the TT accumulators of the group's 16 rows, then stores them. Decode (one to four
// tokens: qmatmul_impl.h, kStreamsFor) may run G full row groups side by side, `spacing` groups
// apart (their outputs 16 * spacing rows apart): G streams from memory at once instead of one,
// for the hardware prefetcher (kDecodeStreams). Each output is still the same sums in the same
// order, so G changes no bit.
// Each step gets the prefetch to ask for its weights ahead with (with_weight_prefetch).
template <int TT, int G, class Block, class Step>
static inline void over_groups(const Block* blocks, int64_t n_blocks, int64_t spacing, int64_t n_steps,
                               int rows, float* y, int64_t ldy, int64_t t0, int64_t row0, const Step& step) {
    static_assert(G == 1 || TT <= 4, "row groups side by side are for one to four tokens");
    with_weight_prefetch<TT>(t0, [&](auto prefetch) {
        __m512 acc[G][TT];
        for (int g = 0; g < G; ++g) {
            for (int t = 0; t < TT; ++t) acc[g][t] = _mm512_setzero_ps();
        }
        for (int64_t i = 0; i < n_steps; ++i) {
            for (int g = 0; g < G; ++g) step(blocks + g * spacing * n_blocks, i, acc[g], prefetch);
        }
        for (int g = 0; g < G; ++g) {
            float* out = y + t0 * ldy + row0 + g * spacing * kRowGroup;
            for (int t = 0; t < TT; ++t) _mm512_mask_storeu_ps(out + t * ldy, row_mask(rows), acc[g][t]);
        }
    });
}

static inline __m512i broadcast4(const int8_t* p) {  // 4 activation bytes into every lane
    int32_t v;
    std::memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

// acc + vpdpbusd(w, the 4 activation bytes at p in every lane), the broadcast folded into the
// instruction's memory operand ({1to16}): one instruction where the intrinsics make two, as gcc 12
// does not fold _mm512_set1_epi32 of a load into vpdpbusd. The same sums. Interleaved runs on the
// 2-core Zen 5 VM (`pytest bench/ -k "moe_gemm and avx512" --kernel-threads 1`, medians of 3 and
// 6 runs): the expert GEMM 87.0 -> 83.3 ms at Q4_0, Q4_K 91.5 -> 88.0, IQ4_XS 90.9 -> 84.0, Q8_0
// 95.4 -> 93.6; LFM2-350M pp512 on 1 thread 723-817 -> 808-855 tok/s. Not more: the tiles do not
// wait on issue alone (8 tokens a tile instead of 4 gained nothing either). The intrinsics where
// this unit is compiled without VNNI (the SIMDe emulation in tests/avx512_emulated/) or by a
// compiler without GNU inline assembly.
struct ActivationQuad {
    int8_t bytes[4];
};
static inline __m512i dpbusd_broadcast(__m512i acc, __m512i w, const int8_t* p) {
#if defined(__AVX512VNNI__) && defined(__GNUC__)
    asm("vpdpbusd %[a]%{1to16%}, %[w], %[acc]"
        : [acc] "+v"(acc)
        : [w] "v"(w), [a] "m"(*reinterpret_cast<const ActivationQuad*>(p)));
    return acc;
#else
    return _mm512_dpbusd_epi32(acc, w, broadcast4(p));
#endif
}

// Adds to dot[t] the exact integer dot products of one block's 8 operands (operand i = weights
// 4i .. 4i+3 of the 16 rows) with token t's 32 activations at a[t]. Four or more tokens hide
// vpdpbusd's latency with one chain each; fewer run two a token (even and odd operands). The
// sums are integers: their order changes no bit.
template <int TT>
static inline void add_block_dots(const __m512i w[8], const int8_t* const (&a)[TT], __m512i (&dot)[TT]) {
    if constexpr (TT >= 4) {
        for (int i = 0; i < 8; ++i) {
            for (int t = 0; t < TT; ++t) dot[t] = dpbusd_broadcast(dot[t], w[i], a[t] + 4 * i);
        }
    } else {
        for (int t = 0; t < TT; ++t) {
            __m512i odd = _mm512_setzero_si512();
            for (int i = 0; i < 8; i += 2) {
                dot[t] = dpbusd_broadcast(dot[t], w[i], a[t] + 4 * i);
                odd = dpbusd_broadcast(odd, w[i + 1], a[t] + 4 * i + 4);
            }
            dot[t] = _mm512_add_epi32(dot[t], odd);
        }
    }
}

// 64 bytes of weights loaded once, into a register. Without the empty asm, gcc 12 folds the load
// into every instruction that reads it: the nibble split's vpsrlw and vpandd each read the same
// 64 bytes from memory, twice the loads (four times for the 2-bit fields of unpack_pairs). On the
// 2-core Zen 5 VM that held a Q4_0 prompt tile (1792 x 2048 weights, 64 tokens, one thread) to
// 268 GMAC/s against 311 with one load (clang makes one load of the intrinsics as they are);
// interleaved pp512 runs: LFM2-8B-A1B 174-185 -> 188-197 tok/s on 1 thread, LFM2-350M 1417-1566
// -> 1574-1729 on 2. Decode, which waits on DRAM, moved within its noise.
static inline __m512i load_once(const void* p) {
    __m512i v = _mm512_loadu_si512(p);
#if defined(__AVX512F__) && defined(__GNUC__)
    asm("" : "+v"(v));
#endif
    return v;
}

// The 8 VNNI operands of a Q4_0x16-style nibble array qs[256] (operand o = weights 4o..4o+3).
static inline void unpack_nibbles(const uint8_t* qs, __m512i w[8]) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    for (int c = 0; c < 4; ++c) {
        const __m512i v = load_once(qs + 64 * c);
        w[c] = _mm512_and_si512(v, low);
        w[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
}

// The 8 VNNI operands of one block: [16 rows][4 weights] as unsigned bytes, for weight
// quads 0..7 (weights 4i .. 4i+3). Returns the offset every weight carries.
static inline int32_t unpack(const Q4_0x16& blk, __m512i w[8]) {
    unpack_nibbles(blk.qs, w);
    return 8;
}
static inline int32_t unpack(const Q8_0x16& blk, __m512i w[8]) {
    for (int i = 0; i < 8; ++i) w[i] = _mm512_loadu_si512(blk.qs + 64 * i);
    return 128;
}

// Adds `value` to the bytes of operand o whose bit is set in its 64-bit mask qh[8o .. 8o+7].
static inline void add_mask_bits(const uint8_t* qh, int8_t value, __m512i w[8]) {
    const __m512i v = _mm512_set1_epi8(value);
    for (int o = 0; o < 8; ++o) {
        uint64_t bits;
        std::memcpy(&bits, qh + 8 * o, sizeof bits);
        w[o] = _mm512_mask_add_epi8(w[o], _cvtu64_mask64(bits), w[o], v);
    }
}

// IQ4's 16 levels plus 128, as unsigned bytes for vpdpbusd, in every 128-bit lane for vpshufb.
static inline __m512i iq4_table() {
    const __m128i levels = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Values));
    return _mm512_broadcast_i32x4(_mm_xor_si128(levels, _mm_set1_epi8(static_cast<char>(0x80))));
}

// The nibbles of qs[256] looked up in IQ4's table: operands of kIq4Values[u] + 128.
static inline void unpack_iq4(const uint8_t* qs, __m512i w[8]) {
    const __m512i table = iq4_table();
    unpack_nibbles(qs, w);
    for (int o = 0; o < 8; ++o) w[o] = _mm512_shuffle_epi8(table, w[o]);
}

static inline int32_t unpack(const Q4_1x16& blk, __m512i w[8]) {
    unpack_nibbles(blk.qs, w);
    return 0;
}
static inline int32_t unpack(const Q5_0x16& blk, __m512i w[8]) {
    unpack_nibbles(blk.qs, w);
    add_mask_bits(blk.qh, 16, w);
    return 16;
}
static inline int32_t unpack(const Q5_1x16& blk, __m512i w[8]) {
    unpack_nibbles(blk.qs, w);
    add_mask_bits(blk.qh, 16, w);
    return 0;
}
static inline int32_t unpack(const IQ4_NLx16& blk, __m512i w[8]) {
    unpack_iq4(blk.qs, w);
    return 128;
}

// Tokens [t0, t0 + TT) against one row group (nb blocks), into y columns row0 .. row0 + rows - 1.
template <class Block, int TT, int G = 1>
void row_group_tile(const QuantizedRows& x, int64_t t0, const Block* blocks, int64_t nb,
                    int rows, float* y, int64_t ldy, int64_t row0, RowGroupStreams<G> streams = {0}) {
    over_groups<TT, G>(blocks, nb, streams.spacing, nb, rows, y, ldy, t0, row0,
                       [&](const Block* group, int64_t b, __m512 (&acc)[TT], auto prefetch) {
        const Block& blk = group[b];
        prefetch(&blk, sizeof(Block));
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.d)));
        __m512i w[8];
        const int32_t offset = unpack(blk, w);
        const int8_t* a[TT];
        __m512i dot[TT];
        for (int t = 0; t < TT; ++t) {
            a[t] = x.q + (t0 + t) * x.k + b * kQuantBlock;
            dot[t] = _mm512_set1_epi32(-offset * x.sum[(t0 + t) * nb + b]);
        }
        add_block_dots(w, a, dot);
        for (int t = 0; t < TT; ++t) {
            const int64_t token = t0 + t;
            const __m512 dx = _mm512_set1_ps(x.d[token * nb + b]);
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(dot[t]), acc[t]);
            if constexpr (kHasMin<Block>) {
                const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.m)));
                const __m512 a_sum = _mm512_set1_ps(static_cast<float>(x.sum[token * nb + b]));
                acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(mw, dx), a_sum, acc[t]);
            }
        }
    });
}

// ---- K-quants: one Q4_Kx16 / Q5_Kx16 / Q6_Kx16 per 16 rows x 256 columns (packed.h)

static inline const Q4_Kx16& low_part(const Q4_Kx16& blk) { return blk; }
static inline const Q4_Kx16& low_part(const Q5_Kx16& blk) { return blk.low; }

// Sub-block j's operands: the nibbles, plus 16 where Q5_K's bit 4 is set (one masked add).
static inline void unpack_k(const Q4_Kx16& blk, int j, __m512i w[8]) { unpack_nibbles(blk.qs[j], w); }
static inline void unpack_k(const Q5_Kx16& blk, int j, __m512i w[8]) {
    unpack_nibbles(blk.low.qs[j], w);
    add_mask_bits(blk.qh[j], 16, w);
}

static inline __m512 u8x16_to_ps(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Q4_K / Q5_K, tokens [t0, t0 + TT): acc += (s dx) dot - (mn dx) sum(a), per sub-block of 32.
template <class Block, int TT, int G = 1>
void k_affine_tile(const QuantizedRows& x, int64_t t0, const Block* blocks, int64_t nsb,
                   int rows, float* y, int64_t ldy, int64_t row0, RowGroupStreams<G> streams = {0}) {
    const int64_t nb = x.k / kQuantBlock;
    over_groups<TT, G>(blocks, nsb, streams.spacing, 8 * nsb, rows, y, ldy, t0, row0,
                       [&](const Block* group, int64_t b, __m512 (&acc)[TT], auto prefetch) {
        const Block& blk = group[b / 8];
        const int j = static_cast<int>(b % 8);
        prefetch(reinterpret_cast<const char*>(&blk) + sizeof blk / 8 * j, sizeof blk / 8);
        const Q4_Kx16& low = low_part(blk);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(low.d)));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(low.dmin)));
        const __m512 scale = _mm512_mul_ps(d, u8x16_to_ps(low.sc[j]));  // exact
        const __m512 min = _mm512_mul_ps(dmin, u8x16_to_ps(low.m[j]));  // exact
        __m512i w[8];
        unpack_k(blk, j, w);
        const int8_t* a[TT];
        __m512i dot[TT];
        for (int t = 0; t < TT; ++t) {
            a[t] = x.q + (t0 + t) * x.k + b * kQuantBlock;
            dot[t] = _mm512_setzero_si512();
        }
        add_block_dots(w, a, dot);
        for (int t = 0; t < TT; ++t) {
            const int64_t token = t0 + t;
            const __m512 dx = _mm512_set1_ps(x.d[token * nb + b]);
            const __m512 sum = _mm512_set1_ps(static_cast<float>(x.sum[token * nb + b]));
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(scale, dx), _mm512_cvtepi32_ps(dot[t]), acc[t]);
            acc[t] = _mm512_fnmadd_ps(_mm512_mul_ps(min, dx), sum, acc[t]);
        }
    });
}

// The 2-bit fields of a Q6_Kx16.qh-style q2[128] (operand 4v + s at bits 2s, 2s+1 of the
// bytes at 64 v), each moved to bits `shift`, shift + 1 of operand w[4v + s]'s bytes, the rest 0.
template <int kShift>
static inline void unpack_pairs(const uint8_t* q2, __m512i w[8]) {
    const __m512i two_bits = _mm512_set1_epi8(static_cast<char>(3 << kShift));
    for (int v = 0; v < 2; ++v) {
        const __m512i h = load_once(q2 + 64 * v);
        for (int s4 = 0; s4 < 4; ++s4) {
            const int move = kShift - 2 * s4;  // 16-bit shifts: the mask drops the neighbours' bits
            const __m512i moved = move >= 0 ? _mm512_slli_epi16(h, static_cast<unsigned>(move))
                                            : _mm512_srli_epi16(h, static_cast<unsigned>(-move));
            w[4 * v + s4] = _mm512_and_si512(moved, two_bits);
        }
    }
}

// Block j's operands, unsigned, and the offset of every quant (weight = sc * (u - offset)).
static inline int32_t unpack_scaled16(const Q6_Kx16& blk, int j, __m512i w[8]) {
    __m512i high[8];
    unpack_nibbles(blk.ql[j], w);
    unpack_pairs<4>(blk.qh[j], high);
    for (int o = 0; o < 8; ++o) w[o] = _mm512_or_si512(w[o], high[o]);
    return 32;
}
static inline int32_t unpack_scaled16(const Q3_Kx16& blk, int j, __m512i w[8]) {
    unpack_pairs<0>(blk.q2[j], w);
    add_mask_bits(blk.qh[j], 4, w);
    return 4;
}

// Q6_K / Q3_K, tokens [t0, t0 + TT): acc += (d dx) (sc0 (dot0 - off sum0) + sc1 (dot1 - off sum1)).
template <class Block, int TT, int G = 1>
void scaled16_tile(const QuantizedRows& x, int64_t t0, const Block* blocks, int64_t nsb,
                   int rows, float* y, int64_t ldy, int64_t row0, RowGroupStreams<G> streams = {0}) {
    const int64_t nb = x.k / kQuantBlock;
    over_groups<TT, G>(blocks, nsb, streams.spacing, 8 * nsb, rows, y, ldy, t0, row0,
                       [&](const Block* group, int64_t b, __m512 (&acc)[TT], auto prefetch) {
        const Block& blk = group[b / 8];
        const int j = static_cast<int>(b % 8);
        prefetch(reinterpret_cast<const char*>(&blk) + sizeof blk / 8 * j, sizeof blk / 8);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.d)));
        __m512i w[8];
        const int32_t offset = unpack_scaled16(blk, j, w);
        const __m512i sc0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.sc[2 * j])));
        const __m512i sc1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.sc[2 * j + 1])));
        for (int t = 0; t < TT; ++t) {
            const int64_t token = t0 + t;
            const int8_t* a = x.q + token * x.k + b * kQuantBlock;
            const int32_t* s16 = x.sum16 + token * 2 * nb + 2 * b;
            __m512i dot0 = _mm512_set1_epi32(-offset * s16[0]);
            __m512i dot1 = _mm512_set1_epi32(-offset * s16[1]);
            for (int i = 0; i < 4; ++i) {
                dot0 = dpbusd_broadcast(dot0, w[i], a + 4 * i);
                dot1 = dpbusd_broadcast(dot1, w[i + 4], a + 16 + 4 * i);
            }
            const __m512i combined = _mm512_add_epi32(_mm512_mullo_epi32(sc0, dot0), _mm512_mullo_epi32(sc1, dot1));
            const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(x.d[token * nb + b]));
            acc[t] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(combined), acc[t]);
        }
    });
}

// Q2_K, tokens [t0, t0 + TT): acc += (d dx) (sc0 dot0 + sc1 dot1) - (dmin dx) (m0 sum0 + m1 sum1).
template <int TT, int G = 1>
void q2_k_tile(const QuantizedRows& x, int64_t t0, const Q2_Kx16* blocks, int64_t nsb,
               int rows, float* y, int64_t ldy, int64_t row0, RowGroupStreams<G> streams = {0}) {
    const int64_t nb = x.k / kQuantBlock;
    const __m512i nibble = _mm512_set1_epi32(0x0f);
    over_groups<TT, G>(blocks, nsb, streams.spacing, 8 * nsb, rows, y, ldy, t0, row0,
                       [&](const Q2_Kx16* group, int64_t b, __m512 (&acc)[TT], auto prefetch) {
        const Q2_Kx16& blk = group[b / 8];
        const int j = static_cast<int>(b % 8);
        prefetch(reinterpret_cast<const char*>(&blk) + sizeof blk / 8 * j, sizeof blk / 8);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.d)));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.dmin)));
        __m512i w[8];
        unpack_pairs<0>(blk.q2[j], w);
        const __m512i sm0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.sm[2 * j])));
        const __m512i sm1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.sm[2 * j + 1])));
        const __m512i sc0 = _mm512_and_si512(sm0, nibble), sc1 = _mm512_and_si512(sm1, nibble);
        const __m512i m0 = _mm512_srli_epi32(sm0, 4), m1 = _mm512_srli_epi32(sm1, 4);
        for (int t = 0; t < TT; ++t) {
            const int64_t token = t0 + t;
            const int8_t* a = x.q + token * x.k + b * kQuantBlock;
            const int32_t* s16 = x.sum16 + token * 2 * nb + 2 * b;
            __m512i dot0 = _mm512_setzero_si512();
            __m512i dot1 = _mm512_setzero_si512();
            for (int i = 0; i < 4; ++i) {
                dot0 = dpbusd_broadcast(dot0, w[i], a + 4 * i);
                dot1 = dpbusd_broadcast(dot1, w[i + 4], a + 16 + 4 * i);
            }
            const __m512i scaled = _mm512_add_epi32(_mm512_mullo_epi32(sc0, dot0), _mm512_mullo_epi32(sc1, dot1));
            const __m512i mins = _mm512_add_epi32(_mm512_mullo_epi32(m0, _mm512_set1_epi32(s16[0])),
                                                  _mm512_mullo_epi32(m1, _mm512_set1_epi32(s16[1])));
            const __m512 dx = _mm512_set1_ps(x.d[token * nb + b]);
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(d, dx), _mm512_cvtepi32_ps(scaled), acc[t]);
            acc[t] = _mm512_fnmadd_ps(_mm512_mul_ps(dmin, dx), _mm512_cvtepi32_ps(mins), acc[t]);
        }
    });
}

// IQ4_XS, tokens [t0, t0 + TT): acc += (d dx) (sc (dot(kIq4Values[u] + 128, a) - 128 sum(a))).
template <int TT, int G = 1>
void iq4_xs_tile(const QuantizedRows& x, int64_t t0, const IQ4_XSx16* blocks, int64_t nsb,
                 int rows, float* y, int64_t ldy, int64_t row0, RowGroupStreams<G> streams = {0}) {
    const int64_t nb = x.k / kQuantBlock;
    over_groups<TT, G>(blocks, nsb, streams.spacing, 8 * nsb, rows, y, ldy, t0, row0,
                       [&](const IQ4_XSx16* group, int64_t b, __m512 (&acc)[TT], auto prefetch) {
        const IQ4_XSx16& blk = group[b / 8];
        const int j = static_cast<int>(b % 8);
        prefetch(reinterpret_cast<const char*>(&blk) + sizeof blk / 8 * j, sizeof blk / 8);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.d)));
        __m512i w[8];
        unpack_iq4(blk.qs[j], w);
        const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk.sc[j])));
        const int8_t* a[TT];
        __m512i dot[TT];
        for (int t = 0; t < TT; ++t) {
            a[t] = x.q + (t0 + t) * x.k + b * kQuantBlock;
            dot[t] = _mm512_set1_epi32(-128 * x.sum[(t0 + t) * nb + b]);
        }
        add_block_dots(w, a, dot);
        for (int t = 0; t < TT; ++t) {
            const __m512i combined = _mm512_mullo_epi32(sc, dot[t]);
            const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(x.d[(t0 + t) * nb + b]));
            acc[t] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(combined), acc[t]);
        }
    });
}

// One block of 32 activations: q = round(x / d) with d = max|x| / 127 (and q = 0 where d is below
// the normal floats), sum = the sum of q; a block with an inf or NaN gets q = 0, d = NaN, sum = 0,
// as in the scalar twin. The reductions over a block's lanes are in-register shuffles.
static inline void quantize_block(const float* x, int8_t* q, float* d, int32_t* sum) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    const __m512 infinity = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    const __m512 lo = _mm512_loadu_ps(x);
    const __m512 hi = _mm512_loadu_ps(x + 16);
    const __m512 abs_lo = _mm512_andnot_ps(sign, lo), abs_hi = _mm512_andnot_ps(sign, hi);
    const __mmask16 nonfinite = _mm512_cmp_ps_mask(abs_lo, infinity, _CMP_NLT_UQ) |
                                _mm512_cmp_ps_mask(abs_hi, infinity, _CMP_NLT_UQ);
    if (nonfinite != 0) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_setzero_si256());
        *d = std::numeric_limits<float>::quiet_NaN();
        *sum = 0;
        return;
    }
    const float scale = _mm512_reduce_max_ps(_mm512_max_ps(abs_lo, abs_hi)) / 127.0f;
    const __m512 inverse = _mm512_set1_ps(scale >= std::numeric_limits<float>::min() ? 1.0f / scale : 0.0f);
    // cvtps rounds to nearest even (the default MXCSR mode), like nearbyint in the twin
    const __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
    const __m512i q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(q_lo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(q_hi));
    *d = scale;
    *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
}

}  // namespace

namespace avx512 {

// 16 blocks (512 activations) at a time: their maxima and sums reduced together (reduce16), the
// scales and their inverses as one vector each (the same IEEE divisions as one block at a time),
// and two blocks' int8 values packed with one permute. The same bits as quantize_block, which
// takes the blocks left over and any 16 with an inf or NaN among them. The maximum is taken over
// the absolute values' bits as integers: the same order as the floats for finite values, and
// inf and NaN bits are above every finite one.
void quantize_row(const float* x, int64_t k, int8_t* q, float* d, int32_t* sum) {
    constexpr int kBlocks = 16;
    const int64_t nb = k / kQuantBlock;
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    const __m512i max_finite = _mm512_set1_epi32(0x7f7fffff);
    const __m512i pack_order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    auto max32 = [](__m512i a, __m512i b) { return _mm512_max_epi32(a, b); };
    auto add32 = [](__m512i a, __m512i b) { return _mm512_add_epi32(a, b); };
    int64_t b0 = 0;
    for (; b0 + kBlocks <= nb; b0 += kBlocks) {
        const float* xb = x + b0 * kQuantBlock;
        __m512i amax[kBlocks];
        for (int b = 0; b < kBlocks; ++b) {
            const __m512i lo = _mm512_and_si512(_mm512_loadu_si512(xb + b * kQuantBlock), magnitude);
            const __m512i hi = _mm512_and_si512(_mm512_loadu_si512(xb + b * kQuantBlock + 16), magnitude);
            amax[b] = _mm512_max_epi32(lo, hi);
        }
        const __m512i top = reduce16(amax, max32);
        if (_mm512_cmpgt_epi32_mask(top, max_finite) != 0) {  // an inf or NaN: block by block
            for (int b = 0; b < kBlocks; ++b) {
                const int64_t i = b0 + b;
                quantize_block(x + i * kQuantBlock, q + i * kQuantBlock, d + i, sum + i);
            }
            continue;
        }
        const __m512 scale = _mm512_div_ps(_mm512_castsi512_ps(top), _mm512_set1_ps(127.0f));
        const __mmask16 normal = _mm512_cmp_ps_mask(scale, _mm512_set1_ps(std::numeric_limits<float>::min()), _CMP_GE_OQ);
        alignas(64) float inverse[kBlocks];
        _mm512_store_ps(inverse, _mm512_maskz_div_ps(normal, _mm512_set1_ps(1.0f), scale));
        __m512i sums[kBlocks];
        for (int b = 0; b < kBlocks; b += 2) {
            __m512i v[4];  // blocks b and b + 1, low and high halves
            for (int j = 0; j < 4; ++j) {
                const __m512 xs = _mm512_loadu_ps(xb + b * kQuantBlock + 16 * j);
                // cvtps rounds to nearest even (the default MXCSR mode), like nearbyint in the twin
                v[j] = _mm512_cvtps_epi32(_mm512_mul_ps(xs, _mm512_set1_ps(inverse[b + j / 2])));
            }
            sums[b] = _mm512_add_epi32(v[0], v[1]);
            sums[b + 1] = _mm512_add_epi32(v[2], v[3]);
            // |v| <= 127: the saturating packs keep every value; they interleave 128-bit lanes,
            // which the permute puts back in order
            const __m512i bytes = _mm512_packs_epi16(_mm512_packs_epi32(v[0], v[1]), _mm512_packs_epi32(v[2], v[3]));
            _mm512_storeu_si512(q + (b0 + b) * kQuantBlock, _mm512_permutexvar_epi32(pack_order, bytes));
        }
        _mm512_storeu_ps(d + b0, scale);
        _mm512_storeu_si512(sum + b0, reduce16(sums, add32));
    }
    for (int64_t i = b0; i < nb; ++i) quantize_block(x + i * kQuantBlock, q + i * kQuantBlock, d + i, sum + i);
}

}  // namespace avx512
}  // namespace lfm

#include "qmatmul_impl.h"
