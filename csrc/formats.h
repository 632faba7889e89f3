// GGUF weight row layouts and the scalar conversions every kernel file shares.
//
// Everything here has internal linkage on purpose (`static`, or `const` variables): each
// translation unit gets its own copy compiled with its own flags, so baseline code can never
// end up calling a copy that was compiled with AVX enabled (see kernels.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "qtypes.h"

namespace lfm {

// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL store weights in blocks of 32 that share one fp16 scale d.
const int64_t kQuantBlock = 32;
// Q4_0 block: d (fp16), then 16 bytes; byte j holds weight j in its low nibble and weight
// j + 16 in its high nibble. value = d * (q - 8).
const int64_t kQ4_0BlockBytes = 2 + 16;
// Q8_0 block: d (fp16), then 32 int8. value = d * q.
const int64_t kQ8_0BlockBytes = 2 + 32;
// Q4_1 block: d, m (fp16), then Q4_0's 16 nibble bytes. value = d * q + m, q in 0..15.
const int64_t kQ4_1BlockBytes = 2 + 2 + 16;
// Q5_0 block: d (fp16), qh (32 bits, little-endian), then Q4_0's 16 nibble bytes; bit i of qh is
// bit 4 of weight i. value = d * (q - 16), q in 0..31.
const int64_t kQ5_0BlockBytes = 2 + 4 + 16;
// Q5_1 block: d, m (fp16), qh, nibbles as Q5_0. value = d * q + m, q in 0..31.
const int64_t kQ5_1BlockBytes = 2 + 2 + 4 + 16;
// IQ4_NL block: d (fp16), then Q4_0's 16 nibble bytes. value = d * kIq4Values[q]: a non-linear
// table of 16 int8 levels.
const int64_t kIQ4_NLBlockBytes = 2 + 16;
const int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                               1,    13,   25,  38,  53,  69,  89,  113};

// K-quants store a row in super-blocks of 256 weights (layouts as in ggml-common.h):
//   Q4_K (144 bytes): d, dmin (fp16); 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks of
//     32; 128 bytes of nibbles: sub-block j is bytes 32 * (j / 2) .. + 31, low nibbles if j is
//     even, high if odd. value = (d * sc_j) * q - (dmin * m_j), q in 0..15.
//   Q5_K (176 bytes): d, dmin, the 12 scale bytes, 32 bytes qh, then Q4_K's 128 nibble bytes;
//     bit j of qh[l] is bit 4 of weight l of sub-block j. q in 0..31, value as Q4_K.
//   Q6_K (210 bytes): 128 bytes ql, 64 bytes qh, 16 int8 scales (one per 16 weights), d (fp16).
//     value = (d * sc_{i / 16}) * (q - 32), q in 0..63.
//   Q2_K (84 bytes): 16 scale bytes (one per 16 weights: scale in the low nibble, min in the
//     high), 64 bytes qs, d, dmin (fp16). Weight 128 h + 32 s + l has q = (qs[32 h + l] >> 2s) & 3.
//     value = (d * sc_{i / 16}) * q - (dmin * m_{i / 16}).
//   Q3_K (110 bytes): 32 bytes hmask, 64 bytes qs (Q2_K's layout), 12 bytes of 6-bit scales, d.
//     Weight 32 b + l (b < 8) has its high bit in bit b of hmask[l]; u = q2 | high << 2 in 0..7
//     and value = (d * (sc_{i / 16} - 32)) * (u - 4).
//   IQ4_XS (136 bytes): d (fp16), scales_h (16 bits), 4 bytes scales_l, 128 nibble bytes. Sub-block
//     j of 32 has the 6-bit scale ls = nibble j of scales_l | bits 2j, 2j+1 of scales_h << 4 and its
//     16 bytes at 16 j as a Q4_0 block's. value = (d * (ls - 32)) * kIq4Values[q].
const int64_t kSuperBlock = 256;
const int64_t kQ2_KBlockBytes = 16 + 64 + 2 + 2;
const int64_t kQ3_KBlockBytes = 32 + 64 + 12 + 2;
const int64_t kQ4_KBlockBytes = 144;
const int64_t kQ5_KBlockBytes = 176;
const int64_t kQ6_KBlockBytes = 210;
const int64_t kIQ4_XSBlockBytes = 2 + 2 + 4 + 128;

