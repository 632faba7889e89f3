// The probes' reference twin in portable C++17, compiled with baseline flags (see probe.h).
#include <cstring>

#include "probe.h"
#include "probe_impl.h"

namespace lfm {
namespace {

// One 64-bit lane: a line is eight words.
struct ScalarLines {
    using Acc = uint64_t;
    static Acc zero() { return 0; }
    static Acc add(Acc a, Acc b) { return a + b; }
    static Acc add_line(Acc acc, const uint8_t* line) {
        uint64_t words[8];
        std::memcpy(words, line, sizeof words);
        for (uint64_t w : words) acc += w;
        return acc;
    }
    static uint64_t total(Acc a) { return a; }
};

constexpr int kChains = 4;

int32_t dot4(uint32_t a4, uint32_t b4) {
    int32_t sum = 0;
    for (int j = 0; j < 4; ++j) {
        sum += static_cast<int32_t>((a4 >> (8 * j)) & 0xff) * static_cast<int8_t>((b4 >> (8 * j)) & 0xff);
    }
    return sum;
}

int64_t int8_mac(uint32_t a4, uint32_t b4, int64_t iterations) {
    uint32_t a[kChains], acc[kChains] = {};  // unsigned: the int32 sums wrap as the SIMD lanes do
    for (uint32_t& x : a) x = a4;
    for (int64_t i = 0; i < iterations; ++i) {
        for (int c = 0; c < kChains; ++c) {
            LFM_PROBE_OPAQUE("r", a[c]);
            acc[c] += static_cast<uint32_t>(dot4(a[c], b4));
        }
    }
    int64_t sum = 0;
    for (uint32_t x : acc) sum += static_cast<int32_t>(x);
    return sum;
}

}  // namespace

const ProbeKernels& scalar_probe_kernels() {
    static const ProbeKernels table = {"scalar", probe_impl::read_sum<ScalarLines>, int8_mac, kChains * 4,
                                       "scalar int32 multiply-add"};
    return table;
}

}  // namespace lfm
