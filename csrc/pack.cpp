// Repacking into the 16-row layouts (see packed.h and pack.h). Baseline flags.
#include "pack.h"

#include <cstring>

#include "formats.h"
#include "packed.h"

namespace lfm {
namespace {

void pack_q4_0_group(const uint8_t* src, int64_t n, int64_t k, int64_t g, Q4_0x16* out) {
    const int64_t nb = k / kQuantBlock;
    const int64_t row_bytes = nb * kQ4_0BlockBytes;
    for (int64_t b = 0; b < nb; ++b) {
        Q4_0x16& blk = out[b];
        std::memset(&blk, 0, sizeof blk);
        for (int r = 0; r < kRowGroup; ++r) {
            const int64_t row = g * kRowGroup + r;
            if (row >= n) break;
            const uint8_t* block = src + row * row_bytes + b * kQ4_0BlockBytes;
            blk.d[r] = load_u16(block);
            for (int c = 0; c < 4; ++c) {
                // GGUF byte i holds weights i (low nibble) and i + 16 (high nibble)
                std::memcpy(blk.qs + 64 * c + 4 * r, block + 2 + 4 * c, 4);
            }
        }
    }
}

void pack_q8_0_group(const uint8_t* src, int64_t n, int64_t k, int64_t g, Q8_0x16* out) {
    const int64_t nb = k / kQuantBlock;
    const int64_t row_bytes = nb * kQ8_0BlockBytes;
    for (int64_t b = 0; b < nb; ++b) {
        Q8_0x16& blk = out[b];
        std::memset(blk.d, 0, sizeof blk.d);
        std::memset(blk.qs, 0x80, sizeof blk.qs);  // padding rows: int8 zero
        for (int r = 0; r < kRowGroup; ++r) {
            const int64_t row = g * kRowGroup + r;
            if (row >= n) break;
            const uint8_t* block = src + row * row_bytes + b * kQ8_0BlockBytes;
            blk.d[r] = load_u16(block);
            for (int quad = 0; quad < 8; ++quad) {
                for (int j = 0; j < 4; ++j) {
                    blk.qs[64 * quad + 4 * r + j] = static_cast<uint8_t>(block[2 + 4 * quad + j] ^ 0x80);  // w + 128
                }
            }
        }
    }
}

}  // namespace

int64_t packed_bytes(QType qtype, int64_t n, int64_t k) {
    const int64_t blocks = row_groups(n) * (k / kQuantBlock);
    return blocks * (qtype == QType::Q4_0 ? static_cast<int64_t>(sizeof(Q4_0x16))
                                          : static_cast<int64_t>(sizeof(Q8_0x16)));
}

void pack_row_groups(QType qtype, const uint8_t* src, int64_t n, int64_t k, int64_t group_begin,
                     int64_t group_end, uint8_t* dst) {
    const int64_t nb = k / kQuantBlock;
    for (int64_t g = group_begin; g < group_end; ++g) {
        if (qtype == QType::Q4_0) {
            pack_q4_0_group(src, n, k, g, reinterpret_cast<Q4_0x16*>(dst) + g * nb);
        } else {
            pack_q8_0_group(src, n, k, g, reinterpret_cast<Q8_0x16*>(dst) + g * nb);
        }
    }
}

}  // namespace lfm
