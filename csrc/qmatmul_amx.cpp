// AMX (AMX-TILE, AMX-INT8) prompt kernels for Q4_0 and Q8_0: the "amx" table is the AVX-512 one
// with these two entries. 16 tokens at a time against one row group: each 32-weight block is one
// TDPBSSD of the tokens' int8 activations (tile 0, [16 tokens][32 bytes]) by the block's 16 rows
// of int8 weights (tile 1, [8 quads][16 rows x 4 bytes]: VNNI's operand layout, which the packed
// blocks keep, their offset taken off once per row group: nibble - 8, byte - 128), giving
// [16 tokens][16 rows] exact int32 dot products (tile 2). Each is the integer the AVX-512 kernels
// reach with unsigned weights and the block's offset term (-offset x sum of the activations), so
// acc += (dw dx) * float(dot), one fused multiply-add per block in block order, gives every output
// the AVX-512 kernels' bits and hence the scalar twin's (tests/test_kernels_int8.py). The tokens
// left over after whole tiles of 16 go through tiles of fewer rows (tiles 6 and 7), and so do 8 to
// 15 tokens in all; fewer than 8 (decode among them) go to the AVX-512 kernels (kMinTileTokens).
//
// What a whole tile's block costs (the AMX VM, 2026-12-03, a standalone harness, weights and
// activations in L2): the tile work (two loads, the dot product, the store) and the scaling (16 x
// convert, multiply, fused multiply-add) hardly run beside each other, so a block takes at least
// the sum of the two (about 47 + 33 cycles). Reading the activations in place (tile 0's 16 rows
// k bytes apart) and storing each product right after its dot product took 88-92 cycles a block;
// now the whole tiles' activations are laid out once per matmul in the order tile 0 reads them
// (512 contiguous bytes a block, with their 16 scales as one vector: pack_tiles, ops.cpp's
// TileLayout), and a block's product is stored after the next block's dot product has started
// (whole_tile): 75-77 cycles.
//
// Compiled with the AVX-512 flags plus -mamx-tile -mamx-int8; dispatch offers the table only
// where the CPU has AMX-INT8 and Linux grants the process the tile data state (arch_prctl).
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>

#include "formats.h"
#include "kernels.h"
#include "packed.h"
#include "qmatmul.h"

namespace lfm {
namespace {

constexpr int kTileTokens = 16;  // the rows of tiles 0 and 2

// gcc 12's tile intrinsics under-declare their memory operands: its _tile_loadconfig tells the
// compiler it reads 8 of the config's 64 bytes (so the stores of the rest were dropped as dead)
// and its _tile_loadd that it reads none. These two say what they read; the store (_tile_stored
// clobbers memory), zeroing and the dot products are the intrinsics.
struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};  // bytes per row
    uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");
#define LFM_EDGE_TILE_LOAD(T, base, stride)                                                  \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #T ::"r"(static_cast<const void*>(base)), \
                     "r"(static_cast<long>(stride))                                          \
                     : "memory")

// Tiles 0, 1 and 2 as above (and 3, 4, 5 alike), configured for the kernel's scope and released
// after it (a thread holding configured tiles saves 8 KB more state at every context switch).
// Given the tokens of a last, partial tile (1 .. 15), tiles 6 and 7 are its activations and its
// products, that many rows each (it borrows tiles 1 and 4 for the weights).
class Tiles {
   public:
    explicit Tiles(int tail) {
        TileConfig config;
        for (int set = 0; set < 2; ++set) {  // tiles 0-2 and 3-5
            const int activations = 3 * set, weights = 3 * set + 1, dots = 3 * set + 2;
            config.rows[activations] = kTileTokens;  // [16 tokens][32 int8]
            config.colsb[activations] = kQuantBlock;
            config.rows[weights] = kQuantBlock / 4;  // [8 quads][16 rows x 4 uint8]
            config.colsb[weights] = 4 * kRowGroup;
            config.rows[dots] = kTileTokens;  // [16 tokens][16 rows] int32
            config.colsb[dots] = 4 * kRowGroup;
        }
        if (tail > 0) {
            config.rows[6] = static_cast<uint8_t>(tail);
            config.colsb[6] = kQuantBlock;
            config.rows[7] = static_cast<uint8_t>(tail);
            config.colsb[7] = 4 * kRowGroup;
        }
        __asm__ volatile("ldtilecfg %0" ::"m"(config));
    }
    ~Tiles() { _tile_release(); }
    Tiles(const Tiles&) = delete;
    Tiles& operator=(const Tiles&) = delete;
};

