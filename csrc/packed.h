// The compute layouts every quantized type is repacked into once, at load (pack.cpp), for the
// int8-activation kernels (qmatmul_*.cpp).
//
// GGUF stores a matrix row by row, one 32-weight block after another. The kernels instead want
// 16 rows side by side, so that one 64-byte load feeds the 16 int32 lanes of a VNNI dot
// product (4 consecutive weights of each row per lane) while the activation is broadcast.
// So rows are taken in groups of 16 (the last group padded with zero rows), and each group is
// stored as its k/32 blocks in K order, one "x16" block per 32 columns:
//
//   packed matrix = [ceil(n/16) row groups][k/32 blocks] of Q4_0x16, Q8_0x16, ... (32-weight types)
//
// A kernel streams one row group linearly from start to end. Scales stay fp16, as on disk, so
// the packed matrix is as large as the file's (plus padding rows; Q3_K, Q4_K and IQ4_XS widen
// their 6-bit sub-block scales to bytes, +1.5-3.6%): decode reads about the bytes the file holds.
#pragma once

#include <cstdint>

#include "qtypes.h"

namespace lfm {

constexpr int64_t kRowGroup = 16;  // rows interleaved in one packed block

// The version of these layouts. Packed matrices saved to disk (lfm_edge/weight_cache.py) name
// the version they were made in and are not read by another: change it with any layout below.
// tests/test_weight_cache.py pins a digest of every type's packing to it.
constexpr int kPackFormat = 1;

// G full row groups that a decode tile reads side by side, `spacing` row groups apart (see
// qmatmul_impl.h: kDecodeStreams).
template <int G>
struct RowGroupStreams {
    int64_t spacing;
};

// 16 rows x 32 weights of Q4_0. Weight i of row r is d[r] * (u - 8), with the unsigned
// nibble u stored at qs[64 * c + 4 * r + j]: low nibble for i = 4c + j, high nibble for
// i = 16 + 4c + j (c < 4, j < 4). So the low nibbles of the 64 bytes at qs + 64c are the
// [16 rows][4 weights] VNNI operand for weights 4c..4c+3, the high nibbles that for
// 16+4c..16+4c+3; and byte (c, r, j) is byte 4c + j of row r's GGUF block.
struct Q4_0x16 {
    uint16_t d[kRowGroup];      // fp16 scale of each row
    uint8_t qs[kRowGroup * 16];  // [4][16 rows][4] nibble pairs
};
static_assert(sizeof(Q4_0x16) == 288, "Q4_0x16 must stay 16 rows x 18 bytes, unpadded");

// 16 rows x 32 weights of Q8_0. Weight i = 4q + j of row r is d[r] * w with w the int8 stored
// as the byte qs[64 * q + 4 * r + j] = w + 128 (offset so VNNI's u8 x s8 takes it; the kernels
// subtract 128 * sum(activations) per block).
struct Q8_0x16 {
    uint16_t d[kRowGroup];      // fp16 scale of each row
    uint8_t qs[kRowGroup * 32];  // [8][16 rows][4] offset bytes
};
static_assert(sizeof(Q8_0x16) == 544, "Q8_0x16 must stay 16 rows x 34 bytes, unpadded");

// The other 32-weight formats keep Q4_0x16's nibble layout and add what their block adds:
//   Q4_1: the fp16 min m of each row: weight = d * u + m, u = the nibble (0..15).
//   Q5_0 / Q5_1: bit 4 of every weight as 8 little-endian 64-bit masks, one per VNNI operand
//     (weights 4o .. 4o+3 of the 16 rows, o < 8): bit 4r + t of qh[8o .. 8o+7] is bit 4 of weight
//     4o + t of row r, so the AVX-512 kernel adds 16 to that operand's bytes in one masked add.
//     Q5_0: weight = d * (u - 16); Q5_1: weight = d * u + m (u in 0..31).
//   IQ4_NL: weight = d * kIq4Values[u]; the kernels look the nibble up in that 16-entry table
//     (pshufb), so the packed block is Q4_0x16's.
// All are the file's bytes moved (lossless), 16 times the file's block.
struct Q4_1x16 {
    uint16_t d[kRowGroup];
    uint16_t m[kRowGroup];       // fp16 min of each row
    uint8_t qs[kRowGroup * 16];  // as Q4_0x16.qs
};
struct Q5_0x16 {
    uint16_t d[kRowGroup];
    uint8_t qh[64];              // bit 4 of each weight, one 64-bit mask per operand
    uint8_t qs[kRowGroup * 16];  // low 4 bits, as Q4_0x16.qs
};
struct Q5_1x16 {
    uint16_t d[kRowGroup];
    uint16_t m[kRowGroup];
    uint8_t qh[64];
    uint8_t qs[kRowGroup * 16];
};
struct IQ4_NLx16 {
    uint16_t d[kRowGroup];
    uint8_t qs[kRowGroup * 16];  // table indices, as Q4_0x16.qs
};

// The 32-weight blocks whose weights are d * u + m (the kernels add (m dx) sum(a) per block).
template <class Block>
constexpr bool kHasMin = false;
template <>
constexpr bool kHasMin<Q4_1x16> = true;
template <>
constexpr bool kHasMin<Q5_1x16> = true;

// ---- K-quants (Q4_K, Q5_K, Q6_K): one x16 block per 16 rows x 256 columns (a super-block)
//
//   packed matrix = [ceil(n/16) row groups][k/256 super-blocks] of Q4_Kx16 / Q5_Kx16 / Q6_Kx16
//
// Every conversion below is LOSSLESS: the packed block holds exactly the integers of the GGUF
// block (the quants, the 6-bit or int8 sub-block scales and mins, the fp16 super-block scales),
// only moved around, and the 6-bit scales widened to a byte each. The kernels rebuild the
// float32 sub-block scale s = d * sc and min mn = dmin * m, which are exact in float32 (an 11-bit
// fp16 mantissa times an integer below 2^7), and compute per 32 activations
//   Q4_K / Q5_K:  s * dx * dot(q, a) - mn * dx * sum(a)       (two float32 FMAs)
//   Q6_K:         d * dx * (sc0 * (dot0(q, a) - 32 sum0(a)) + sc1 * (dot1 - 32 sum1))
// where the Q6_K bracket is an exact integer (|.| < 2^24, so its float32 conversion is exact
// too): both 16-value int8 scales are applied exactly, no folding to one scale per 32. The only
// rounding on top of the int8 activations is therefore the float32 accumulation (as Q4_0).
// Note for tests: gguf's float32 dequantization rounds s * q - mn once (Q4_K / Q5_K; <= 2^-24
// relative of each weight); the packed kernels use the unrounded value. Q6_K's dequantized
// weights are exact.
//
// Sizes per row and super-block: Q4_K 148 bytes (file: 144; the 12 bytes of 6-bit scales become
// 16), Q5_K 180 (176), Q6_K 210 (210).

// Q4_K, 16 rows x 256 weights. Weight 32 j + i of row r is
//   fp16(d[r]) * sc[j][r] * u - fp16(dmin[r]) * m[j][r]
// with u the nibble in qs[j] at the position Q4_0x16 uses for weight i (qs[j][64 c + 4 r + t]:
// low nibble for i = 4c + t, high nibble for i = 16 + 4c + t). No offset: u is 0..15.
struct Q4_Kx16 {
    uint16_t d[kRowGroup];         // fp16 super-block scale of each row
    uint16_t dmin[kRowGroup];      // fp16 super-block min scale of each row
    uint8_t sc[8][kRowGroup];      // 6-bit scale of sub-block j, row r
    uint8_t m[8][kRowGroup];       // 6-bit min of sub-block j, row r
    uint8_t qs[8][kRowGroup * 16];  // per sub-block, as Q4_0x16.qs
};
static_assert(sizeof(Q4_Kx16) == 16 * 148, "Q4_Kx16 must stay 16 rows x 148 bytes, unpadded");

// Q5_K: Q4_Kx16 plus bit 4 of every weight. Within sub-block j, the 8 VNNI operands (weights
// 4i .. 4i+3 of the 16 rows, i < 8, the low nibbles as Q4_Kx16 lays them out) each get a 64-bit
// little-endian mask qh[j][8 i .. 8 i + 7] whose bit 4 r + t is bit 4 of weight 4i + t of row r:
// the AVX-512 kernel adds 16 to the bytes of that mask in one masked add.
struct Q5_Kx16 {
    Q4_Kx16 low;
    uint8_t qh[8][64];
};
static_assert(sizeof(Q5_Kx16) == 16 * 180, "Q5_Kx16 must stay 16 rows x 180 bytes, unpadded");

// Q6_K, 16 rows x 256 weights in 8 blocks of 32. Weight 32 b + i of row r is
//   fp16(d[r]) * sc[2b + i / 16][r] * (u - 32),  u = low | high << 4 in 0..63,
// with `low` the nibble in ql[b] at Q4_0x16's position for weight i, and `high` 2 bits in
// qh[b]: VNNI operand o (weights 4o .. 4o+3, o < 8) takes bits 2s, 2s+1 of the byte
// qh[b][64 v + 4 r + t] for o = 4v + s. Operands 0-3 are the first 16 weights (scale sc[2b]),
// 4-7 the second (sc[2b + 1]).
struct Q6_Kx16 {
    uint16_t d[kRowGroup];          // fp16 super-block scale of each row
    int8_t sc[16][kRowGroup];       // int8 scale of 16-weight sub-block i, row r
    uint8_t ql[8][kRowGroup * 16];  // low 4 bits, as Q4_0x16.qs
    uint8_t qh[8][kRowGroup * 8];   // high 2 bits, 4 operands per byte
};
static_assert(sizeof(Q6_Kx16) == 16 * 210, "Q6_Kx16 must stay 16 rows x 210 bytes, unpadded");

// ---- Q2_K, Q3_K, IQ4_XS: one x16 block per 16 rows x 256 columns, as the K-quants above.
//
// Q2_K and Q3_K have 2-bit fields: block b (32 weights, b < 8) of a super-block keeps them in
// q2[b][128] as Q6_Kx16.qh keeps its top 2 bits: operand o (weights 4o .. 4o+3) = 4v + s takes
// bits 2s, 2s+1 of byte q2[b][64 v + 4 r + t]. The kernels apply the scales of both 16-weight
// halves of a block exactly, as for Q6_K:
//   Q2_K:  (d dx) (sc0 dot0 + sc1 dot1) - (dmin dx) (m0 sum0 + m1 sum1)
//   Q3_K:  (d dx) (sc0 (dot0 - 4 sum0) + sc1 (dot1 - 4 sum1))
//   IQ4_XS: (d dx) (sc dot(kIq4Values[u], a)), one scale per 32 weights
// with integer brackets (below 2^24 in magnitude: exact in float32).

// Q2_K, 16 rows x 256 weights. Weight 32 b + i of row r is
//   fp16(d[r]) * (sm[2b + i/16][r] & 15) * u - fp16(dmin[r]) * (sm[2b + i/16][r] >> 4)
// with u (0..3) in q2[b] as above. sm is the file's scale byte. 16 x 84 bytes: the file's size.
struct Q2_Kx16 {
    uint16_t d[kRowGroup];
    uint16_t dmin[kRowGroup];
    uint8_t sm[16][kRowGroup];    // scale (low nibble) and min (high) of 16-weight sub-block i
    uint8_t q2[8][kRowGroup * 8];  // 2-bit quants, 4 operands per byte
};

// Q3_K, 16 rows x 256 weights. Weight 32 b + i of row r is fp16(d[r]) * sc[2b + i/16][r] * (u - 4)
// with u = q2 | high << 2 (0..7): q2 in q2[b] as above, high in qh[b] as Q5_0x16.qh. The 6-bit
// scales are widened to int8 (16 x 114 bytes; the file: 110).
struct Q3_Kx16 {
    uint16_t d[kRowGroup];
    int8_t sc[16][kRowGroup];      // scale - 32 of 16-weight sub-block i
    uint8_t q2[8][kRowGroup * 8];  // low 2 bits
    uint8_t qh[8][64];             // bit 2, one 64-bit mask per operand
};

// IQ4_XS, 16 rows x 256 weights. Weight 32 j + i of row r is fp16(d[r]) * sc[j][r] *
// kIq4Values[u], u in qs[j] as Q4_0x16.qs. The 6-bit scales are widened to int8 (16 x 138
// bytes; the file: 136).
struct IQ4_XSx16 {
    uint16_t d[kRowGroup];
    int8_t sc[8][kRowGroup];        // scale - 32 of 32-weight sub-block j
    uint8_t qs[8][kRowGroup * 16];  // table indices
};

// Every packed block against the type table.
static_assert(sizeof(Q4_0x16) == qtype_info(QType::Q4_0).packed_bytes, "Q4_0x16 size");
static_assert(sizeof(Q4_1x16) == qtype_info(QType::Q4_1).packed_bytes, "Q4_1x16 size");
static_assert(sizeof(Q5_0x16) == qtype_info(QType::Q5_0).packed_bytes, "Q5_0x16 size");
static_assert(sizeof(Q5_1x16) == qtype_info(QType::Q5_1).packed_bytes, "Q5_1x16 size");
static_assert(sizeof(Q8_0x16) == qtype_info(QType::Q8_0).packed_bytes, "Q8_0x16 size");
static_assert(sizeof(IQ4_NLx16) == qtype_info(QType::IQ4_NL).packed_bytes, "IQ4_NLx16 size");
static_assert(sizeof(Q2_Kx16) == qtype_info(QType::Q2_K).packed_bytes, "Q2_Kx16 size");
static_assert(sizeof(Q3_Kx16) == qtype_info(QType::Q3_K).packed_bytes, "Q3_Kx16 size");
static_assert(sizeof(Q4_Kx16) == qtype_info(QType::Q4_K).packed_bytes, "Q4_Kx16 size");
static_assert(sizeof(Q5_Kx16) == qtype_info(QType::Q5_K).packed_bytes, "Q5_Kx16 size");
static_assert(sizeof(Q6_Kx16) == qtype_info(QType::Q6_K).packed_bytes, "Q6_Kx16 size");
static_assert(sizeof(IQ4_XSx16) == qtype_info(QType::IQ4_XS).packed_bytes, "IQ4_XSx16 size");

static inline int64_t row_groups(int64_t n) { return (n + kRowGroup - 1) / kRowGroup; }

// The kernels stream a packed matrix once per decode step, from DRAM: the hardware prefetcher
// alone keeps too few lines in flight. Each block asks for the bytes kPrefetchAhead past it, into
// L2 (prefetcht1: an L1 prefetch would hold one of the core's few L1 miss buffers until the line
// lands). Measured on the 2-core Sapphire Rapids VM, Q4_0 GEMV over matrices 100x the L2:
// 4 blocks ahead into L1 (before): 10.0 GB/s on 1 thread, 20 GB/s on 2; 32 blocks (9 KB) ahead
// into L2: 13.0 and 25 GB/s (16 and 64 blocks: 24.4 and 23.7 GB/s on 2 threads).
//
// Not prefetchnta, though decode reads each row group once: on Sapphire Rapids it held a Q4_0
// GEMV from DRAM to 6-7 GB/s a thread (against 21-24 with prefetcht1). AMD's CPUs prefer it
// (Zen 4: 8B-A1B decode ~8% faster on 1 thread): prefetch_weights_nontemporal below.
constexpr int64_t kPrefetchAhead = 9216;

static inline void prefetch_weights(const void* block, int64_t bytes) {
    const char* ahead = static_cast<const char*>(block) + kPrefetchAhead;
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(ahead + offset, 0, 2);
}

// The same for the AVX-512 decode tiles on AMD (kernels.h, DecodeStreaming::kNonTemporal): the
// bytes 18 KB ahead, with prefetchnta. On the 2-core Zen 5 VM, interleaved runs of a Q4_0 GEMV
// from DRAM on 2 threads (medians of 4-5 runs, which the host's other tenants swing by a third):
// 33.0 / 42.0 GB/s as on Intel, 47.8 / 52.8 this way (prefetcht0 9 KB ahead 47.4 / 39.4; one
// stream with prefetcht1 37.5 / 40.0); 1 thread 31.8 -> 33.3.
constexpr int64_t kPrefetchAheadNonTemporal = 18432;

static inline void prefetch_weights_nontemporal(const void* block, int64_t bytes) {
    const char* ahead = static_cast<const char*>(block) + kPrefetchAheadNonTemporal;
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(ahead + offset, 0, 0);
}

}  // namespace lfm
