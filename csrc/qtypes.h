// The facts about each weight type, written once (as ggml's type_traits): its GGML id and name,
// its on-disk block (weights and bytes) and, for the types the int8-activation kernels read, the
// bytes of one packed 16-row block (packed.h). Everything that needs a block size, a row size or
// a name asks this table; packed.h static_asserts each packed struct against it.
//
// Internal linkage only (a `const` array and `static` functions): see kernels.h.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace lfm {

struct QTypeInfo {
    QType qtype;
    const char* name;
    int64_t block_values;  // weights per on-disk block (1 for the float types)
    int64_t block_bytes;   // bytes per on-disk block
    int64_t packed_bytes;  // bytes of one packed block of 16 rows x block_values; 0: read as stored
};

// Layouts: formats.h (on disk) and packed.h (packed). The packed block is 16 times the file's
// block for every type but Q4_K (16 x 148 for 144: 6-bit scales widened), Q3_K (16 x 114 for
// 110: likewise) and IQ4_XS (16 x 138 for 136).
constexpr QTypeInfo kQTypes[] = {
    {QType::F32, "F32", 1, 4, 0},
    {QType::F16, "F16", 1, 2, 0},
    {QType::BF16, "BF16", 1, 2, 0},
    {QType::Q4_0, "Q4_0", 32, 18, 16 * 18},
    {QType::Q4_1, "Q4_1", 32, 20, 16 * 20},
    {QType::Q5_0, "Q5_0", 32, 22, 16 * 22},
    {QType::Q5_1, "Q5_1", 32, 24, 16 * 24},
    {QType::Q8_0, "Q8_0", 32, 34, 16 * 34},
    {QType::IQ4_NL, "IQ4_NL", 32, 18, 16 * 18},
    {QType::Q2_K, "Q2_K", 256, 84, 16 * 84},
    {QType::Q3_K, "Q3_K", 256, 110, 16 * 114},
    {QType::Q4_K, "Q4_K", 256, 144, 16 * 148},
    {QType::Q5_K, "Q5_K", 256, 176, 16 * 180},
    {QType::Q6_K, "Q6_K", 256, 210, 16 * 210},
    {QType::IQ4_XS, "IQ4_XS", 256, 136, 16 * 138},
};
constexpr int kNumQTypes = sizeof(kQTypes) / sizeof(kQTypes[0]);

// The entry of qtype, or nullptr for an id this runtime does not know.
static constexpr const QTypeInfo* find_qtype(int64_t id) {
    for (const QTypeInfo& info : kQTypes) {
        if (static_cast<int64_t>(info.qtype) == id) return &info;
    }
    return nullptr;
}

static constexpr const QTypeInfo& qtype_info(QType qtype) {
    return *find_qtype(static_cast<int64_t>(qtype));  // every QType value is in the table
}

// Types the int8-activation kernels read, repacked at load (all but the float types).
static constexpr bool is_packed_type(QType qtype) { return qtype_info(qtype).packed_bytes > 0; }

}  // namespace lfm