// A buffer of `bytes` for the calling thread, 64-byte aligned, kept for its next call.
// nullptr if there is no memory for it.
uint8_t* thread_buffer(int64_t bytes) {
    struct Buffer {
        uint8_t* data = nullptr;
        int64_t bytes = 0;
        ~Buffer() { std::free(data); }
    };
    static thread_local Buffer buffer;
    if (bytes > buffer.bytes) {
        std::free(buffer.data);
        buffer.data = static_cast<uint8_t*>(std::aligned_alloc(64, static_cast<size_t>((bytes + 63) / 64 * 64)));
        buffer.bytes = buffer.data != nullptr ? bytes : 0;
    }
    return buffer.data;
}

// One block of int8 weights as tile 1 reads them, [8 quads][16 rows][4], into out (512 bytes).
static inline void signed_block(const Q8_0x16& block, uint8_t* out) {
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int c = 0; c < 8; ++c) {  // byte - 128 = byte ^ 0x80, as int8
        const __m512i v = _mm512_loadu_si512(block.qs + 64 * c);
        _mm512_store_si512(out + 64 * c, _mm512_xor_si512(v, offset));
    }
}
static inline void signed_block(const Q4_0x16& block, uint8_t* out) {
    const __m512i low = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(8);
    for (int c = 0; c < 4; ++c) {  // the low nibbles of 64 bytes are quad c, the high ones c + 4
        const __m512i v = _mm512_loadu_si512(block.qs + 64 * c);
        _mm512_store_si512(out + 64 * c, _mm512_sub_epi8(_mm512_and_si512(v, low), eight));
        _mm512_store_si512(out + 64 * (c + 4), _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), eight));
    }
}

// Asks for n blocks from `first` into L2 (prefetcht1).
template <class Block>
static inline void ask_for_blocks(const Block* first, int64_t n) {
    const char* p = reinterpret_cast<const char*>(first);
    for (int64_t offset = 0; offset < n * static_cast<int64_t>(sizeof(Block)); offset += 64) {
        _mm_prefetch(p + offset, _MM_HINT_T1);
    }
}

// One block's [16 tokens][16 rows] int32 dot products into dots, on tiles A (the activations at
// a, rows lda bytes apart), B (the weights at w) and C (the products). A macro: gcc's tile
// intrinsics paste their tile numbers into assembly, so they must be literal digits.
#define LFM_EDGE_BLOCK_DOTS(A, B, C, a, lda, w, dots) \
    do {                                           \
        LFM_EDGE_TILE_LOAD(A, a, lda);             \
        LFM_EDGE_TILE_LOAD(B, w, 4 * kRowGroup);   \
        _tile_zero(C);                             \
        _tile_dpbssd(C, A, B);                     \
        _tile_stored(C, dots, 4 * kRowGroup);      \
    } while (0)

