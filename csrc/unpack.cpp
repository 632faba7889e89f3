// The inverse of pack.cpp: a packed matrix back to its GGUF bytes. Nothing computes with this; it
// exists so that the tests can show every repacking lossless byte for byte (test_quant_types.py,
// test_kquants.py): unpack(pack(file)) == file. Baseline flags.
#include <cstring>

#include "formats.h"
#include "pack.h"
#include "packed.h"

namespace lfm {
namespace {

// ---- reading one row's 32 quants q[32] of a block back out of the x16 layouts (pack.cpp's put_*)

void get_nibbles(const uint8_t* qs, int r, uint8_t* q) {
    for (int c = 0; c < 4; ++c) {
        for (int t = 0; t < 4; ++t) {
            const uint8_t byte = qs[64 * c + 4 * r + t];
            q[4 * c + t] = static_cast<uint8_t>(byte & 0x0f);
            q[16 + 4 * c + t] = static_cast<uint8_t>(byte >> 4);
        }
    }
}

void get_bit_masks(const uint8_t* qh, int bit, int r, uint8_t* q) {
    for (int i = 0; i < kQuantBlock; ++i) {
        const int o = i / 4, lane_bit = 4 * r + i % 4;
        q[i] = static_cast<uint8_t>(q[i] | ((qh[8 * o + lane_bit / 8] >> (lane_bit % 8)) & 1) << bit);
    }
}

void get_pairs(const uint8_t* src, int shift, int r, uint8_t* q) {
    for (int o = 0; o < 8; ++o) {
        for (int t = 0; t < 4; ++t) {
            const int pair = (src[64 * (o / 4) + 4 * r + t] >> (2 * (o % 4))) & 3;
            q[4 * o + t] = static_cast<uint8_t>(q[4 * o + t] | pair << shift);
        }
    }
}

void put_u16(uint8_t* p, uint16_t v) {
    p[0] = static_cast<uint8_t>(v & 0xff);
    p[1] = static_cast<uint8_t>(v >> 8);
}

// GGUF's nibble bytes of 32 quants: byte l holds q[l] (low) and q[l + 16] (high).
void put_nibble_bytes(const uint8_t* q, uint8_t* out) {
    for (int l = 0; l < 16; ++l) out[l] = static_cast<uint8_t>((q[l] & 0x0f) | (q[l + 16] & 0x0f) << 4);
}

// GGUF's 32-bit qh of 32 five-bit quants.
void put_high_bits(const uint8_t* q, uint8_t* qh) {
    std::memset(qh, 0, 4);
    for (int i = 0; i < kQuantBlock; ++i) qh[i / 8] = static_cast<uint8_t>(qh[i / 8] | (q[i] >> 4) << (i % 8));
}

// ---- row r of an x16 block back into one GGUF block

void get_row(const Q4_0x16& in, int r, uint8_t* block) {
    put_u16(block, in.d[r]);
    for (int c = 0; c < 4; ++c) std::memcpy(block + 2 + 4 * c, in.qs + 64 * c + 4 * r, 4);
}

void get_row(const IQ4_NLx16& in, int r, uint8_t* block) {
    put_u16(block, in.d[r]);
    for (int c = 0; c < 4; ++c) std::memcpy(block + 2 + 4 * c, in.qs + 64 * c + 4 * r, 4);
}

void get_row(const Q4_1x16& in, int r, uint8_t* block) {
    put_u16(block, in.d[r]);
    put_u16(block + 2, in.m[r]);
    for (int c = 0; c < 4; ++c) std::memcpy(block + 4 + 4 * c, in.qs + 64 * c + 4 * r, 4);
}

template <class Block>
void get_five_bit_row(const Block& in, int r, uint8_t* qh, uint8_t* qs) {
    uint8_t q[kQuantBlock];
    get_nibbles(in.qs, r, q);
    get_bit_masks(in.qh, 4, r, q);
    put_high_bits(q, qh);
    put_nibble_bytes(q, qs);
}

void get_row(const Q5_0x16& in, int r, uint8_t* block) {
    put_u16(block, in.d[r]);
    get_five_bit_row(in, r, block + 2, block + 6);
}

void get_row(const Q5_1x16& in, int r, uint8_t* block) {
    put_u16(block, in.d[r]);
    put_u16(block + 2, in.m[r]);
    get_five_bit_row(in, r, block + 4, block + 8);
}

void get_row(const Q8_0x16& in, int r, uint8_t* block) {
    put_u16(block, in.d[r]);
    for (int quad = 0; quad < 8; ++quad) {
        for (int j = 0; j < 4; ++j) block[2 + 4 * quad + j] = static_cast<uint8_t>(in.qs[64 * quad + 4 * r + j] ^ 0x80);
    }
}

// Q4_K / Q5_K: the inverse of k_scale_min (formats.h) into the 12 scale bytes s.
void put_k_scales(const Q4_Kx16& in, int r, uint8_t* block) {
    put_u16(block, in.d[r]);
    put_u16(block + 2, in.dmin[r]);
    uint8_t* s = block + 4;
    std::memset(s, 0, 12);
    for (int j = 0; j < 8; ++j) {
        const uint8_t sc = in.sc[j][r], m = in.m[j][r];
        if (j < 4) {
            s[j] = static_cast<uint8_t>(s[j] | sc);
            s[j + 4] = static_cast<uint8_t>(s[j + 4] | m);
        } else {
            s[j + 4] = static_cast<uint8_t>((sc & 0x0f) | (m & 0x0f) << 4);
            s[j - 4] = static_cast<uint8_t>(s[j - 4] | (sc >> 4) << 6);
            s[j] = static_cast<uint8_t>(s[j] | (m >> 4) << 6);
        }
    }
}

// Q4_K / Q5_K nibbles: sub-block j is bytes 32 (j / 2) .. + 31, low nibbles if j is even.
void put_k_nibbles(const uint8_t* q, uint8_t* qs) {
    for (int j = 0; j < 8; ++j) {
        for (int l = 0; l < 32; ++l) {
            uint8_t& byte = qs[32 * (j / 2) + l];
            byte = static_cast<uint8_t>(j % 2 ? (byte & 0x0f) | (q[32 * j + l] & 0x0f) << 4 : (q[32 * j + l] & 0x0f));
        }
    }
}

void get_row(const Q4_Kx16& in, int r, uint8_t* block) {
    uint8_t q[kSuperBlock];
    for (int j = 0; j < 8; ++j) get_nibbles(in.qs[j], r, q + 32 * j);
    put_k_scales(in, r, block);
    put_k_nibbles(q, block + 16);
}

void get_row(const Q5_Kx16& in, int r, uint8_t* block) {
    uint8_t q[kSuperBlock];
    for (int j = 0; j < 8; ++j) {
        get_nibbles(in.low.qs[j], r, q + 32 * j);
        get_bit_masks(in.qh[j], 4, r, q + 32 * j);
    }
    put_k_scales(in.low, r, block);
    uint8_t* qh = block + 16;
    std::memset(qh, 0, 32);
    for (int j = 0; j < 8; ++j) {
        for (int l = 0; l < 32; ++l) qh[l] = static_cast<uint8_t>(qh[l] | (q[32 * j + l] >> 4) << j);
    }
    put_k_nibbles(q, block + 48);
}

void get_row(const Q6_Kx16& in, int r, uint8_t* block) {
    uint8_t q[kSuperBlock];
    std::memset(q, 0, sizeof q);
    for (int j = 0; j < 8; ++j) {
        get_nibbles(in.ql[j], r, q + 32 * j);
        get_pairs(in.qh[j], 4, r, q + 32 * j);
    }
    std::memset(block, 0, 192);
    for (int h = 0; h < 2; ++h) {  // the inverse of q6_k_quants (formats.h)
        for (int w = 0; w < 128; ++w) {
            const uint8_t u = q[128 * h + w];
            uint8_t& low = block[64 * h + w % 64];
            low = static_cast<uint8_t>(low | (u & 0x0f) << (w < 64 ? 0 : 4));
            uint8_t& high = block[128 + 32 * h + w % 32];
            high = static_cast<uint8_t>(high | (u >> 4) << (2 * (w / 32)));
        }
    }
    for (int i = 0; i < 16; ++i) block[192 + i] = static_cast<uint8_t>(in.sc[i][r]);
    put_u16(block + 208, in.d[r]);
}

// Q2_K / Q3_K's 2-bit fields: weight 128 h + 32 s + l at bits 2s of qs[32 h + l].
void put_two_bit_fields(const uint8_t* q, uint8_t* qs) {
    std::memset(qs, 0, 64);
    for (int w = 0; w < kSuperBlock; ++w) {
        const int h = w / 128, s = (w % 128) / 32, l = w % 32;
        qs[32 * h + l] = static_cast<uint8_t>(qs[32 * h + l] | (q[w] & 3) << (2 * s));
    }
}

void get_row(const Q2_Kx16& in, int r, uint8_t* block) {
    uint8_t q[kSuperBlock];
    std::memset(q, 0, sizeof q);
    for (int j = 0; j < 8; ++j) get_pairs(in.q2[j], 0, r, q + 32 * j);
    for (int i = 0; i < 16; ++i) block[i] = in.sm[i][r];
    put_two_bit_fields(q, block + 16);
    put_u16(block + 80, in.d[r]);
    put_u16(block + 82, in.dmin[r]);
}

void get_row(const Q3_Kx16& in, int r, uint8_t* block) {
    uint8_t q[kSuperBlock];
    std::memset(q, 0, sizeof q);
    for (int j = 0; j < 8; ++j) {
        get_pairs(in.q2[j], 0, r, q + 32 * j);
        get_bit_masks(in.qh[j], 2, r, q + 32 * j);
    }
    uint8_t* hmask = block;
    std::memset(hmask, 0, 32);
    for (int w = 0; w < kSuperBlock; ++w) hmask[w % 32] = static_cast<uint8_t>(hmask[w % 32] | (q[w] >> 2) << (w / 32));
    put_two_bit_fields(q, block + 32);
    uint8_t* s = block + 96;  // the inverse of q3_k_scale (formats.h)
    std::memset(s, 0, 12);
    for (int i = 0; i < 16; ++i) {
        const int value = in.sc[i][r] + 32;
        s[i % 8] = static_cast<uint8_t>(s[i % 8] | (value & 0x0f) << (4 * (i / 8)));
        s[8 + i % 4] = static_cast<uint8_t>(s[8 + i % 4] | (value >> 4) << (2 * (i / 4)));
    }
    put_u16(block + 108, in.d[r]);
}

void get_row(const IQ4_XSx16& in, int r, uint8_t* block) {
    put_u16(block, in.d[r]);
    uint16_t scales_h = 0;
    std::memset(block + 4, 0, 4);
    for (int j = 0; j < 8; ++j) {  // the inverse of iq4_xs_scale (formats.h)
        const int value = in.sc[j][r] + 32;
        block[4 + j / 2] = static_cast<uint8_t>(block[4 + j / 2] | (value & 0x0f) << (4 * (j % 2)));
        scales_h = static_cast<uint16_t>(scales_h | (value >> 4) << (2 * j));
        uint8_t q[kQuantBlock];
        get_nibbles(in.qs[j], r, q);
        put_nibble_bytes(q, block + 8 + 16 * j);
    }
    put_u16(block + 2, scales_h);
}

template <class Block>
void unpack_matrix(QType qtype, const uint8_t* packed, int64_t n, int64_t k, uint8_t* dst) {
    const QTypeInfo& info = qtype_info(qtype);
    const int64_t nb = k / info.block_values;
    const auto* blocks = reinterpret_cast<const Block*>(packed);  // [groups][nb]
    for (int64_t row = 0; row < n; ++row) {
        for (int64_t b = 0; b < nb; ++b) {
            get_row(blocks[row / kRowGroup * nb + b], static_cast<int>(row % kRowGroup),
                    dst + (row * nb + b) * info.block_bytes);
        }
    }
}

}  // namespace

void unpack_matrix(QType qtype, const uint8_t* packed, int64_t n, int64_t k, uint8_t* dst) {
    switch (qtype) {
        case QType::Q4_0: return unpack_matrix<Q4_0x16>(qtype, packed, n, k, dst);
        case QType::Q4_1: return unpack_matrix<Q4_1x16>(qtype, packed, n, k, dst);
        case QType::Q5_0: return unpack_matrix<Q5_0x16>(qtype, packed, n, k, dst);
        case QType::Q5_1: return unpack_matrix<Q5_1x16>(qtype, packed, n, k, dst);
        case QType::Q8_0: return unpack_matrix<Q8_0x16>(qtype, packed, n, k, dst);
        case QType::IQ4_NL: return unpack_matrix<IQ4_NLx16>(qtype, packed, n, k, dst);
        case QType::Q2_K: return unpack_matrix<Q2_Kx16>(qtype, packed, n, k, dst);
        case QType::Q3_K: return unpack_matrix<Q3_Kx16>(qtype, packed, n, k, dst);
        case QType::Q4_K: return unpack_matrix<Q4_Kx16>(qtype, packed, n, k, dst);
        case QType::Q5_K: return unpack_matrix<Q5_Kx16>(qtype, packed, n, k, dst);
        case QType::Q6_K: return unpack_matrix<Q6_Kx16>(qtype, packed, n, k, dst);
        case QType::IQ4_XS: return unpack_matrix<IQ4_XSx16>(qtype, packed, n, k, dst);
        case QType::F32:
        case QType::F16:
        case QType::BF16: break;  // never packed
    }
}

}  // namespace lfm
