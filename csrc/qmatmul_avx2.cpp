// AVX2 int8-activation kernels: qmatmul_avx2_impl.h's tiles with vpmaddubsw + vpmaddwd as the
// dot-product step, for CPUs without AVX-VNNI. Same bits as the scalar twins in
// qmatmul_scalar.cpp. Internal linkage for everything but the table entries (see kernels.h).
#include <immintrin.h>

#include "qmatmul.h"

namespace lfm {
namespace {

namespace this_isa = avx2;
constexpr int kTokenTile = 4;  // tokens that share each unpacked weight block (prefill)

// The dot-product step: vpmaddubsw's int16 pair sums of kRun operands added in run (kInt16Run
// keeps them below 2^15) before one vpmaddwd widens them into dot. Forced inline: otherwise gcc
// unrolls the 5-bit tiles differently from when the product was written in place.
template <int kRun>
__attribute__((always_inline)) static inline void add_products(int o, __m256i u, __m256i s, __m256i& run,
                                                               __m256i& dot) {
    const __m256i p = _mm256_maddubs_epi16(u, s);
    run = o % kRun == 0 ? p : _mm256_add_epi16(run, p);
    // Keeps the sums in this order: gcc otherwise reassociates them into a tree of products that
    // no longer fits the registers (spills: 15% slower, measured).
    __asm__("" : "+x"(run));
    if (o % kRun == kRun - 1) dot = _mm256_add_epi32(dot, _mm256_madd_epi16(run, _mm256_set1_epi16(1)));
}

}  // namespace
}  // namespace lfm

#include "qmatmul_avx2_impl.h"
#include "qmatmul_impl.h"
