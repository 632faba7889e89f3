// The whole-tensor ops behind lfm_edge/ops.py (see ops.h). Baseline flags: this file only
// splits work over the thread pool and calls the active table's kernels; its own loops
// (norms, the conv, routing) are cheap next to the matmuls.
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dispatch.h"
#include "formats.h"
#include "pack.h"
#include "packed.h"
#include "threadpool.h"

namespace lfm {
namespace {

const QTypeKernels& kernels_of_type(const KernelTable& table, QType qtype) {
    return *kernels_for(table, qtype);
}

// Activations quantized for the int8 kernels (kernels.h QuantizedRows), owning their storage.
struct QuantizedBuffer {
    std::vector<int8_t> q;    // [T, k]
    std::vector<float> d;     // [T, k / 32]
    std::vector<int32_t> sum; // [T, k / 32]
    std::vector<int32_t> sum16; // [T, k / 16]
    int64_t n_tokens = 0, k = 0;

    void resize(int64_t t, int64_t k_) {
        n_tokens = t;
        k = k_;
        q.resize(static_cast<size_t>(t * k));
        d.resize(static_cast<size_t>(t * k / kQuantBlock));
        sum.resize(static_cast<size_t>(t * k / kQuantBlock));
        sum16.resize(static_cast<size_t>(t * k / 16));
    }
    QuantizedRows rows(int64_t first = 0, int64_t count = -1) const {
        const int64_t nb = k / kQuantBlock;
        return {q.data() + first * k, d.data() + first * nb, sum.data() + first * nb,
                sum16.data() + first * (k / 16), count < 0 ? n_tokens - first : count, k};
    }
    // Quantizes row t of this buffer from x[k].
    void set_row(const KernelTable& table, int64_t t, const float* x) {
        const int64_t nb = k / kQuantBlock;
        table.quantize_row(x, k, q.data() + t * k, d.data() + t * nb, sum.data() + t * nb);
        const int8_t* qt = q.data() + t * k;
        int32_t* s16 = sum16.data() + t * (k / 16);
        for (int64_t h = 0; h < k / 16; ++h) {  // cheap next to any matmul over k
            int32_t total = 0;
            for (int i = 0; i < 16; ++i) total += qt[16 * h + i];
            s16[h] = total;
        }
    }
};

void quantize_all(const KernelTable& table, const float* x, int64_t n_tokens, int64_t k,
                  QuantizedBuffer& out) {
    out.resize(n_tokens, k);
    if (n_tokens * k < (1 << 16)) {  // decode: not worth waking the pool
        for (int64_t t = 0; t < n_tokens; ++t) out.set_row(table, t, x + t * k);
        return;
    }
    parallel_for(n_tokens, 0, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) out.set_row(table, t, x + t * k);
    });
}

// Rows [g0 * 16, g1 * 16) (clipped to n) of one matrix for `n_tokens` tokens, on either path.
void matmul_groups(const KernelTable& table, const Matrix& w, const uint8_t* mat,
                   const float* x, const QuantizedRows* xq, int64_t n_tokens, int64_t g0,
                   int64_t g1, float* y, int64_t ldy) {
    const QTypeKernels& kernels = kernels_of_type(table, w.qtype);
    if (w.packed()) {
        kernels.matmul_packed(*xq, mat, w.n, g0, g1, y, ldy);
    } else {
        kernels.matmul_f32(x, n_tokens, mat, w.k, g0 * kRowGroup, std::min(g1 * kRowGroup, w.n),
                           y, ldy);
    }
}

// Row groups handed out per chunk: big enough to stream, small enough to balance two cores.
int64_t grain_for(int64_t groups, int64_t n_tokens) {
    const int64_t target = n_tokens > 1 ? 2 : 8;
    return std::max<int64_t>(1, std::min<int64_t>(target, groups / (4 * num_threads())));
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

}  // namespace

void pack_matrices(QType qtype, const uint8_t* src, int64_t n, int64_t k, int64_t n_mats,
                   uint8_t* out) {
    const int64_t groups = row_groups(n);
    const int64_t src_bytes = n * gguf_row_bytes(qtype, k);
    const int64_t dst_bytes = packed_bytes(qtype, n, k);
    parallel_for(n_mats * groups, 0, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
            const int64_t m = task / groups, g = task % groups;
            pack_row_groups(qtype, src + m * src_bytes, n, k, g, g + 1, out + m * dst_bytes);
        }
    });
}