// One whole tile's 16 tokens (a, dx: a tile of QuantizedRows::tiles, tile_d) against one row group
// (nb blocks), into rows 0 .. 15 of y, columns row0 .. row0 + rows - 1. Blocks alternate between
// the tiles 0-2 and 3-5;
// a block's product is stored after the next block's dot product has started and scaled after
// the one after that has (loads cannot take data from a tile store still in flight), in block
// order, so the bits are the AVX-512 kernels'.
//
// The first tile of a row group (first: true) also makes the group's int8 weights in w, a few
// blocks ahead of its own dot products (so a tile load never waits for the stores of a block just
// made), and asks for the next row group's blocks (next, unless nullptr) two at a time: the
// conversion runs beside the tile work, and the next group's bytes arrive from memory while this
// group's tiles run instead of stalling its conversion. The tiles after it read w.
template <class Block>
void whole_tile(const int8_t* a, const float* dx, const Block* blocks, uint8_t* w, int64_t nb, int rows, float* y,
                int64_t ldy, int64_t row0, bool first, const Block* next) {
    constexpr int64_t kWeightBytes = 8 * 64;                   // one block's tile 1
    constexpr int64_t kTileBytes = kTileTokens * kQuantBlock;  // one block's tile 0
    constexpr int kSlots = 4;                                  // products stored, not yet scaled
    alignas(64) int32_t dots[kSlots][kTileTokens][kRowGroup];
    __m512 acc[kTileTokens];
    for (__m512& v : acc) v = _mm512_setzero_ps();
    auto scale = [&](int64_t b) {
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blocks[b].d)));
        const float* dxb = dx + b * kTileTokens;
        const int32_t (&d)[kTileTokens][kRowGroup] = dots[b % kSlots];
        for (int t = 0; t < kTileTokens; ++t) {
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(d[t]));
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(dxb[t])), dot, acc[t]);
        }
    };
    auto make = [&](int64_t from, int64_t to) {  // blocks [from, to) of w, those of them that exist
        for (int64_t i = from; i < to && i < nb; ++i) signed_block(blocks[i], w + i * kWeightBytes);
    };
#define LFM_EDGE_START_DOTS(A, B, C, b)                                        \
    do {                                                                       \
        LFM_EDGE_TILE_LOAD(A, a + (b) * kTileBytes, kQuantBlock);              \
        LFM_EDGE_TILE_LOAD(B, w + (b) * kWeightBytes, 4 * kRowGroup);          \
        _tile_zero(C);                                                         \
        _tile_dpbssd(C, A, B);                                                 \
    } while (0)
#define LFM_EDGE_STORE_DOTS(C, b) _tile_stored(C, dots[(b) % kSlots], 4 * kRowGroup)
    if (first) make(0, 4);
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        if (first) {
            make(b + 4, b + 6);
            if (next != nullptr) ask_for_blocks(next + b, 2);
        }
        LFM_EDGE_START_DOTS(0, 1, 2, b);
        if (b >= 2) scale(b - 2);
        if (b >= 1) LFM_EDGE_STORE_DOTS(5, b - 1);
        LFM_EDGE_START_DOTS(3, 4, 5, b + 1);
        if (b >= 1) scale(b - 1);
        LFM_EDGE_STORE_DOTS(2, b);
    }
    if (b < nb) {  // an odd block count: block b on tiles 0-2
        if (first && next != nullptr) ask_for_blocks(next + b, 1);
        LFM_EDGE_START_DOTS(0, 1, 2, b);
        if (b >= 2) scale(b - 2);
        if (b >= 1) LFM_EDGE_STORE_DOTS(5, b - 1);
        LFM_EDGE_STORE_DOTS(2, b);
        if (b >= 1) scale(b - 1);
        scale(b);
    } else {
        LFM_EDGE_STORE_DOTS(5, b - 1);
        if (b >= 2) scale(b - 2);
        scale(b - 1);
    }
#undef LFM_EDGE_START_DOTS
#undef LFM_EDGE_STORE_DOTS
    const auto mask = static_cast<__mmask16>((1u << rows) - 1);
    for (int t = 0; t < kTileTokens; ++t) _mm512_mask_storeu_ps(y + t * ldy + row0, mask, acc[t]);
}

