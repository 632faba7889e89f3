// The ops lfm_edge/ops.py calls, as whole-tensor operations: each splits its work over the
// thread pool and calls the active instruction set's kernels. Baseline flags; the bindings
// check every shape before calling in, so nothing here validates.
#pragma once

#include <cstdint>
#include <memory>

#include "kernels.h"
#include "qtypes.h"

namespace lfm {

// A weight matrix (or a stack of n_mats of them, e.g. experts) as the kernels read it: the
// quantized types repacked into 16-row groups (packed.h), float types in their GGUF rows, borrowed.
struct Matrix {
    QType qtype;
    int64_t n, k;      // each matrix maps k inputs to n outputs
    int64_t n_mats;    // stacked matrices, each mat_bytes long
    int64_t mat_bytes;
    const uint8_t* data;
    bool packed() const { return is_packed_type(qtype); }
    const uint8_t* mat(int64_t i) const { return data + i * mat_bytes; }
};

// Makes the packed copy of a quantized stack of n_mats GGUF matrices; `out` must hold
// n_mats * packed_bytes(qtype, n, k) bytes (pack.h). With release_source, src lies in a read-only
// file mapping, whose whole pages are dropped (MADV_DONTNEED) as each thread finishes reading them.
void pack_matrices(QType qtype, const uint8_t* src, int64_t n, int64_t k, int64_t n_mats,
                   uint8_t* out, bool release_source = false);

// y [T, n] = x [T, k] @ W_index^T.
void linear(const Matrix& w, int64_t index, const float* x, int64_t n_tokens, float* y);

// out [T, H] = sum over j < top_k of weights[t, j] * SwiGLU_{experts[t, j]}(x[t]), reading only
// the chosen experts: tokens grouped by expert, each expert one matmul over its tokens.
//   gate, up: [E, F, H] stacks; down: [E, H, F]; experts: [T, top_k] ids in [0, E)
void moe(const float* x, int64_t n_tokens, const int32_t* experts, const float* weights,
         int64_t top_k, const Matrix& gate, const Matrix& up, const Matrix& down, float* out);

// out [rows, n] = x / sqrt(mean(x^2) + eps) * w, row by row.
void rms_norm(const float* x, int64_t rows, int64_t n, const float* w, float eps, float* out);

// y [T, H] = C * conv(B * x) for bcx [T, 3H] = (B, C, x), the causal depthwise conv of width L
// over the sequence with carried state [L-1, H] (updated in place); kernel [H, L].
void gated_short_conv(const float* bcx, int64_t n_tokens, int64_t hidden, float* state,
                      const float* kernel, int64_t width, float* y);

// The conv alone: y [T, H] = conv(bx), state as above.
void short_conv(const float* bx, int64_t n_tokens, int64_t hidden, float* state,
                const float* kernel, int64_t width, float* y);

// NeoX RoPE in place on x [T, n_heads, d] at positions[t].
void rope(float* x, int64_t n_tokens, int64_t n_heads, int64_t d, const int64_t* positions,
          double base);

// Causal GQA attention (AttentionFn in kernels.h) over the whole query block, out [T, n_heads, d].
void attention(const AttentionArgs& args, int64_t n_tokens);

// x [T, H] += down(silu(gate(h)) * up(h)) with h = rms_norm(x, norm): a pre-norm dense SwiGLU
// block and its residual, the same ops in the same order as the Python layer (the same bits).
void swiglu_block(float* x, int64_t n_tokens, const float* norm, float eps, const Matrix& gate,
                  const Matrix& up, const Matrix& down);

// Sigmoid-routed top-k MoE FFN (LFM2-MoE's), for `moe_block` and `ConvLayer`.
struct MoERouter {
    const Matrix* router;      // [E, H]
    const float* expert_bias;  // [E]: shifts the choice only (null: none)
    int64_t top_k;
    bool normalize;
    float scale;
};

// x [T, H] += moe(h, route(router(h))) with h = rms_norm(x, norm): lfm_edge/models/lfm2_moe.py's
// SparseMoE and its residual, the same ops in the same order (the same bits).
//   gate, up: [E, F, H] stacks; down: [E, H, F]
void moe_block(float* x, int64_t n_tokens, const float* norm, float eps, const MoERouter& router,
               const Matrix& gate, const Matrix& up, const Matrix& down);

// The pre-norm FFN that ends every LFM2 layer, with its residual: swiglu_block, or with moe set,
// moe_block.
struct FeedForward {
    const float* norm;     // [H]
    const Matrix* gate;    // [F, H], or [E, F, H] with moe
    const Matrix* up;      // as gate
    const Matrix* down;    // [H, F], or [E, H, F] with moe
    const MoERouter* moe;  // null: a dense SwiGLU
};
void feed_forward_block(const FeedForward& ffn, float* x, int64_t n_tokens, float eps);

// One LFM2 layer made of a gated short conv and its FFN, for the T tokens of one sequence:
//   x [T, H] += out_proj(C * conv(B * x')), (B, C, x') = in_proj(rms_norm(x, operator_norm)),
// with the conv state [L-1, H] updated in place, then the FFN. The ops of
// lfm_edge/models/lfm2.py's DecoderLayer in its order, in one call (the same bits).
struct ConvLayer {
    const float* operator_norm;  // [H]
    float eps;
    const Matrix* in_proj;       // [3H, H]
    const float* kernel;         // [H, L]
    int64_t width;               // L
    const Matrix* out_proj;      // [H, H]
    FeedForward ffn;
};
void conv_layer(const ConvLayer& layer, float* x, int64_t n_tokens, float* state);

// One LFM2 attention layer and its FFN, for the T tokens of one sequence at positions start ..:
//   q, k, v = wq h, wk h, wv h with h = rms_norm(x, operator_norm)
//   q, k = rope(rms_norm(q, q_norm)), rope(rms_norm(k, k_norm)), per head
//   k, v stored in the cache at positions start .. start+T-1 (rounded to float16 for a float16 cache)
//   x [T, H] += wo(attention(q, the cache's first start + T positions))
// then the FFN. The ops of lfm_edge/models/lfm2.py's DecoderLayer in its order (the same bits).
struct AttentionLayer {
    const float* operator_norm;  // [H]
    float eps;
    const Matrix *wq, *wk, *wv;  // [n_heads d, H], [n_kv d, H], [n_kv d, H]
    const Matrix* wo;            // [H, n_heads d]
    const float *q_norm, *k_norm;  // [d]
    int64_t n_heads, n_kv, head_dim;
    double rope_base;
    FeedForward ffn;
};
// One attention layer's keys and values, head-major [n_kv, capacity, d] each.
struct KvSlots {
    void* keys;
    void* values;
    KvType type;
    int64_t capacity;
};
void attention_layer(const AttentionLayer& layer, float* x, int64_t n_tokens, const KvSlots& kv, int64_t start);

// A model's decoder layers for the T tokens of one sequence at positions start .., in one call:
// each a ConvLayer (conv set) or an AttentionLayer, in order. The conv layers' states are
// consecutive [L-1, H] slices of conv_states (the first conv layer's first); the attention
// layers' caches are kv[0], kv[1], ... in the same way.
struct DecoderLayer {
    const ConvLayer* conv;            // or null, and then
    const AttentionLayer* attention;  // this one
};
void decoder_layers(const DecoderLayer* layers, int64_t n_layers, float* x, int64_t n_tokens, float* conv_states,
                    const KvSlots* kv, int64_t start);

// Sigmoid top-k routing, as ops.route: experts [T, top_k] best first (ties to the lower id),
// weights the unbiased scores, renormalised if `normalize`, times `scale`.
void route(const float* logits, int64_t n_tokens, int64_t n_expert, const float* bias,
           int64_t top_k, bool normalize, float scale, int32_t* experts, float* weights);

}  // namespace lfm
