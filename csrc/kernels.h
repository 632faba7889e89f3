// The kernel table: one per instruction set, each filled in by its own translation unit.
//
// kernels_scalar.cpp  baseline flags, portable C++17: the reference for every other table
// kernels_avx2.cpp    -mavx2 -mfma -mf16c; also the "avxvnni" table: the same float kernels with
//                     the int8 ones of qmatmul_avxvnni.cpp (-mavx2 -mfma -mf16c -mavxvnni)
// kernels_avx512.cpp  -mavx512f/bw/vl/dq/vnni -mfma -mf16c; also the "amx" table: this one with
//                     the Q4_0 / Q8_0 prompt kernels of qmatmul_amx.cpp (-mamx-tile -mamx-int8)
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
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    IQ4_NL = 20,
    IQ4_XS = 23,
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

// Activations quantized for the int8 kernels, in blocks of 32 along k:
// x[t, i] ~ d[t, i / 32] * q[t, i], with d = max|x| / 127 over the block and q = rint(x / d)
// computed as rint(x * (1 / d)) in float32; q = 0 where d is below FLT_MIN (an all-zero block,
// or one so small that 1 / d would overflow). A block holding a NaN or an infinity gets q = 0,
// sum = 0 and d = NaN, so every output it touches is NaN and no integer ever overflows.
struct QuantizedRows {
    const int8_t* q;     // [n_tokens, k]
    const float* d;      // [n_tokens, k / 32]
    const int32_t* sum;  // [n_tokens, k / 32] sum of q over each block
    const int32_t* sum16;  // [n_tokens, k / 16] sum of q over each half block (scales per 16)
    int64_t n_tokens;
    int64_t k;  // a multiple of 32
    // The rows' whole tiles of 16 tokens laid out for kernels that read them so (a KernelTable
    // with pack_tiles), or nullptr, and those kernels hand the rows to others that read them in
    // place (the same bits, slower): tile i (tokens 16i .. 16i + 15) at tiles + 16 i k, [k/32
    // blocks][16 tokens][32], and its scales at tile_d + 16 i (k/32), [k/32 blocks][16 tokens].
    const int8_t* tiles = nullptr;
    const float* tile_d = nullptr;
};

// Lays out x's whole tiles of 16 tokens (floor(n_tokens / 16) of them) as QuantizedRows::tiles
// and tile_d describe, into tiles (16 k bytes a tile, 64-byte aligned) and tile_d (16 (k/32)
// floats a tile, 64-byte aligned).
using PackTilesFn = void (*)(const QuantizedRows& x, int8_t* tiles, float* tile_d);

// Quantizes one row of k values (k % 32 == 0) as QuantizedRows describes. Bit-identical on
// every instruction set: each step is one correctly rounded float32 operation.
using QuantizeRowFn = void (*)(const float* x, int64_t k, int8_t* q, float* d, int32_t* sum);

// y[t, r] = sum over blocks b of (d_w[r, b] * d_x[t, b]) * dot_int(w[r, b], q[t, b]), the
// products of scales and the float32 sums taken in block order with one fused multiply-add
// per block, so every instruction set gives the same bits.
//   x: the quantized activations [n_tokens, k]
//   w: a packed matrix (packed.h) of n_rows rows; row groups [group_begin, group_end) are done
//   y: [n_tokens, ldy]; only columns of rows < n_rows are written
using PackedMatmulFn = void (*)(const QuantizedRows& x, const uint8_t* w, int64_t n_rows,
                                int64_t group_begin, int64_t group_end, float* y, int64_t ldy);

// The kernels for one weight type.
struct QTypeKernels {
    DequantizeRowFn dequantize_row;
    MatmulFn matmul_f32;           // float32 activations, weights dequantized on the fly
    PackedMatmulFn matmul_packed;  // int8 activations, packed weights; nullptr for float types
};