void linear(const Matrix& w, int64_t index, const float* x, int64_t n_tokens, float* y) {
    const KernelTable& table = active_kernels();
    QuantizedBuffer xq;
    QuantizedRows rows{};
    if (w.packed()) {
        quantize_all(table, x, n_tokens, w.k, xq);
        rows = xq.rows();
    }
    const uint8_t* mat = w.mat(index);
    const int64_t groups = row_groups(w.n);
    parallel_for(groups, grain_for(groups, n_tokens), [&](int64_t g0, int64_t g1) {
        matmul_groups(table, w, mat, x, &rows, n_tokens, g0, g1, y, w.n);
    });
}

void moe(const float* x, int64_t n_tokens, const int32_t* experts, const float* weights,
         int64_t top_k, const Matrix& gate, const Matrix& up, const Matrix& down, float* out) {
    const KernelTable& table = active_kernels();
    const int64_t hidden = gate.k, ffn = gate.n;

    // Which tokens each expert serves, experts in ascending id order (as ops.moe).
    struct Active {
        int64_t expert;
        std::vector<int64_t> tokens;  // in token order
        std::vector<float> weight;    // the router weight of each
        int64_t first = 0;            // its first row in the [sum of tokens, ...] buffers
    };
    std::vector<Active> active;
    {
        std::vector<int64_t> slot_of(static_cast<size_t>(gate.n_mats), -1);
        for (int64_t t = 0; t < n_tokens; ++t) {
            for (int64_t j = 0; j < top_k; ++j) {
                const int64_t e = experts[t * top_k + j];
                if (slot_of[e] < 0) {
                    slot_of[e] = 0;
                }
            }
        }
        for (int64_t e = 0; e < gate.n_mats; ++e) {
            if (slot_of[e] < 0) continue;
            slot_of[e] = static_cast<int64_t>(active.size());
            active.push_back({e, {}, {}, 0});
        }
        for (int64_t t = 0; t < n_tokens; ++t) {
            for (int64_t j = 0; j < top_k; ++j) {
                Active& a = active[slot_of[experts[t * top_k + j]]];
                a.tokens.push_back(t);
                a.weight.push_back(weights[t * top_k + j]);
            }
        }
    }
    int64_t n_rows = 0;  // token-expert pairs
    for (Active& a : active) {
        a.first = n_rows;
        n_rows += static_cast<int64_t>(a.tokens.size());
    }

    // Each expert's input rows, gathered: [n_rows, H] (quantized once per token if packed).
    std::vector<float> xs(static_cast<size_t>(n_rows * hidden));
    for (const Active& a : active) {
        for (size_t i = 0; i < a.tokens.size(); ++i) {
            std::copy_n(x + a.tokens[i] * hidden, hidden, xs.data() + (a.first + i) * hidden);
        }
    }
    QuantizedBuffer xq;
    if (gate.packed()) quantize_all(table, xs.data(), n_rows, hidden, xq);

    // Gate and up of every active expert in one parallel pass: tasks (expert, matrix, group).
    const int64_t ffn_groups = row_groups(ffn);
    std::vector<float> g(static_cast<size_t>(n_rows * ffn)), u(g.size());  // [n_rows, F]
    const auto n_active = static_cast<int64_t>(active.size());
    parallel_for(n_active * 2 * ffn_groups, 0, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
            const Active& a = active[task / (2 * ffn_groups)];
            const bool is_up = (task / ffn_groups) % 2 == 1;
            const int64_t group = task % ffn_groups;
            const Matrix& w = is_up ? up : gate;
            const int64_t count = static_cast<int64_t>(a.tokens.size());
            const QuantizedRows rows = w.packed() ? xq.rows(a.first, count) : QuantizedRows{};
            matmul_groups(table, w, w.mat(a.expert), xs.data() + a.first * hidden, &rows, count,
                          group, group + 1, (is_up ? u : g).data() + a.first * ffn, ffn);
        }
    });

    // h = silu(gate) * up, then quantized for the down projection.
    for (size_t i = 0; i < g.size(); ++i) g[i] = silu(g[i]) * u[i];
    QuantizedBuffer hq;
    if (down.packed()) quantize_all(table, g.data(), n_rows, ffn, hq);

    const int64_t hidden_groups = row_groups(hidden);
    std::vector<float> yd(static_cast<size_t>(n_rows * hidden));  // [n_rows, H]
    parallel_for(n_active * hidden_groups, 0, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
            const Active& a = active[task / hidden_groups];
            const int64_t group = task % hidden_groups;
            const int64_t count = static_cast<int64_t>(a.tokens.size());
            const QuantizedRows rows = down.packed() ? hq.rows(a.first, count) : QuantizedRows{};
            matmul_groups(table, down, down.mat(a.expert), g.data() + a.first * ffn, &rows, count,
                          group, group + 1, yd.data() + a.first * hidden, hidden);
        }
    });

    // The weighted sum, experts in ascending order, like ops.moe.
    std::fill_n(out, n_tokens * hidden, 0.0f);
    for (const Active& a : active) {
        for (size_t i = 0; i < a.tokens.size(); ++i) {
            float* o = out + a.tokens[i] * hidden;
            const float* y = yd.data() + (a.first + static_cast<int64_t>(i)) * hidden;
            const float wt = a.weight[i];
            for (int64_t c = 0; c < hidden; ++c) o[c] += y[c] * wt;
        }
    }
}

