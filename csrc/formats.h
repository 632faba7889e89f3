// GGUF weight row layouts and the scalar conversions every kernel file shares.
//
// Everything here has internal linkage on purpose (`static`, or `const` variables): each
// translation unit gets its own copy compiled with its own flags, so baseline code can never
// end up calling a copy that was compiled with AVX enabled (see kernels.h).
#pragma once

#include <cstdint>
#include <cstring>

namespace lfm {

// Q4_0 and Q8_0 store weights in blocks of 32 that share one fp16 scale d.
const int64_t kQuantBlock = 32;
// Q4_0 block: d (fp16), then 16 bytes; byte j holds weight j in its low nibble and weight
// j + 16 in its high nibble. value = d * (q - 8).
const int64_t kQ4_0BlockBytes = 2 + 16;
// Q8_0 block: d (fp16), then 32 int8. value = d * q.
const int64_t kQ8_0BlockBytes = 2 + 32;

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

// bfloat16 is the top half of a float32.
static inline float bf16_to_f32(uint16_t h) {
    return bits_to_f32(static_cast<uint32_t>(h) << 16);
}

}  // namespace lfm