// The layouts above, against the type table.
static_assert(kQ4_0BlockBytes == qtype_info(QType::Q4_0).block_bytes, "Q4_0 block size");
static_assert(kQ4_1BlockBytes == qtype_info(QType::Q4_1).block_bytes, "Q4_1 block size");
static_assert(kQ5_0BlockBytes == qtype_info(QType::Q5_0).block_bytes, "Q5_0 block size");
static_assert(kQ5_1BlockBytes == qtype_info(QType::Q5_1).block_bytes, "Q5_1 block size");
static_assert(kQ8_0BlockBytes == qtype_info(QType::Q8_0).block_bytes, "Q8_0 block size");
static_assert(kIQ4_NLBlockBytes == qtype_info(QType::IQ4_NL).block_bytes, "IQ4_NL block size");
static_assert(kQ2_KBlockBytes == qtype_info(QType::Q2_K).block_bytes, "Q2_K block size");
static_assert(kQ3_KBlockBytes == qtype_info(QType::Q3_K).block_bytes, "Q3_K block size");
static_assert(kQ4_KBlockBytes == qtype_info(QType::Q4_K).block_bytes, "Q4_K block size");
static_assert(kQ5_KBlockBytes == qtype_info(QType::Q5_K).block_bytes, "Q5_K block size");
static_assert(kQ6_KBlockBytes == qtype_info(QType::Q6_K).block_bytes, "Q6_K block size");
static_assert(kIQ4_XSBlockBytes == qtype_info(QType::IQ4_XS).block_bytes, "IQ4_XS block size");

// GGUF is little-endian; reading byte by byte keeps this right on any host and any alignment.
static inline uint16_t load_u16(const uint8_t* p) {
    return static_cast<uint16_t>(p[0] | (p[1] << 8));
}

static inline float bits_to_f32(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint32_t f32_to_bits(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return bits;
}

// IEEE half -> float, exact for every input (subnormals, infinities, NaN payloads).
static inline float fp16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {
        // zero or subnormal: mantissa * 2^-24, exact in float32
        const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
        return bits_to_f32(sign | f32_to_bits(magnitude));
    }
    if (exponent == 31) {
        return bits_to_f32(sign | 0x7f800000u | (mantissa << 13));  // inf or NaN
    }
    return bits_to_f32(sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13));
}

// float -> IEEE half, rounded to nearest even as numpy's astype(float16) and F16C's vcvtps2ph:
// past 65504 (from the halfway point 65520 on) it is inf, below 2^-14 a subnormal. A NaN stays
// a NaN, made quiet, with the top bits of its payload.
static inline uint16_t f32_to_fp16(float f) {
    const uint32_t bits = f32_to_bits(f);
    const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
    const uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
    if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // inf, or rounds to it
    if (magnitude >= 0x38800000u) {  // a normal half: rebias the exponent by 127 - 15, round 13 bits away
        const uint32_t rebiased = magnitude - 0x38000000u;
        return static_cast<uint16_t>(sign | ((rebiased + 0xfffu + ((rebiased >> 13) & 1u)) >> 13));
    }
    if (magnitude <= 0x33000000u) return sign;  // at most half the smallest subnormal 2^-24: zero
    // a subnormal half: the value in units of 2^-24 is the 24-bit significand >> shift
    const uint32_t exponent = magnitude >> 23, significand = (magnitude & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // 14 .. 24
    uint32_t q = significand >> shift;
    const uint32_t rest = significand & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (q & 1u))) ++q;  // may carry into the smallest normal
    return static_cast<uint16_t>(sign | q);
}

// bfloat16 is the top half of a float32.
static inline float bf16_to_f32(uint16_t h) {
    return bits_to_f32(static_cast<uint32_t>(h) << 16);
}

// The 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes s of a Q4_K / Q5_K
// block: j < 4 in the low 6 bits of s[j] / s[j + 4]; j >= 4 has its low 4 bits in the two
// nibbles of s[j + 4] and its top 2 bits in the spare top bits of s[j - 4] / s[j].
static inline void k_scale_min(const uint8_t* s, int j, uint8_t* sc, uint8_t* m) {
    if (j < 4) {
        *sc = static_cast<uint8_t>(s[j] & 63);
        *m = static_cast<uint8_t>(s[j + 4] & 63);
    } else {
        *sc = static_cast<uint8_t>((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4));
        *m = static_cast<uint8_t>((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// The unsigned quants q[256] of one K super-block, in weight order (Q6_K: before the - 32).
static inline void q4_k_quants(const uint8_t* blk, uint8_t* q) {
    const uint8_t* qs = blk + 16;
    for (int j = 0; j < 8; ++j) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t byte = qs[32 * (j / 2) + l];
            q[32 * j + l] = static_cast<uint8_t>(j % 2 ? byte >> 4 : byte & 0x0f);
        }
    }
}

static inline void q5_k_quants(const uint8_t* blk, uint8_t* q) {
    const uint8_t* qh = blk + 16;
    const uint8_t* qs = blk + 48;
    for (int j = 0; j < 8; ++j) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t byte = qs[32 * (j / 2) + l];
            const int low = j % 2 ? byte >> 4 : byte & 0x0f;
            q[32 * j + l] = static_cast<uint8_t>(low | (((qh[l] >> j) & 1) << 4));
        }
    }
}