void rms_norm(const float* x, int64_t rows, int64_t n, const float* w, float eps, float* out) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * n;
        double squares = 0.0;
        for (int64_t i = 0; i < n; ++i) squares += static_cast<double>(xr[i]) * xr[i];
        const float denominator = std::sqrt(static_cast<float>(squares / static_cast<double>(n)) + eps);
        float* o = out + r * n;
        for (int64_t i = 0; i < n; ++i) o[i] = (xr[i] / denominator) * w[i];
    }
}

void short_conv(const float* bx, int64_t n_tokens, int64_t hidden, float* state,
                const float* kernel, int64_t width, float* y) {
    // window = [state; bx], rows 0 .. L-2 + T; y[t] = sum_j window[t + j] * kernel[:, j]
    const int64_t carried = width - 1;
    auto window = [&](int64_t row) { return row < carried ? state + row * hidden : bx + (row - carried) * hidden; };
    for (int64_t t = 0; t < n_tokens; ++t) {
        float* yt = y + t * hidden;
        std::fill_n(yt, hidden, 0.0f);
        for (int64_t j = 0; j < width; ++j) {
            const float* in = window(t + j);
            for (int64_t c = 0; c < hidden; ++c) yt[c] += in[c] * kernel[c * width + j];
        }
    }
    // the new state: the last L-1 rows of the window
    std::vector<float> last(static_cast<size_t>(carried * hidden));
    for (int64_t r = 0; r < carried; ++r) std::copy_n(window(n_tokens + r), hidden, last.data() + r * hidden);
    std::copy(last.begin(), last.end(), state);
}

void gated_short_conv(const float* bcx, int64_t n_tokens, int64_t hidden, float* state,
                      const float* kernel, int64_t width, float* y) {
    std::vector<float> bx(static_cast<size_t>(n_tokens * hidden));  // [T, H]
    for (int64_t t = 0; t < n_tokens; ++t) {
        const float* b = bcx + t * 3 * hidden;
        const float* xx = b + 2 * hidden;
        for (int64_t c = 0; c < hidden; ++c) bx[t * hidden + c] = b[c] * xx[c];
    }
    short_conv(bx.data(), n_tokens, hidden, state, kernel, width, y);
    for (int64_t t = 0; t < n_tokens; ++t) {
        const float* c_gate = bcx + t * 3 * hidden + hidden;
        for (int64_t c = 0; c < hidden; ++c) y[t * hidden + c] *= c_gate[c];
    }
}

void swiglu_block(float* x, int64_t n_tokens, const float* norm, float eps, const Matrix& gate,
                  const Matrix& up, const Matrix& down) {
    const int64_t hidden = gate.k;
    std::vector<float> h(static_cast<size_t>(n_tokens * hidden)), y(h.size());  // [T, H]
    rms_norm(x, n_tokens, hidden, norm, eps, h.data());
    // one expert of weight 1 for every token, as ops.swiglu runs it
    const std::vector<int32_t> expert(static_cast<size_t>(n_tokens), 0);
    const std::vector<float> weight(static_cast<size_t>(n_tokens), 1.0f);
    moe(h.data(), n_tokens, expert.data(), weight.data(), 1, gate, up, down, y.data());
    for (size_t i = 0; i < h.size(); ++i) x[i] += y[i];
}

