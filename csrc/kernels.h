// The kernel table: one per instruction set, each filled in by its own translation unit.
//
// kernels_scalar.cpp  baseline flags, portable C++17: the reference for every other table
// kernels_avx2.cpp    -mavx2 -mfma -mf16c
// kernels_avx512.cpp  -mavx512f/bw/vl/dq/vnni -mfma -mf16c
//
// dispatch.cpp picks one table at import from what the CPU supports. A kernel TU compiled with
// AVX flags must give everything it defines internal linkage (anonymous namespace or `static`)
// and include no header that defines inline functions or templates with external linkage
// (no STL): otherwise the linker may hand baseline code an AVX copy of a shared inline function,
// and the module would die with SIGILL on an older CPU.
#pragma once

#include <cstdint>

namespace lfm {

// GGML type ids, as stored in GGUF tensor infos.
enum class QType : int32_t {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q8_0 = 8,
    BF16 = 30,
};

// Dequantizes one weight row of k values, stored in its QType's on-disk layout, into out[k].
using DequantizeRowFn = void (*)(const uint8_t* row, int64_t k, float* out);

// y[t, r] = sum_i x[t, i] * W[r, i] for t in [0, n_tokens) and r in [row_begin, row_end),
// with W dequantized exactly and the sums accumulated in float32.
//   x: [n_tokens, k] row-major float32
//   w: the whole weight matrix, N rows of row_bytes(qtype, k) bytes each
//   y: [n_tokens, ldy] row-major; only columns [row_begin, row_end) are written
// It takes a row range rather than the whole matrix so that a thread pool can split the rows.
using MatmulFn = void (*)(const float* x, int64_t n_tokens, const uint8_t* w, int64_t k,
                          int64_t row_begin, int64_t row_end, float* y, int64_t ldy);

// The kernels for one weight type. Later kernels (int8-activation VNNI matmuls) join as fields.
struct QTypeKernels {
    DequantizeRowFn dequantize_row;
    MatmulFn matmul_f32;  // float32 activations, weights dequantized on the fly
};

struct KernelTable {
    const char* isa;  // "scalar" | "avx2" | "avx512"
    QTypeKernels f32;
    QTypeKernels f16;
    QTypeKernels bf16;
    QTypeKernels q8_0;
    QTypeKernels q4_0;
};

// One getter per instruction set. Only the scalar one exists on every build; dispatch.cpp
// references the others only when CMake compiled them (LFM_EDGE_HAVE_AVX2 / _AVX512).
const KernelTable& scalar_kernels();
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();

}  // namespace lfm