// The last `tokens` (1 .. 15) tokens of x from token t0, read in place (rows k bytes apart),
// against one row group (nb blocks), into rows 0 .. tokens - 1 of y, columns row0 .. row0 + rows
// - 1: on tiles 6 and 7 (Tiles), borrowing tiles 1 and 4 for the weights, one block after the
// other; their work shrinks with their rows. A pair's products are scaled one pair later (loads
// cannot take data from a tile store still in flight), in block order, so the bits are the
// AVX-512 kernels'. first and next as in whole_tile: a partial tile alone makes the weights.
template <class Block>
void partial_tile(const QuantizedRows& x, int64_t t0, int tokens, const Block* blocks, uint8_t* w, int64_t nb,
                  int rows, float* y, int64_t ldy, int64_t row0, bool first, const Block* next) {
    const int8_t* a = x.q + t0 * x.k;
    const float* d_x = x.d + t0 * nb;
    constexpr int64_t kWeightBytes = 8 * 64;  // one block's tile 1
    alignas(64) int32_t dots[4][kTileTokens][kRowGroup];
    __m512 acc[kTileTokens];
    for (__m512& v : acc) v = _mm512_setzero_ps();
    auto scale = [&](int64_t b, const int32_t (&d)[kTileTokens][kRowGroup]) {
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blocks[b].d)));
        const float* dx = d_x + b;
        for (int t = 0; t < tokens; ++t) {
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(d[t]));
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(dx[t * nb])), dot, acc[t]);
        }
    };
    auto make = [&](int64_t from, int64_t to) {  // blocks [from, to) of w, those of them that exist
        for (int64_t i = from; i < to && i < nb; ++i) signed_block(blocks[i], w + i * kWeightBytes);
    };
    if (first) make(0, 2);
    int64_t b = 0;
    int slot = 0;  // which two of dots the pair being computed writes
    for (; b + 2 <= nb; b += 2) {
        if (first) {
            make(b + 2, b + 4);
            if (next != nullptr) ask_for_blocks(next + b, 2);
        }
        LFM_EDGE_BLOCK_DOTS(6, 1, 7, a + b * kQuantBlock, x.k, w + b * kWeightBytes, dots[2 * slot]);
        LFM_EDGE_BLOCK_DOTS(6, 4, 7, a + (b + 1) * kQuantBlock, x.k, w + (b + 1) * kWeightBytes, dots[2 * slot + 1]);
        slot ^= 1;
        if (b >= 2) {
            scale(b - 2, dots[2 * slot]);
            scale(b - 1, dots[2 * slot + 1]);
        }
    }
    if (b >= 2) {
        slot ^= 1;
        scale(b - 2, dots[2 * slot]);
        scale(b - 1, dots[2 * slot + 1]);
    }
    if (b < nb) {
        if (first && next != nullptr) ask_for_blocks(next + b, 1);
        LFM_EDGE_BLOCK_DOTS(6, 1, 7, a + b * kQuantBlock, x.k, w + b * kWeightBytes, dots[0]);
        scale(b, dots[0]);
    }
    const auto mask = static_cast<__mmask16>((1u << rows) - 1);
    for (int t = 0; t < tokens; ++t) _mm512_mask_storeu_ps(y + t * ldy + row0, mask, acc[t]);
}

#undef LFM_EDGE_BLOCK_DOTS
#undef LFM_EDGE_TILE_LOAD

// Fewer tokens than this in all go to the AVX-512 kernels, which stream a row group's weights from
// memory once without converting them; from here on the conversion pays for itself. Measured on
// the AMX VM (2026-12-03): one [1792, 2048] Q4_0 matrix of a 1 GB stack (from DRAM), per call,
// best of three passes, AVX-512 against a partial tile alone:
//   tokens     4          6          8          10         12         14
//   1 thread   183 / 255  234 / 230  261 / 235  315 / 245  332 / 261  386 / 271 us
//   2 threads  116 / 135  141 / 145  158 / 151  194 / 189  203 / 168  231 / 176 us
// Batched decode of the 1.2B on 2 threads (lfm-edge bench -np): 8 sequences 162 -> 162 tok/s,
// 12 sequences 187 -> 224. A prompt's experts with 8 to 15 tokens take the tiles too.
constexpr int64_t kMinTileTokens = 8;

