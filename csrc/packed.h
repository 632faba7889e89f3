// The compute layouts Q4_0 and Q8_0 weights are repacked into once, at load (pack.cpp), for the
// int8-activation kernels (qmatmul_*.cpp).
//
// GGUF stores a matrix row by row, one 32-weight block after another. The kernels instead want
// 16 rows side by side, so that one 64-byte load feeds the 16 int32 lanes of a VNNI dot
// product (4 consecutive weights of each row per lane) while the activation is broadcast.
// So rows are taken in groups of 16 (the last group padded with zero rows), and each group is
// stored as its k/32 blocks in K order, one "x16" block per 32 columns:
//
//   packed matrix = [ceil(n/16) row groups][k/32 blocks] of Q4_0x16 or Q8_0x16
//
// A kernel streams one row group linearly from start to end. Scales stay fp16, as on disk, so
// the packed matrix is exactly as large as the file's (plus padding rows): decode reads as few
// bytes as the file holds.
#pragma once

#include <cstdint>

namespace lfm {

constexpr int64_t kRowGroup = 16;  // rows interleaved in one packed block

// 16 rows x 32 weights of Q4_0. Weight i of row r is d[r] * (u - 8), with the unsigned
// nibble u stored at qs[64 * c + 4 * r + j]: low nibble for i = 4c + j, high nibble for
// i = 16 + 4c + j (c < 4, j < 4). So the low nibbles of the 64 bytes at qs + 64c are the
// [16 rows][4 weights] VNNI operand for weights 4c..4c+3, the high nibbles that for
// 16+4c..16+4c+3; and byte (c, r, j) is byte 4c + j of row r's GGUF block.
struct Q4_0x16 {
    uint16_t d[kRowGroup];      // fp16 scale of each row
    uint8_t qs[kRowGroup * 16];  // [4][16 rows][4] nibble pairs
};
static_assert(sizeof(Q4_0x16) == 288, "Q4_0x16 must stay 16 rows x 18 bytes, unpadded");

// 16 rows x 32 weights of Q8_0. Weight i = 4q + j of row r is d[r] * w with w the int8 stored
// as the byte qs[64 * q + 4 * r + j] = w + 128 (offset so VNNI's u8 x s8 takes it; the kernels
// subtract 128 * sum(activations) per block).
struct Q8_0x16 {
    uint16_t d[kRowGroup];      // fp16 scale of each row
    uint8_t qs[kRowGroup * 32];  // [8][16 rows][4] offset bytes
};
static_assert(sizeof(Q8_0x16) == 544, "Q8_0x16 must stay 16 rows x 34 bytes, unpadded");

static inline int64_t row_groups(int64_t n) { return (n + kRowGroup - 1) / kRowGroup; }

}  // namespace lfm
