// Test-only: the AVX-512 int8-activation kernels (compiled against SIMDe, see immintrin.h here)
// bit for bit against their scalar twins, for every packed type, on random valid matrices (one and
// two tokens both ways decode may stream the weights); or, built with
// -DLFM_EDGE_EMULATED_ISA=avxvnni, the AVX-VNNI ones (test_avxvnni_emulated.py).
// Prints one line per mismatch and exits non-zero if there was any.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "decode_streaming.h"
#include "kernels.h"
#include "pack.h"
#include "packed.h"
#include "qmatmul.h"
#include "qtypes.h"

using namespace lfm;

#ifndef LFM_EDGE_EMULATED_ISA
#define LFM_EDGE_EMULATED_ISA avx512
#endif
namespace emulated = lfm::LFM_EDGE_EMULATED_ISA;  // the kernels under test

namespace {

struct Kernels {
    QType qtype;
    PackedMatmul* scalar;
    PackedMatmul* emulated;
    std::vector<int> fp16_at;  // byte offsets of the block's fp16 scales (and minimum)
    bool signed_second;        // whether the second fp16 (a minimum) may be negative
};

// A random valid GGUF matrix: random bytes, the fp16 fields set to values in [2^-10, 1).
std::vector<uint8_t> random_matrix(const Kernels& c, int64_t n, int64_t k, std::mt19937& rng) {
    const QTypeInfo& info = qtype_info(c.qtype);
    std::vector<uint8_t> raw(static_cast<size_t>(n * k / info.block_values * info.block_bytes));
    for (auto& b : raw) b = static_cast<uint8_t>(rng() & 255);
    for (size_t at = 0; at < raw.size(); at += static_cast<size_t>(info.block_bytes)) {
        for (size_t f = 0; f < c.fp16_at.size(); ++f) {
            uint16_t h = static_cast<uint16_t>(0x1400 + rng() % 0x2400);
            if (f == 1 && c.signed_second && (rng() & 1)) h |= 0x8000;
            std::memcpy(&raw[at + c.fp16_at[f]], &h, 2);
        }
    }
    return raw;
}

}  // namespace

