// Test-only: the AVX-512 attention kernel (csrc/attention_impl.h in qmatmul_avx512.cpp, compiled
// against SIMDe, see immintrin.h here) against its scalar twin, on both of the kernel's paths
// (the rows of a decode step, the tiles of a prompt) over float32 and float16 caches, with a
// NaN query, an infinite key and a NaN value. The two differ in the order of their float32
// sums, so a result must agree within kTolerance of the output's largest magnitude, and be
// non-finite exactly where the scalar one is. Prints one line per mismatch, then the count,
// and exits non-zero if there was any.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "decode_streaming.h"
#include "kernels.h"
#include "qmatmul.h"

using namespace lfm;

namespace {

// The tolerance tests/test_attention.py holds every instruction set to against float64.
constexpr float kTolerance = 2e-5f;

struct Case {
    int64_t n_heads, n_kv, d, tokens, q_start;
};

// A random half in +-[2^-3, 2): sign, an exponent of 12 .. 15, any mantissa.
uint16_t random_half(std::mt19937& rng) {
    const uint32_t r = rng();
    return static_cast<uint16_t>((r & 0x8000u) | ((12u + (r >> 16) % 4u) << 10) | (r & 0x3ffu));
}

// Calls the kernel as ops.cpp does: every KV head, in calls of attention_call_rows rows.
void run(void (*attention)(const AttentionArgs&, int64_t, int64_t, int64_t), const AttentionArgs& a, int64_t tokens) {
    const int64_t rows = attention_call_rows(a.n_heads / a.n_kv);
    for (int64_t kvh = 0; kvh < a.n_kv; ++kvh) {
        for (int64_t t0 = 0; t0 < tokens; t0 += rows) attention(a, kvh, t0, t0 + rows < tokens ? t0 + rows : tokens);
    }
}

}  // namespace

int main() {
    std::mt19937 rng(11);
    std::normal_distribution<float> normal;
    const Case cases[] = {
        {32, 8, 64, 1, 100},  {32, 8, 64, 1, 4100}, {32, 8, 64, 40, 30},  {32, 8, 64, 17, 64},
        {32, 8, 64, 200, 1},  {3, 3, 17, 20, 5},    {3, 3, 17, 2, 70},    {16, 1, 256, 9, 0},
        {10, 2, 24, 70, 130}, {4, 1, 16, 129, 0},
    };
    int failures = 0, checked = 0;
    for (const Case& c : cases) {
        for (KvType kv_type : {KvType::F32, KvType::F16}) {
            for (bool poisoned : {false, true}) {
                const int64_t capacity = c.q_start + c.tokens + 3;
                const size_t cache = static_cast<size_t>(c.n_kv * capacity * c.d);
                std::vector<float> q(static_cast<size_t>(c.tokens * c.n_heads * c.d)), k32(cache), v32(cache);
                std::vector<uint16_t> k16(cache), v16(cache);
                for (auto& x : q) x = 2.0f * normal(rng);
                for (size_t i = 0; i < cache; ++i) {
                    k32[i] = normal(rng);
                    v32[i] = normal(rng);
                    k16[i] = random_half(rng);
                    v16[i] = random_half(rng);
                }
                if (poisoned) q[q.size() - 1] = std::numeric_limits<float>::quiet_NaN();  // the last query
                if (poisoned && c.q_start + c.tokens > 5) {  // KV head 0: an infinite key, a NaN value
                    k32[3 * c.d + 1] = std::numeric_limits<float>::infinity();
                    k16[3 * c.d + 1] = 0x7c00;
                    v32[5 * c.d] = std::numeric_limits<float>::quiet_NaN();
                    v16[5 * c.d] = 0x7e00;
                }
                const bool f16 = kv_type == KvType::F16;
                std::vector<float> want(q.size()), got(q.size());
                AttentionArgs a{q.data(), f16 ? static_cast<const void*>(k16.data()) : k32.data(),
                                f16 ? static_cast<const void*>(v16.data()) : v32.data(), want.data(),
                                c.n_heads, c.n_kv, c.d, c.q_start, capacity * c.d, kv_type,
                                static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.d)))};
                run(scalar::attention, a, c.tokens);
                a.out = got.data();
                run(avx512::attention, a, c.tokens);
                float largest = 0.0f;
                for (float x : want) largest = std::isfinite(x) && std::fabs(x) > largest ? std::fabs(x) : largest;
                int bad = 0;
                for (size_t i = 0; i < want.size(); ++i) {
                    if (std::isfinite(want[i]) != std::isfinite(got[i])) {
                        ++bad;
                    } else if (std::isfinite(want[i]) && !(std::fabs(want[i] - got[i]) <= kTolerance * largest)) {
                        ++bad;
                    }
                }
                ++checked;
                if (bad) {
                    std::printf("attention %ld/%ld heads d=%ld T=%ld q_start=%ld %s%s: %d of %zu outputs differ\n",
                                static_cast<long>(c.n_heads), static_cast<long>(c.n_kv), static_cast<long>(c.d),
                                static_cast<long>(c.tokens), static_cast<long>(c.q_start), f16 ? "f16" : "f32",
                                poisoned ? " poisoned" : "", bad, want.size());
                    ++failures;
                }
            }
        }
    }
    std::printf("%d of %d attention cases differ\n", failures, checked);
    return failures != 0;
}
