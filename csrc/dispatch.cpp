// Compiled with baseline flags: this file only asks the CPU what it supports.
#include "dispatch.h"

#include <atomic>

#if defined(LFM_EDGE_HAVE_AMX) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lfm {
namespace {

// CMake defines LFM_EDGE_HAVE_AVX2 / _AVXVNNI / _AVX512 / _AMX only on x86-64, for the tables it
// compiled (_AVXVNNI only with _AVX2, _AMX only with _AVX512).
#if defined(LFM_EDGE_HAVE_AVX2) || defined(LFM_EDGE_HAVE_AVX512)
// gcc's __builtin_cpu_supports also checks (via XGETBV) that the OS saves the AVX / AVX-512
// register state, so a feature reported here is safe to use.
bool cpu_runs_avx2_table() {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}
#endif

#if defined(LFM_EDGE_HAVE_AVXVNNI)
// AVX-VNNI is CPUID.(EAX=7, ECX=1):EAX bit 4, its ymm state the AVX2 check's.
bool cpu_runs_avxvnni_table() {
    return cpu_runs_avx2_table() && __builtin_cpu_supports("avxvnni");
}
#endif

#if defined(LFM_EDGE_HAVE_AVX512)
// Everything kernels_avx512.cpp is compiled with (DQ included: the compiler may emit it).
bool cpu_runs_avx512_table() {
    return cpu_runs_avx2_table() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
}
#endif

#if defined(LFM_EDGE_HAVE_AMX)
// AMX-INT8, and Linux's permission for this process to use the tile data state (asked once
// here; without it the first tile instruction raises SIGILL). Elsewhere: never.
bool cpu_runs_amx_table() {
#if defined(__linux__)
    constexpr long kReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kXfeatureXtiledata = 18;
    return cpu_runs_avx512_table() && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") &&
           syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
}
#endif

std::vector<const KernelTable*> detect_usable_tables() {
    std::vector<const KernelTable*> tables = {&scalar_kernels()};
#if defined(LFM_EDGE_HAVE_AVX2) || defined(LFM_EDGE_HAVE_AVX512)
    __builtin_cpu_init();  // harmless if already done; needed if we run before libgcc's init
#endif
#if defined(LFM_EDGE_HAVE_AVX2)
    if (cpu_runs_avx2_table()) tables.push_back(&avx2_kernels());
#endif
#if defined(LFM_EDGE_HAVE_AVXVNNI)
    if (cpu_runs_avxvnni_table()) tables.push_back(&avxvnni_kernels());
#endif
#if defined(LFM_EDGE_HAVE_AVX512)
    if (cpu_runs_avx512_table()) tables.push_back(&avx512_kernels());
#endif
#if defined(LFM_EDGE_HAVE_AMX)
    if (cpu_runs_amx_table()) tables.push_back(&amx_kernels());
#endif
    return tables;
}

std::atomic<const KernelTable*>& active_table() {
    static std::atomic<const KernelTable*> active{usable_kernel_tables().back()};
    return active;
}

DecodeStreaming default_decode_streaming() {
#if defined(LFM_EDGE_HAVE_AVX2) || defined(LFM_EDGE_HAVE_AVX512)
    __builtin_cpu_init();
    if (__builtin_cpu_is("amd")) return DecodeStreaming::kNonTemporal;
#endif
    return DecodeStreaming::kPrefetchL2;
}

std::atomic<int32_t>& decode_streaming_setting() {
    static std::atomic<int32_t> setting{static_cast<int32_t>(default_decode_streaming())};
    return setting;
}

}  // namespace

const std::vector<const KernelTable*>& usable_kernel_tables() {
    static const std::vector<const KernelTable*> tables = detect_usable_tables();
    return tables;
}

const KernelTable& active_kernels() { return *active_table().load(); }

bool set_active_kernels(const std::string& isa) {
    for (const KernelTable* table : usable_kernel_tables()) {
        if (isa == table->isa) {
            active_table().store(table);
            return true;
        }
    }
    return false;
}

const QTypeKernels* kernels_for(const KernelTable& table, QType qtype) {
    switch (qtype) {
        case QType::F32: return &table.f32;
        case QType::F16: return &table.f16;
        case QType::BF16: return &table.bf16;
        case QType::Q8_0: return &table.q8_0;
        case QType::Q4_0: return &table.q4_0;
        case QType::Q4_1: return &table.q4_1;
        case QType::Q5_0: return &table.q5_0;
        case QType::Q5_1: return &table.q5_1;
        case QType::IQ4_NL: return &table.iq4_nl;
        case QType::Q2_K: return &table.q2_k;
        case QType::Q3_K: return &table.q3_k;
        case QType::IQ4_XS: return &table.iq4_xs;
        case QType::Q4_K: return &table.q4_k;
        case QType::Q5_K: return &table.q5_k;
        case QType::Q6_K: return &table.q6_k;
    }
    return nullptr;
}

DecodeStreaming decode_streaming() {
    return static_cast<DecodeStreaming>(decode_streaming_setting().load(std::memory_order_relaxed));
}

void set_decode_streaming(DecodeStreaming streaming) {
    decode_streaming_setting().store(static_cast<int32_t>(streaming), std::memory_order_relaxed);
}

}  // namespace lfm
