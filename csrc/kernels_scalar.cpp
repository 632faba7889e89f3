// Reference kernels in portable C++17, compiled with baseline flags: this unit's parts of
// kernels_impl.h, one value at a time. Every SIMD table in kernels_avx2.cpp / kernels_avx512.cpp
// has the same shape and must agree with this one.
#include "formats.h"
#include "kernels.h"
#include "qmatmul.h"

namespace lfm {
namespace {

constexpr const char* kIsaName = "scalar";
namespace this_isa = scalar;

constexpr int64_t kHalfVector = 1;
static inline void f16_vector(const uint8_t* src, float* out) { *out = fp16_to_f32(load_u16(src)); }
static inline void bf16_vector(const uint8_t* src, float* out) { *out = bf16_to_f32(load_u16(src)); }

static inline void dequantize_q8_0_block(const uint8_t* block, float* out) {
    const float d = fp16_to_f32(load_u16(block));
    const int8_t* qs = reinterpret_cast<const int8_t*>(block + 2);  // [32]
    for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(qs[j]);
}

static inline void dequantize_q4_0_block(const uint8_t* block, float* out) {
    const float d = fp16_to_f32(load_u16(block));
    const uint8_t* qs = block + 2;  // [16], two weights per byte
    for (int j = 0; j < 16; ++j) {
        out[j] = d * static_cast<float>((qs[j] & 0x0f) - 8);
        out[j + 16] = d * static_cast<float>((qs[j] >> 4) - 8);
    }
}

// One float32 sum per row, in k order.
template <int64_t R, int64_t C>
void dot_rows(const float (*wbuf)[C], const float* xt, int64_t len, float* sums) {
    float acc[R] = {};
    for (int64_t i = 0; i < len; ++i) {
        for (int64_t r = 0; r < R; ++r) acc[r] += wbuf[r][i] * xt[i];
    }
    for (int64_t r = 0; r < R; ++r) sums[r] = acc[r];
}

}  // namespace
}  // namespace lfm

#include "kernels_impl.h"

namespace lfm {

const KernelTable& scalar_kernels() { return kTable; }

}  // namespace lfm
