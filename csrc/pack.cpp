// Repacking into the 16-row layouts (see packed.h and pack.h). Baseline flags.
#include "pack.h"

#include <cstring>
#include <type_traits>

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

// The nibbles of sub-block j (q[32 j ..], 0..15 each) of row r into a Q4_0x16-style qs[256].
void put_nibbles(const uint8_t* q, int r, uint8_t* qs) {
    for (int c = 0; c < 4; ++c) {
        for (int t = 0; t < 4; ++t) {
            qs[64 * c + 4 * r + t] = static_cast<uint8_t>((q[4 * c + t] & 0x0f) | ((q[16 + 4 * c + t] & 0x0f) << 4));
        }
    }
}

void put_k_scales(const uint8_t* block, int r, Q4_Kx16& out) {
    out.d[r] = load_u16(block);
    out.dmin[r] = load_u16(block + 2);
    for (int j = 0; j < 8; ++j) k_scale_min(block + 4, j, &out.sc[j][r], &out.m[j][r]);
}

Q4_Kx16& low_part(Q4_Kx16& blk) { return blk; }
Q4_Kx16& low_part(Q5_Kx16& blk) { return blk.low; }

template <class Block>
void pack_k_group(QType qtype, const uint8_t* src, int64_t n, int64_t k, int64_t g, Block* out) {
    const int64_t nb = k / kSuperBlock;
    const int64_t block_bytes = qtype == QType::Q4_K ? kQ4_KBlockBytes
                                : qtype == QType::Q5_K ? kQ5_KBlockBytes : kQ6_KBlockBytes;
    for (int64_t b = 0; b < nb; ++b) {
        Block& blk = out[b];
        std::memset(&blk, 0, sizeof blk);  // padding rows: all zero, scales 0
        for (int r = 0; r < kRowGroup; ++r) {
            const int64_t row = g * kRowGroup + r;
            if (row >= n) break;
            const uint8_t* block = src + row * nb * block_bytes + b * block_bytes;
            uint8_t q[kSuperBlock];
            if constexpr (std::is_same_v<Block, Q6_Kx16>) {
                q6_k_quants(block, q);
                blk.d[r] = load_u16(block + 208);
                for (int i = 0; i < 16; ++i) blk.sc[i][r] = static_cast<int8_t>(block[192 + i]);
                for (int j = 0; j < 8; ++j) {
                    const uint8_t* qj = q + 32 * j;
                    put_nibbles(qj, r, blk.ql[j]);
                    for (int o = 0; o < 8; ++o) {
                        for (int t = 0; t < 4; ++t) {
                            const int high = qj[4 * o + t] >> 4;  // 0..3
                            blk.qh[j][64 * (o / 4) + 4 * r + t] |= static_cast<uint8_t>(high << (2 * (o % 4)));
                        }
                    }
                }
            } else {
                Q4_Kx16& low = low_part(blk);
                if constexpr (std::is_same_v<Block, Q5_Kx16>) {
                    q5_k_quants(block, q);
                } else {
                    q4_k_quants(block, q);
                }
                put_k_scales(block, r, low);
                for (int j = 0; j < 8; ++j) {
                    const uint8_t* qj = q + 32 * j;
                    put_nibbles(qj, r, low.qs[j]);
                    if constexpr (std::is_same_v<Block, Q5_Kx16>) {
                        // weight i = 4o + t: bit 4r + t of mask o; byte 8o + (4r + t) / 8
                        for (int i = 0; i < 32; ++i) {
                            const int o = i / 4, bit = 4 * r + i % 4;
                            blk.qh[j][8 * o + bit / 8] |= static_cast<uint8_t>((qj[i] >> 4) << (bit % 8));
                        }
                    }
                }
            }
        }
    }
}

int64_t block_size(QType qtype) {
    switch (qtype) {
        case QType::Q4_0: return sizeof(Q4_0x16);
        case QType::Q8_0: return sizeof(Q8_0x16);
        case QType::Q4_K: return sizeof(Q4_Kx16);
        case QType::Q5_K: return sizeof(Q5_Kx16);
        case QType::Q6_K: return sizeof(Q6_Kx16);
        default: return 0;
    }
}

}  // namespace

int64_t packed_bytes(QType qtype, int64_t n, int64_t k) {
    const int64_t per_block = is_k_quant(qtype) ? kSuperBlock : kQuantBlock;
    return row_groups(n) * (k / per_block) * block_size(qtype);
}

int64_t gguf_row_bytes(QType qtype, int64_t k) {
    switch (qtype) {
        case QType::Q4_0: return k / kQuantBlock * kQ4_0BlockBytes;
        case QType::Q8_0: return k / kQuantBlock * kQ8_0BlockBytes;
        case QType::Q4_K: return k / kSuperBlock * kQ4_KBlockBytes;
        case QType::Q5_K: return k / kSuperBlock * kQ5_KBlockBytes;
        case QType::Q6_K: return k / kSuperBlock * kQ6_KBlockBytes;
        case QType::F32: return 4 * k;
        default: return 2 * k;
    }
}

void pack_row_groups(QType qtype, const uint8_t* src, int64_t n, int64_t k, int64_t group_begin,
                     int64_t group_end, uint8_t* dst) {
    const int64_t nb = k / kQuantBlock;
    const int64_t nsb = k / kSuperBlock;
    for (int64_t g = group_begin; g < group_end; ++g) {
        if (qtype == QType::Q4_K) {
            pack_k_group(qtype, src, n, k, g, reinterpret_cast<Q4_Kx16*>(dst) + g * nsb);
        } else if (qtype == QType::Q5_K) {
            pack_k_group(qtype, src, n, k, g, reinterpret_cast<Q5_Kx16*>(dst) + g * nsb);
        } else if (qtype == QType::Q6_K) {
            pack_k_group(qtype, src, n, k, g, reinterpret_cast<Q6_Kx16*>(dst) + g * nsb);
        } else if (qtype == QType::Q4_0) {
            pack_q4_0_group(src, n, k, g, reinterpret_cast<Q4_0x16*>(dst) + g * nb);
        } else {
            pack_q8_0_group(src, n, k, g, reinterpret_cast<Q8_0x16*>(dst) + g * nb);
        }
    }
}

}  // namespace lfm
