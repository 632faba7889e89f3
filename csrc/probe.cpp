// The probes' drivers (see probe.h), compiled with baseline flags: buffers, threads and clocks;
// the instruction-set work is behind the ProbeKernels table.
#include "probe.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <thread>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "dispatch.h"

namespace lfm {
namespace {

using Clock = std::chrono::steady_clock;

// Runs body(t) on `threads` threads (t = 0 on the caller) released together once all are
// running, and returns the seconds from the release to the end of the last one.
template <class Body>
double run_together(int threads, const Body& body) {
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    std::unique_ptr<Clock::time_point[]> ends(new Clock::time_point[threads]);
    std::unique_ptr<std::thread[]> helpers(new std::thread[threads - 1]);
    for (int t = 1; t < threads; ++t) {
        helpers[t - 1] = std::thread([&, t] {
            ready.fetch_add(1);
            while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
            body(t);
            ends[t] = Clock::now();
        });
    }
    while (ready.load() < threads - 1) std::this_thread::yield();
    const Clock::time_point start = Clock::now();
    go.store(true, std::memory_order_release);
    body(0);
    ends[0] = Clock::now();
    for (int t = 1; t < threads; ++t) helpers[t - 1].join();
    Clock::time_point last = ends[0];
    for (int t = 1; t < threads; ++t) last = std::max(last, ends[t]);
    return std::chrono::duration<double>(last - start).count();
}

constexpr int64_t kHugePage = int64_t{2} << 20;

struct FreeDeleter {
    void operator()(uint8_t* p) const { std::free(p); }
};

// Keeps the results of the probe loops observable, so the compiler cannot drop the calls.
std::atomic<uint64_t> g_sink{0};

}  // namespace

const ProbeKernels& active_probe_kernels() {
    const std::string isa = active_kernels().isa;
#if defined(LFM_EDGE_HAVE_AVX512)
    // the AMX table decodes with AVX-512's kernels; its int8 peak stays vpdpbusd's, the
    // yardstick prefill is measured against everywhere
    if (isa == "avx512" || isa == "amx") return avx512_probe_kernels();
#endif
#if defined(LFM_EDGE_HAVE_AVXVNNI)
    if (isa == "avxvnni") return avxvnni_probe_kernels();
#endif
#if defined(LFM_EDGE_HAVE_AVX2)
    if (isa == "avx2") return avx2_probe_kernels();
#endif
    return scalar_probe_kernels();
}

std::vector<double> measure_read_bandwidth(const ProbeKernels& kernels, int64_t bytes, int threads,
                                           int streams, int repeats, bool huge_pages) {
    // Each thread's slice is a whole number of huge pages, so slices share no page.
    const int64_t slice = (bytes + threads * kHugePage - 1) / (threads * kHugePage) * kHugePage;
    const int64_t total = slice * threads;
    std::unique_ptr<uint8_t, FreeDeleter> buffer(
        static_cast<uint8_t*>(std::aligned_alloc(kHugePage, static_cast<size_t>(total))));
    if (!buffer) throw std::bad_alloc();
    uint8_t* data = buffer.get();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Without it the kernel's default "madvise" THP mode gives 4 KiB pages: a TLB miss per page.
    madvise(data, static_cast<size_t>(total), huge_pages ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
#else
    (void)huge_pages;
#endif
    run_together(threads, [&](int t) { std::memset(data + t * slice, t + 1, static_cast<size_t>(slice)); });

    std::vector<double> gbps;
    for (int r = 0; r < repeats; ++r) {
        const double seconds = run_together(threads, [&](int t) {
            g_sink.fetch_add(kernels.read_sum(data + t * slice, slice, streams), std::memory_order_relaxed);
        });
        gbps.push_back(static_cast<double>(total) / seconds * 1e-9);
    }
    return gbps;
}

std::vector<double> measure_int8_peak(const ProbeKernels& kernels, int threads, int64_t iterations,
                                      int repeats) {
    std::vector<double> gmacs;
    for (int r = 0; r < repeats; ++r) {
        const double seconds = run_together(threads, [&](int t) {
            // the values do not change the speed; the int32 sums wrap
            const int64_t sum = kernels.int8_mac(0x0f0e0d0cu + static_cast<uint32_t>(t), 0x7f80017fu, iterations);
            g_sink.fetch_add(static_cast<uint64_t>(sum), std::memory_order_relaxed);
        });
        const double macs = static_cast<double>(threads) * static_cast<double>(iterations) *
                            static_cast<double>(kernels.int8_macs_per_iteration);
        gmacs.push_back(macs / seconds * 1e-9);
    }
    return gmacs;
}

}  // namespace lfm