// Q6_K: each half of 128 weights uses 64 ql bytes and 32 qh bytes; weight w = 32 s + l of a
// half has its low 4 bits in ql[w % 64] (low nibble if w < 64) and bits 4-5 in qh[l] >> 2s.
static inline void q6_k_quants(const uint8_t* blk, uint8_t* q) {
    for (int h = 0; h < 2; ++h) {
        const uint8_t* ql = blk + 64 * h;
        const uint8_t* qh = blk + 128 + 32 * h;
        for (int w = 0; w < 128; ++w) {
            const int low = w < 64 ? ql[w] & 0x0f : ql[w - 64] >> 4;
            const int high = (qh[w % 32] >> (2 * (w / 32))) & 3;
            q[128 * h + w] = static_cast<uint8_t>(low | (high << 4));
        }
    }
}

// The nibbles of a Q4_0-style block of 16 bytes: byte l holds weight l (low) and l + 16 (high).
static inline void nibble_quants(const uint8_t* qs, uint8_t* q) {
    for (int l = 0; l < 16; ++l) {
        q[l] = static_cast<uint8_t>(qs[l] & 0x0f);
        q[l + 16] = static_cast<uint8_t>(qs[l] >> 4);
    }
}

// Q5_0 / Q5_1: the nibbles plus bit 4 from the 32-bit qh (bit i for weight i).
static inline void five_bit_quants(const uint8_t* qh, const uint8_t* qs, uint8_t* q) {
    nibble_quants(qs, q);
    for (int i = 0; i < 32; ++i) q[i] = static_cast<uint8_t>(q[i] | (((qh[i / 8] >> (i % 8)) & 1) << 4));
}

// Q2_K: q[256] in 0..3.
static inline void q2_k_quants(const uint8_t* blk, uint8_t* q) {
    const uint8_t* qs = blk + 16;
    for (int w = 0; w < kSuperBlock; ++w) {
        const int h = w / 128, s = (w % 128) / 32, l = w % 32;
        q[w] = static_cast<uint8_t>((qs[32 * h + l] >> (2 * s)) & 3);
    }
}

// Q3_K: u[256] = q2 | high << 2 in 0..7 (the weight is u - 4).
static inline void q3_k_quants(const uint8_t* blk, uint8_t* q) {
    const uint8_t* hmask = blk;
    const uint8_t* qs = blk + 32;
    for (int w = 0; w < kSuperBlock; ++w) {
        const int h = w / 128, s = (w % 128) / 32, l = w % 32;
        const int high = (hmask[l] >> (w / 32)) & 1;
        q[w] = static_cast<uint8_t>(((qs[32 * h + l] >> (2 * s)) & 3) | (high << 2));
    }
}

// Q3_K: the signed scale (-32..31) of 16-weight sub-block i from the 12 packed bytes s: its low
// 4 bits are nibble i / 8 of s[i % 8], its top 2 bits bits 2 (i / 4), +1 of s[8 + i % 4].
static inline int q3_k_scale(const uint8_t* s, int i) {
    const int low = (s[i % 8] >> (4 * (i / 8))) & 0x0f;
    const int high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    return (low | (high << 4)) - 32;
}

// IQ4_XS: the signed scale (-32..31) of 32-weight sub-block j.
static inline int iq4_xs_scale(const uint8_t* blk, int j) {
    const int low = (blk[4 + j / 2] >> (4 * (j % 2))) & 0x0f;
    const int high = (load_u16(blk + 2) >> (2 * j)) & 3;
    return (low | (high << 4)) - 32;
}

// Dequantizes one K super-block into out[256] with gguf's float32 operations: (d * sc) and
// (dmin * m) are exact in float32 (11 x 6 bits); then one rounding for q * s - mn (Q4_K, Q5_K) and
// none for Q6_K ((d * sc) * (q - 32) needs at most 11 + 7 + 5 bits). The two steps are separate
// statements and the project builds in ISO C++ mode (-ffp-contract=off), so no FMA merges them.
static inline void dequantize_k_affine(const uint8_t* blk, const uint8_t* q, float* out) {
    const float d = fp16_to_f32(load_u16(blk));
    const float dmin = fp16_to_f32(load_u16(blk + 2));
    for (int j = 0; j < 8; ++j) {
        uint8_t sc, m;
        k_scale_min(blk + 4, j, &sc, &m);
        const float s = d * static_cast<float>(sc);
        const float mn = dmin * static_cast<float>(m);
        for (int l = 0; l < 32; ++l) {
            const float scaled = s * static_cast<float>(q[32 * j + l]);
            out[32 * j + l] = scaled - mn;
        }
    }
}

