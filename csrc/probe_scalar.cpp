// The probes' reference twin in portable C++17, compiled with baseline flags (see probe.h).
#include <cstring>

#include "probe.h"

namespace lfm {
namespace {

template <int kStreams>
uint64_t read_streams(const uint8_t* data, int64_t n) {
    const int64_t part = n / kStreams;
    uint64_t acc[kStreams] = {};
    for (int64_t offset = 0; offset < part; offset += 64) {
        for (int s = 0; s < kStreams; ++s) {
            uint64_t words[8];  // one cache line
            std::memcpy(words, data + s * part + offset, sizeof words);
            for (uint64_t w : words) acc[s] += w;
        }
    }
    uint64_t sum = 0;
    for (uint64_t a : acc) sum += a;
    return sum;
}

uint64_t read_sum(const uint8_t* data, int64_t n, int streams) {
    switch (streams) {
        case 1: return read_streams<1>(data, n);
        case 2: return read_streams<2>(data, n);
        case 4: return read_streams<4>(data, n);
        default: return read_streams<8>(data, n);
    }
}

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
    static const ProbeKernels table = {"scalar", read_sum, int8_mac, kChains * 4, "scalar int32 multiply-add"};
    return table;
}

}  // namespace lfm