// PackedMatmulFn (kernels.h) for Block: whole tiles of 16 tokens here, on the activations the caller
// laid out (x.tiles: ops.cpp's TileLayout), then the tokens left over as a partial tile on the
// weights the whole tiles converted (or, from kMinTileTokens to 15 tokens in all, a partial tile
// alone, which converts them). Fewer tokens in all (decode, and a few sequences decoding
// together), and 16 or more that nobody laid out, go to `rest`, the AVX-512 kernels: the same bits.
template <class Block>
void matmul(const QuantizedRows& x, const uint8_t* w, int64_t n_rows, int64_t group_begin, int64_t group_end,
            float* y, int64_t ldy, PackedMatmul& rest) {
    const int64_t nb = x.k / kQuantBlock;
    const int64_t whole = x.tiles != nullptr ? x.n_tokens / kTileTokens * kTileTokens : 0;
    const bool alone = x.n_tokens >= kMinTileTokens && x.n_tokens < kTileTokens;
    const int tail = whole > 0 || alone ? static_cast<int>(x.n_tokens - whole) : 0;
    int64_t done = whole + tail;  // the tokens the tiles take
    uint8_t* weights = done > 0 ? thread_buffer(nb * 8 * 64) : nullptr;  // the row group's int8 weights
    if (weights == nullptr) done = 0;  // no memory for the copies: all on AVX-512
    if (done > 0) {
        const auto* blocks = reinterpret_cast<const Block*>(w);  // [groups][nb]
        const Tiles tiles(tail);
        for (int64_t g = group_begin; g < group_end; ++g) {
            const int64_t row0 = g * kRowGroup;
            const int rows = static_cast<int>(n_rows - row0 < kRowGroup ? n_rows - row0 : kRowGroup);
            const Block* next = g + 1 < group_end ? blocks + (g + 1) * nb : nullptr;
            for (int64_t t0 = 0; t0 < whole; t0 += kTileTokens) {
                whole_tile(x.tiles + t0 * x.k, x.tile_d + t0 * nb, blocks + g * nb, weights, nb, rows, y + t0 * ldy,
                           ldy, row0, t0 == 0, next);
            }
            if (tail > 0) {  // after whole tiles, the first of them made w and asked for the next group
                partial_tile(x, whole, tail, blocks + g * nb, weights, nb, rows, y + whole * ldy, ldy, row0, alone,
                             alone ? next : nullptr);
            }
        }
    }
    if (done < x.n_tokens) {
        QuantizedRows left = x;
        left.tiles = nullptr;  // they start at x's first token
        left.tile_d = nullptr;
        left.q += done * x.k;
        left.d += done * nb;
        left.sum += done * nb;
        if (left.sum16 != nullptr) left.sum16 += done * 2 * nb;
        left.n_tokens = x.n_tokens - done;
        rest(left, w, n_rows, group_begin, group_end, y + done * ldy, ldy);
    }
}

}  // namespace

namespace amx {

// Tile i's activations are what tile 0 loads for each block, one after the other: 512 contiguous
// bytes a block instead of 16 rows k bytes apart; its scales are a vector per block.
void pack_tiles(const QuantizedRows& x, int8_t* tiles, float* tile_d) {
    const int64_t nb = x.k / kQuantBlock;
    const __m512i token_rows = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(static_cast<int>(nb)));
    for (int64_t t0 = 0; t0 + kTileTokens <= x.n_tokens; t0 += kTileTokens) {
        int8_t* tile = tiles + t0 * x.k;
        for (int t = 0; t < kTileTokens; ++t) {
            const int8_t* row = x.q + (t0 + t) * x.k;
            for (int64_t b = 0; b < nb; ++b) {
                _mm256_store_si256(reinterpret_cast<__m256i*>(tile + (b * kTileTokens + t) * kQuantBlock),
                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kQuantBlock)));
            }
        }
        for (int64_t b = 0; b < nb; ++b) {
            _mm512_store_ps(tile_d + t0 * nb + b * kTileTokens,
                            _mm512_i32gather_ps(token_rows, x.d + t0 * nb + b, sizeof(float)));
        }
    }
}

void matmul_q4_0_packed(const QuantizedRows& x, const uint8_t* w, int64_t n_rows, int64_t group_begin,
                        int64_t group_end, float* y, int64_t ldy) {
    matmul<Q4_0x16>(x, w, n_rows, group_begin, group_end, y, ldy, avx512::matmul_q4_0_packed);
}

void matmul_q8_0_packed(const QuantizedRows& x, const uint8_t* w, int64_t n_rows, int64_t group_begin,
                        int64_t group_end, float* y, int64_t ldy) {
    matmul<Q8_0x16>(x, w, n_rows, group_begin, group_end, y, ldy, avx512::matmul_q8_0_packed);
}

}  // namespace amx
}  // namespace lfm