static inline void dequantize_q4_k_block(const uint8_t* blk, float* out) {
    uint8_t q[kSuperBlock];
    q4_k_quants(blk, q);
    dequantize_k_affine(blk, q, out);
}

static inline void dequantize_q5_k_block(const uint8_t* blk, float* out) {
    uint8_t q[kSuperBlock];
    q5_k_quants(blk, q);
    dequantize_k_affine(blk, q, out);
}

static inline void dequantize_q6_k_block(const uint8_t* blk, float* out) {
    uint8_t q[kSuperBlock];
    q6_k_quants(blk, q);
    const float d = fp16_to_f32(load_u16(blk + 208));
    const auto* sc = reinterpret_cast<const int8_t*>(blk + 192);
    for (int i = 0; i < 16; ++i) {
        const float s = d * static_cast<float>(sc[i]);
        for (int l = 0; l < 16; ++l) out[16 * i + l] = s * static_cast<float>(q[16 * i + l] - 32);
    }
}

// Dequantization of the other types with gguf's float32 operations. Every product of an fp16
// scale (11-bit significand) and a small integer is exact in float32, so the only rounding is the
// final "+ m" / "- mn" of the types with a minimum (Q4_1, Q5_1, Q2_K), as in gguf.
static inline void dequantize_q4_1_block(const uint8_t* blk, float* out) {
    const float d = fp16_to_f32(load_u16(blk)), m = fp16_to_f32(load_u16(blk + 2));
    uint8_t q[kQuantBlock];
    nibble_quants(blk + 4, q);
    for (int i = 0; i < kQuantBlock; ++i) {
        const float scaled = d * static_cast<float>(q[i]);
        out[i] = scaled + m;
    }
}

static inline void dequantize_q5_0_block(const uint8_t* blk, float* out) {
    const float d = fp16_to_f32(load_u16(blk));
    uint8_t q[kQuantBlock];
    five_bit_quants(blk + 2, blk + 6, q);
    for (int i = 0; i < kQuantBlock; ++i) out[i] = d * static_cast<float>(q[i] - 16);
}

static inline void dequantize_q5_1_block(const uint8_t* blk, float* out) {
    const float d = fp16_to_f32(load_u16(blk)), m = fp16_to_f32(load_u16(blk + 2));
    uint8_t q[kQuantBlock];
    five_bit_quants(blk + 4, blk + 8, q);
    for (int i = 0; i < kQuantBlock; ++i) {
        const float scaled = d * static_cast<float>(q[i]);
        out[i] = scaled + m;
    }
}

static inline void dequantize_iq4_nl_block(const uint8_t* blk, float* out) {
    const float d = fp16_to_f32(load_u16(blk));
    uint8_t q[kQuantBlock];
    nibble_quants(blk + 2, q);
    for (int i = 0; i < kQuantBlock; ++i) out[i] = d * static_cast<float>(kIq4Values[q[i]]);
}

static inline void dequantize_q2_k_block(const uint8_t* blk, float* out) {
    const float d = fp16_to_f32(load_u16(blk + 80)), dmin = fp16_to_f32(load_u16(blk + 82));
    uint8_t q[kSuperBlock];
    q2_k_quants(blk, q);
    for (int i = 0; i < 16; ++i) {
        const float s = d * static_cast<float>(blk[i] & 0x0f);
        const float mn = dmin * static_cast<float>(blk[i] >> 4);
        for (int l = 0; l < 16; ++l) {
            const float scaled = s * static_cast<float>(q[16 * i + l]);
            out[16 * i + l] = scaled - mn;
        }
    }
}

static inline void dequantize_q3_k_block(const uint8_t* blk, float* out) {
    const float d = fp16_to_f32(load_u16(blk + 108));
    uint8_t q[kSuperBlock];
    q3_k_quants(blk, q);
    for (int i = 0; i < 16; ++i) {
        const float s = d * static_cast<float>(q3_k_scale(blk + 96, i));
        for (int l = 0; l < 16; ++l) out[16 * i + l] = s * static_cast<float>(q[16 * i + l] - 4);
    }
}

static inline void dequantize_iq4_xs_block(const uint8_t* blk, float* out) {
    const float d = fp16_to_f32(load_u16(blk));
    for (int j = 0; j < 8; ++j) {
        const float s = d * static_cast<float>(iq4_xs_scale(blk, j));
        uint8_t q[kQuantBlock];
        nibble_quants(blk + 8 + 16 * j, q);
        for (int i = 0; i < kQuantBlock; ++i) out[32 * j + i] = s * static_cast<float>(kIq4Values[q[i]]);
    }
}

}  // namespace lfm
