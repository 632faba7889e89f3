// AVX-VNNI int8-activation kernels (Alder Lake to Arrow Lake and other CPUs with 256-bit VNNI
// but no AVX-512): qmatmul_avx2_impl.h's tiles with vpdpbusd on ymm (VEX encoded) as the
// dot-product step, in place of AVX2's vpmaddubsw + vpmaddwd. Same bits as the scalar twins in
// qmatmul_scalar.cpp. Internal linkage for everything but the table entries (see kernels.h).
#include <immintrin.h>

#include "qmatmul.h"

namespace lfm {
namespace {

namespace this_isa = avxvnni;
constexpr int kTokenTile = 4;  // tokens that share each unpacked weight block (prefill)

// The dot-product step: vpdpbusd adds the 4 products of each lane to dot in int32 (exact: no
// int16 pair sums to bound), so no run is kept.
template <int kRun>
__attribute__((always_inline)) static inline void add_products(int, __m256i u, __m256i s, __m256i&,
                                                               __m256i& dot) {
    dot = _mm256_dpbusd_avx_epi32(dot, u, s);
}

}  // namespace
}  // namespace lfm

#include "qmatmul_avx2_impl.h"
#include "qmatmul_impl.h"
