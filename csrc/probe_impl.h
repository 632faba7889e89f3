// The bandwidth probe's read loop (probe.h: read_sum), written once over the unit of one
// instruction set and compiled into each probe_*.cpp with that set's flags (as the kernels'
// *_impl.h are). A unit says how it reads one 64-byte line:
//
//   Unit::Acc                        an accumulator of 64-bit lanes
//   Unit::zero()                     an accumulator of zeros
//   Unit::add_line(acc, line)        acc plus the 64 bytes at line (any alignment), as 64-bit words
//   Unit::add(a, b), Unit::total(a)  lane-wise sum; the sum of a's lanes
//
// The int8 loops stay in each file: what keeps their products inside the loop differs (AVX2's
// separate multiply needs a register per chain, a fused vpdpbusd does not).
#pragma once

#include <cstdint>

namespace lfm {
namespace probe_impl {

template <class Unit, int kStreams>
uint64_t read_streams(const uint8_t* data, int64_t n) {
    const int64_t part = n / kStreams;
    typename Unit::Acc acc[kStreams];
    for (auto& a : acc) a = Unit::zero();
    for (int64_t offset = 0; offset < part; offset += 64) {
        for (int s = 0; s < kStreams; ++s) acc[s] = Unit::add_line(acc[s], data + s * part + offset);
    }
    for (int s = 1; s < kStreams; ++s) acc[0] = Unit::add(acc[0], acc[s]);
    return Unit::total(acc[0]);
}

template <class Unit>
uint64_t read_sum(const uint8_t* data, int64_t n, int streams) {
    switch (streams) {
        case 1: return read_streams<Unit, 1>(data, n);
        case 2: return read_streams<Unit, 2>(data, n);
        case 4: return read_streams<Unit, 4>(data, n);
        default: return read_streams<Unit, 8>(data, n);
    }
}

}  // namespace probe_impl
}  // namespace lfm