// Causal grouped-query attention with an online softmax, for the queries of one KV head:
// out[t, h, :] = sum_j softmax_j(q[t, h] . k[j] * scale) v[j] over keys j <= q_start + t.
// Computes query rows [t_begin, t_end) for the query heads of one KV head kvh;
// memory is O(head_dim) per query whatever the context length.
//   q: [T, n_heads, d] float32; out: [T, n_heads, d]
//   k, v: a KV cache, head-major [n_kv, capacity, d] of float32 or IEEE half (kv_type), so
//   that one KV head's keys are a single contiguous stream; head h starts at h * head_stride.
enum class KvType : int32_t { F32 = 0, F16 = 1 };
struct AttentionArgs {
    const float* q;
    const void* k;
    const void* v;
    float* out;
    int64_t n_heads, n_kv, head_dim, q_start;
    int64_t head_stride;  // elements from one KV head's rows to the next (capacity * head_dim)
    KvType kv_type;
    float scale;
};
using AttentionFn = void (*)(const AttentionArgs& a, int64_t kv_head, int64_t t_begin,
                             int64_t t_end);
// Query vectors (query rows x the query heads of one KV head) the kernels take in one tile when
// a prompt is long enough, and in one call at most: each key and value tile is read once for
// all of a call's (kAttentionTaskQueries / kAttentionTileQueries tiles). ops.cpp gives a call
// attention_call_rows rows.
constexpr int64_t kAttentionTileQueries = 64;
constexpr int64_t kAttentionTaskQueries = 4 * kAttentionTileQueries;
// Query rows of one call for `group` query heads per KV head: whole rows a tile, whole tiles a
// call (the kernels cut a call at the same rows, so that no call ends in a sliver of a tile).
constexpr int64_t attention_call_rows(int64_t group) {
    return kAttentionTaskQueries / kAttentionTileQueries * (group < kAttentionTileQueries ? kAttentionTileQueries / group : 1);
}

// The SwiGLU product in place: h[i] = silu(h[i]) * u[i] = h[i] / (1 + e^-h[i]) * u[i] for i < n.
// Each element takes the same steps wherever it falls (a tail shorter than a vector runs through
// a vector's lanes too), so the bits of a row do not depend on how its columns were cut.
using SiluMulFn = void (*)(float* h, const float* u, int64_t n);

struct KernelTable {
    const char* isa;  // "scalar" | "avx2" | "avxvnni" | "avx512" | "amx"
    QTypeKernels f32;
    QTypeKernels f16;
    QTypeKernels bf16;
    QTypeKernels q8_0;
    QTypeKernels q4_0;
    QTypeKernels q4_1;
    QTypeKernels q5_0;
    QTypeKernels q5_1;
    QTypeKernels iq4_nl;
    QTypeKernels q2_k;
    QTypeKernels q3_k;
    QTypeKernels q4_k;
    QTypeKernels q5_k;
    QTypeKernels q6_k;
    QTypeKernels iq4_xs;
    QuantizeRowFn quantize_row;
    AttentionFn attention;
    SiluMulFn silu_mul;
    PackTilesFn pack_tiles;  // nullptr where no kernel reads QuantizedRows::tiles (all but AMX)
};

// How the AVX-512 decode tiles (one to four tokens) stream a matrix's weights from memory: each
// CPU vendor's memory system wants its own way, and the bits are the same either way.
//   kPrefetchL2: four row groups read side by side (two for two to four tokens), each block
//     asking for the bytes 9 KB past it into L2 (prefetcht1). Intel (Sapphire Rapids:
//     prefetchnta held a GEMV to a third).
//   kNonTemporal: one row group at a time, each block asking for the bytes 18 KB past it with
//     prefetchnta. AMD (Zen 4 and Zen 5: side by side and L2 prefetches read slower there).
// The default follows the CPU's vendor (AMD: kNonTemporal); set_decode_streaming changes it
// for the whole process (between kernel calls, like set_active_kernels).
enum class DecodeStreaming : int32_t { kPrefetchL2 = 0, kNonTemporal = 1 };
DecodeStreaming decode_streaming();
void set_decode_streaming(DecodeStreaming streaming);

// One getter per instruction set. Only the scalar one exists on every build; dispatch.cpp
// references the others only when CMake compiled them (LFM_EDGE_HAVE_AVX2 / _AVXVNNI / _AVX512).
const KernelTable& scalar_kernels();
const KernelTable& avx2_kernels();
const KernelTable& avxvnni_kernels();
const KernelTable& avx512_kernels();
const KernelTable& amx_kernels();  // the AVX-512 table with AMX prompt kernels for Q4_0 and Q8_0

}  // namespace lfm