void conv_layer(const ConvLayer& layer, float* x, int64_t n_tokens, float* state) {
    const int64_t hidden = layer.out_proj->n;
    std::vector<float> h(static_cast<size_t>(n_tokens * hidden)), y(h.size());  // [T, H]
    std::vector<float> bcx(static_cast<size_t>(n_tokens * 3 * hidden));        // [T, 3H]
    rms_norm(x, n_tokens, hidden, layer.operator_norm, layer.eps, h.data());
    linear(*layer.in_proj, 0, h.data(), n_tokens, bcx.data());
    gated_short_conv(bcx.data(), n_tokens, hidden, state, layer.kernel, layer.width, h.data());
    linear(*layer.out_proj, 0, h.data(), n_tokens, y.data());
    for (size_t i = 0; i < h.size(); ++i) x[i] += y[i];
    swiglu_block(x, n_tokens, layer.ffn_norm, layer.eps, *layer.gate, *layer.up, *layer.down);
}

void rope(float* x, int64_t n_tokens, int64_t n_heads, int64_t d, const int64_t* positions,
          double base) {
    const int64_t half = d / 2;
    std::vector<double> inv_freq(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i) {
        inv_freq[i] = 1.0 / std::pow(base, static_cast<double>(2 * i) / static_cast<double>(d));
    }
    std::vector<float> cos_t(static_cast<size_t>(half)), sin_t(static_cast<size_t>(half));
    for (int64_t t = 0; t < n_tokens; ++t) {
        for (int64_t i = 0; i < half; ++i) {
            const double angle = static_cast<double>(positions[t]) * inv_freq[i];
            cos_t[i] = static_cast<float>(std::cos(angle));
            sin_t[i] = static_cast<float>(std::sin(angle));
        }
        for (int64_t h = 0; h < n_heads; ++h) {
            float* v = x + (t * n_heads + h) * d;
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * cos_t[i] - x2 * sin_t[i];
                v[i + half] = x2 * cos_t[i] + x1 * sin_t[i];
            }
        }
    }
}

void attention(const AttentionArgs& args, int64_t n_tokens) {
    const KernelTable& table = active_kernels();
    // query rows per task: one tile of the kernel's (kernels.h); the causal tail balances itself
    const int64_t rows = std::max<int64_t>(1, kAttentionTileQueries / (args.n_heads / args.n_kv));
    const int64_t tiles = (n_tokens + rows - 1) / rows;
    parallel_for(args.n_kv * tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
            const int64_t kvh = task % args.n_kv, tile = task / args.n_kv;
            const int64_t t0 = tile * rows;
            table.attention(args, kvh, t0, std::min(t0 + rows, n_tokens));
        }
    });
}

void route(const float* logits, int64_t n_tokens, int64_t n_expert, const float* bias,
           int64_t top_k, bool normalize, float scale, int32_t* experts, float* weights) {
    std::vector<float> score(static_cast<size_t>(n_expert)), choice(score.size());
    std::vector<int32_t> order(score.size());
    for (int64_t t = 0; t < n_tokens; ++t) {
        for (int64_t e = 0; e < n_expert; ++e) {
            score[e] = 1.0f / (1.0f + std::exp(-logits[t * n_expert + e]));
            choice[e] = bias ? score[e] + bias[e] : score[e];
            // NaN last: the comparison below must be a strict weak order (else sorting is UB)
            if (std::isnan(choice[e])) choice[e] = -std::numeric_limits<float>::infinity();
            order[e] = static_cast<int32_t>(e);
        }
        // best first; ties to the lower id, as a stable argsort of -choice (and torch.topk)
        std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int32_t a, int32_t b) {
            return choice[a] > choice[b] || (choice[a] == choice[b] && a < b);
        });
        float total = 0.0f;
        for (int64_t j = 0; j < top_k; ++j) total += score[order[j]];
        for (int64_t j = 0; j < top_k; ++j) {
            float w = score[order[j]];
            if (normalize) w = w / (total + 1e-6f);
            experts[t * top_k + j] = order[j];
            weights[t * top_k + j] = w * scale;
        }
    }
}

}  // namespace lfm