int main() {
    std::mt19937 rng(7);
    const std::vector<Kernels> all = {
        {QType::Q4_0, scalar::matmul_q4_0_packed, emulated::matmul_q4_0_packed, {0}, false},
        {QType::Q4_1, scalar::matmul_q4_1_packed, emulated::matmul_q4_1_packed, {0, 2}, true},
        {QType::Q5_0, scalar::matmul_q5_0_packed, emulated::matmul_q5_0_packed, {0}, false},
        {QType::Q5_1, scalar::matmul_q5_1_packed, emulated::matmul_q5_1_packed, {0, 2}, true},
        {QType::Q8_0, scalar::matmul_q8_0_packed, emulated::matmul_q8_0_packed, {0}, false},
        {QType::IQ4_NL, scalar::matmul_iq4_nl_packed, emulated::matmul_iq4_nl_packed, {0}, false},
        {QType::Q2_K, scalar::matmul_q2_k_packed, emulated::matmul_q2_k_packed, {80, 82}, false},
        {QType::Q3_K, scalar::matmul_q3_k_packed, emulated::matmul_q3_k_packed, {108}, false},
        {QType::Q4_K, scalar::matmul_q4_k_packed, emulated::matmul_q4_k_packed, {0, 2}, false},
        {QType::Q5_K, scalar::matmul_q5_k_packed, emulated::matmul_q5_k_packed, {0, 2}, false},
        {QType::Q6_K, scalar::matmul_q6_k_packed, emulated::matmul_q6_k_packed, {208}, false},
        {QType::IQ4_XS, scalar::matmul_iq4_xs_packed, emulated::matmul_iq4_xs_packed, {0}, false},
    };
    int failures = 0, checked = 0;
    for (const Kernels& c : all) {
        const char* name = qtype_info(c.qtype).name;
        for (int64_t n : {1, 17, 70}) {  // 70: four whole row groups, read side by side in decode
            for (int64_t k : {256, 768}) {
                const std::vector<uint8_t> raw = random_matrix(c, n, k, rng);
                const int64_t groups = row_groups(n);
                std::vector<uint8_t> packed(static_cast<size_t>(packed_bytes(c.qtype, n, k)));
                pack_row_groups(c.qtype, raw.data(), n, k, 0, groups, packed.data());
                for (int64_t tokens : {1, 2, 3, 4, 5, 9}) {
                    std::normal_distribution<float> normal;
                    std::vector<float> x(static_cast<size_t>(tokens * k));
                    for (auto& v : x) v = normal(rng);
                    for (int i = 0; i < 32; ++i) x[i] *= 100.0f;  // blocks of very different scale
                    if (tokens == 9) {  // non-finite blocks (NaN out) and one too small to scale (0)
                        x[1 * k + 3] = std::numeric_limits<float>::quiet_NaN();
                        x[2 * k + 40] = std::numeric_limits<float>::infinity();
                        x[3 * k + 70] = -std::numeric_limits<float>::infinity();
                        for (int i = 0; i < 32; ++i) x[4 * k + 32 + i] *= 1e-38f;
                    }
                    std::vector<int8_t> q(x.size()), qe(x.size());
                    std::vector<float> d(x.size() / 32), de(x.size() / 32);
                    std::vector<int32_t> sum(x.size() / 32), sume(x.size() / 32), sum16(x.size() / 16);
                    for (int64_t t = 0; t < tokens; ++t) {
                        scalar::quantize_row(&x[t * k], k, &q[t * k], &d[t * k / 32], &sum[t * k / 32]);
                        emulated::quantize_row(&x[t * k], k, &qe[t * k], &de[t * k / 32], &sume[t * k / 32]);
                    }
                    bool same_d = true;
                    for (size_t b = 0; b < d.size(); ++b) {
                        same_d = same_d && (std::isnan(d[b]) ? std::isnan(de[b]) : std::memcmp(&d[b], &de[b], 4) == 0);
                    }
                    if (q != qe || sum != sume || !same_d) {
                        std::printf("quantize_row differs (k = %ld)\n", static_cast<long>(k));
                        ++failures;
                    }
                    for (size_t h = 0; h < sum16.size(); ++h) {
                        sum16[h] = 0;
                        for (int i = 0; i < 16; ++i) sum16[h] += q[16 * h + i];
                    }
                    const QuantizedRows rows{q.data(), d.data(), sum.data(), sum16.data(), tokens, k};
                    // SIMDe's masked stores write whole vectors: 16 padding columns take them
                    const int64_t ldy = n + 16;
                    std::vector<float> ys(static_cast<size_t>(tokens * ldy + 16));
                    c.scalar(rows, packed.data(), n, 0, groups, ys.data(), ldy);
                    for (const DecodeStreaming way : {DecodeStreaming::kPrefetchL2, DecodeStreaming::kNonTemporal}) {
                        if (tokens > 2 && way != DecodeStreaming::kPrefetchL2) continue;  // decode only
                        set_decode_streaming(way);
                        std::vector<float> ye(ys.size());
                        c.emulated(rows, packed.data(), n, 0, groups, ye.data(), ldy);
                        int bad = 0;
                        for (int64_t t = 0; t < tokens; ++t) {
                            for (int64_t r = 0; r < n; ++r) {
                                const float a = ys[t * ldy + r], b = ye[t * ldy + r];
                                if (std::isnan(a) && std::isnan(b)) continue;  // payloads may differ
                                const bool must_be_nan = tokens == 9 && t >= 1 && t <= 3;
                                bad += must_be_nan || std::memcmp(&a, &b, 4) != 0;
                            }
                        }
                        ++checked;
                        if (bad) {
                            std::printf("%s n=%ld k=%ld T=%ld streaming %d: %d of %ld outputs differ\n", name,
                                        static_cast<long>(n), static_cast<long>(k), static_cast<long>(tokens),
                                        static_cast<int>(way), bad, static_cast<long>(tokens * n));
                            ++failures;
                        }
                    }
                }
            }
        }
    }
    std::printf("%d of %d cases differ\n", failures, checked);
    return failures != 0;
}
