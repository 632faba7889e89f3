// Probes of what this CPU can do at most: the memory read bandwidth that bounds decode and the
// int8 multiply-accumulate rate that bounds prefill, each measured with the instructions the
// kernels of one instruction set use. bench/bandwidth.py, bench/peak.py and `lfm-edge bench`
// report the kernels' speed as a fraction of these.
//
// Like the kernel tables (kernels.h): one table per instruction set, each in its own translation
// unit compiled with that set's flags (probe_scalar.cpp, probe_avx2.cpp, probe_avxvnni.cpp,
// probe_avx512.cpp); the drivers in probe.cpp (baseline flags) allocate, spread the work over
// threads and time it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lfm {

// The numbers of independent streams read_sum reads at once.
constexpr int kMaxReadStreams = 8;

struct ProbeKernels {
    const char* isa;  // "scalar" | "avx2" | "avxvnni" | "avx512", as the kernel table it goes with

    // The sum, mod 2^64, of the n / 8 little-endian 64-bit words at data (n a multiple of
    // 64 * streams; any alignment). The bytes are read as `streams` contiguous parts of n /
    // streams bytes, stepped through together, 64 bytes of each part per step, with the widest
    // loads of the instruction set: several independent streams keep more cache-line misses in
    // flight than one. streams: 1, 2, 4 or 8.
    uint64_t (*read_sum)(const uint8_t* data, int64_t n, int streams);

    // The int8 multiply-accumulate loop of the instruction set's dot products, on operands held in
    // registers: every 32-bit lane of int8_mac_chains independent accumulators adds, per iteration,
    // the dot product of the four unsigned bytes of a4 with the four signed bytes of b4 (byte 0 =
    // the low byte). Returns the sum of all lanes of all accumulators (each an int32 that wraps).
    // AVX2's vpmaddubsw saturates each pair's sum to int16: exact while |a0*b0 + a1*b1| and
    // |a2*b2 + a3*b3| stay <= 32767, as they do in the kernels (4-bit weights).
    int64_t (*int8_mac)(uint32_t a4, uint32_t b4, int64_t iterations);
    int64_t int8_macs_per_iteration;  // chains x lanes x 4
    const char* int8_instructions;    // e.g. "vpmaddubsw + vpmaddwd + vpaddd"
};

const ProbeKernels& scalar_probe_kernels();
const ProbeKernels& avx2_probe_kernels();
const ProbeKernels& avxvnni_probe_kernels();
const ProbeKernels& avx512_probe_kernels();

// The probe table of the active kernel table (dispatch.h): the same instruction set.
const ProbeKernels& active_probe_kernels();

// Read bandwidth in GB/s (1e9 bytes/s) of `repeats` passes over a buffer of `bytes` (rounded up
// to a multiple of 2 MiB), each thread reading its own contiguous slice with `streams` streams.
// The buffer is written first by the thread that reads each slice (its pages are then present,
// near that thread) and, on Linux with huge_pages, asks for transparent huge pages
// (madvise MADV_HUGEPAGE), so a pass takes no page faults and few TLB misses. A pass is timed
// from the moment every thread is released to the moment the last one finishes.
std::vector<double> measure_read_bandwidth(const ProbeKernels& kernels, int64_t bytes, int threads,
                                           int streams, int repeats, bool huge_pages);

// int8 multiply-accumulates per second (GMAC/s, 1e9/s) of `repeats` runs of `iterations`
// iterations of kernels.int8_mac on each of `threads` threads, timed as above.
std::vector<double> measure_int8_peak(const ProbeKernels& kernels, int threads, int64_t iterations,
                                      int repeats);

}  // namespace lfm

// Makes the compiler forget what it knows about a value held in a register, at no cost: an
// int8_mac loop would otherwise be folded into one product times the iteration count.
#if defined(__GNUC__)
#define LFM_PROBE_OPAQUE(constraint, value) __asm__ volatile("" : "+" constraint(value))
#else
#define LFM_PROBE_OPAQUE(constraint, value) ((void)0)
#endif
