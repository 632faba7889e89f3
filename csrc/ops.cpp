// The whole-tensor ops behind lfm_edge/ops.py (see ops.h). Baseline flags: this file only
// splits work over the thread pool and calls the active table's kernels; its own loops
// (norms, the conv, routing) are cheap next to the matmuls.
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <utility>
#include <vector>

#include "dispatch.h"
#include "formats.h"
#include "pack.h"
#include "packed.h"
#include "threadpool.h"

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace lfm {
namespace {

const QTypeKernels& kernels_of_type(const KernelTable& table, QType qtype) {
    return *kernels_for(table, qtype);
}

// Scratch memory handed back and forth between the ops' calls. Fresh memory of tens of MB is
// fresh pages, which the kernel faults in and zeroes 4 KiB at a time: a 512-token prefill of the
// 8B-A1B took 337,000 page faults (1.3 GB, mostly the MoE's 54 MB of buffers a layer). A buffer
// released waits here, up to kKeepBytes of them in all, for the next request it can serve: the
// ops ask for the same few sizes layer after layer. Buffers are not zeroed: their users fill them.
class ScratchPool {
  public:
    static constexpr size_t kKeepBytes = size_t{320} << 20;  // a 2048-token chunk's MoE needs ~220 MB

    static ScratchPool& instance() {
        static ScratchPool* pool = new ScratchPool;  // never destroyed: buffers may outlive statics
        return *pool;
    }
    // A 64-byte aligned buffer of at least `bytes`, and its real size.
    std::pair<void*, size_t> acquire(size_t bytes) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            size_t best = free_.size();  // the smallest that fits, if it is not twice too big
            for (size_t i = 0; i < free_.size(); ++i) {
                if (free_[i].second >= bytes && free_[i].second <= 2 * bytes + (1 << 20) &&
                    (best == free_.size() || free_[i].second < free_[best].second)) {
                    best = i;
                }
            }
            if (best != free_.size()) {
                const auto found = free_[best];
                free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
                kept_ -= found.second;
                return found;
            }
        }
        const size_t size = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
        return {::operator new(size, kAlign), size};  // throws std::bad_alloc
    }
    void release(void* p, size_t size) {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (kept_ + size <= kKeepBytes) {
                free_.emplace_back(p, size);
                kept_ += size;
                return;
            }
        }
        ::operator delete(p, kAlign);
    }

  private:
    static constexpr std::align_val_t kAlign{64};
    std::mutex mutex_;
    std::vector<std::pair<void*, size_t>> free_;
    size_t kept_ = 0;
};

// n values of T from the pool, not zeroed; returned to it when destroyed.
template <class T>
class Scratch {
  public:
    Scratch() = default;
    explicit Scratch(int64_t n) {
        const auto [p, size] = ScratchPool::instance().acquire(static_cast<size_t>(n) * sizeof(T));
        data_ = static_cast<T*>(p);
        size_ = size;
    }
    Scratch(Scratch&& other) noexcept : data_(other.data_), size_(other.size_) { other.data_ = nullptr; }
    Scratch& operator=(Scratch&& other) noexcept {
        std::swap(data_, other.data_);
        std::swap(size_, other.size_);
        return *this;
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    ~Scratch() {
        if (data_ != nullptr) ScratchPool::instance().release(data_, size_);
    }
    T* get() const { return data_; }
    T& operator[](int64_t i) const { return data_[i]; }

  private:
    T* data_ = nullptr;
    size_t size_ = 0;
};

// Activations quantized for the int8 kernels (kernels.h QuantizedRows), owning their storage.
struct QuantizedBuffer {
    Scratch<int8_t> q;       // [T, k]
    Scratch<float> d;        // [T, k / 32]
    Scratch<int32_t> sum;    // [T, k / 32]
    Scratch<int32_t> sum16;  // [T, k / 16]
    int64_t n_tokens = 0, k = 0;

    // Room for t rows of k values, filled by set_row.
    void resize(int64_t t, int64_t k_) {
        n_tokens = t;
        k = k_;
        q = Scratch<int8_t>(t * k);
        d = Scratch<float>(t * k / kQuantBlock);
        sum = Scratch<int32_t>(t * k / kQuantBlock);
        sum16 = Scratch<int32_t>(t * k / 16);
    }
    QuantizedRows rows(int64_t first = 0, int64_t count = -1) const {
        const int64_t nb = k / kQuantBlock;
        return {q.get() + first * k, d.get() + first * nb, sum.get() + first * nb,
                sum16.get() + first * (k / 16), count < 0 ? n_tokens - first : count, k};
    }
    // Quantizes row t of this buffer from x[k].
    void set_row(const KernelTable& table, int64_t t, const float* x) {
        const int64_t nb = k / kQuantBlock;
        table.quantize_row(x, k, q.get() + t * k, d.get() + t * nb, sum.get() + t * nb);
        const int8_t* qt = q.get() + t * k;
        int32_t* s16 = sum16.get() + t * (k / 16);
        for (int64_t h = 0; h < k / 16; ++h) {  // cheap next to any matmul over k
            int32_t total = 0;
            for (int i = 0; i < 16; ++i) total += qt[16 * h + i];
            s16[h] = total;
        }
    }
    // Row t of this buffer as a copy of row s of `from` (the same k).
    void copy_row(int64_t t, const QuantizedBuffer& from, int64_t s) {
        const int64_t nb = k / kQuantBlock;
        std::copy_n(from.q.get() + s * k, k, q.get() + t * k);
        std::copy_n(from.d.get() + s * nb, nb, d.get() + t * nb);
        std::copy_n(from.sum.get() + s * nb, nb, sum.get() + t * nb);
        std::copy_n(from.sum16.get() + s * (k / 16), k / 16, sum16.get() + t * (k / 16));
    }
};

// Rows [first, first + count) of a quantized buffer that a matmul takes as one piece (a token
// chunk, an expert's span).
struct Part {
    int64_t first, count;
};

// Where the active kernels read whole tiles of 16 tokens laid out for them (KernelTable::
// pack_tiles: AMX), the tiles of a quantized buffer's parts, each from its first row, laid out
// once on the pool for all the row groups and threads that read them rather than in every
// kernel call. Elsewhere, and for parts of fewer than 16 rows, it holds nothing.
class TileLayout {
  public:
    TileLayout(const KernelTable& table, const QuantizedBuffer& x, std::vector<Part> parts)
        : x_(x), parts_(std::move(parts)) {
        int64_t n = 0;  // rows in whole tiles
        for (const Part& part : parts_) n += whole_rows(part);
        if (table.pack_tiles == nullptr || n == 0) return;  // decode, or kernels that read rows in place
        offset_.assign(parts_.size() + 1, 0);
        for (size_t i = 0; i < parts_.size(); ++i) offset_[i + 1] = offset_[i] + whole_rows(parts_[i]);
        tiles_ = Scratch<int8_t>(n * x.k);
        tile_d_ = Scratch<float>(n * (x.k / kQuantBlock));
        // one task a tile (a prompt shorter than a chunk is one part): tile j of them all is tile
        // j - offset_[i] / 16 of the part i that holds it
        parallel_for(n / kTile, 0, [&](int64_t begin, int64_t end) {
            size_t i = 0;
            for (int64_t j = begin; j < end; ++j) {
                while (offset_[i + 1] <= j * kTile) ++i;
                const int64_t row = j * kTile - offset_[i];  // in part i
                table.pack_tiles(x_.rows(parts_[i].first + row, kTile), tiles_.get() + j * kTile * x_.k,
                                 tile_d_.get() + j * kTile * (x_.k / kQuantBlock));
            }
        });
    }

    // Part i's rows, with their tiles where laid out.
    QuantizedRows rows(int64_t i) const {
        QuantizedRows r = x_.rows(parts_[i].first, parts_[i].count);
        if (tiles_.get() != nullptr && offset_[i + 1] > offset_[i]) {
            r.tiles = tiles_.get() + offset_[i] * x_.k;
            r.tile_d = tile_d_.get() + offset_[i] * (x_.k / kQuantBlock);
        }
        return r;
    }

  private:
    static constexpr int64_t kTile = 16;  // tokens a tile
    static int64_t whole_rows(const Part& part) { return part.count / kTile * kTile; }
    const QuantizedBuffer& x_;
    std::vector<Part> parts_;
    std::vector<int64_t> offset_;  // part i's tiles: rows [offset_[i], offset_[i + 1]) of tiles_
    Scratch<int8_t> tiles_;
    Scratch<float> tile_d_;
};

void quantize_all(const KernelTable& table, const float* x, int64_t n_tokens, int64_t k,
                  QuantizedBuffer& out) {
    out.resize(n_tokens, k);
    if (n_tokens * k < (1 << 16)) {  // decode: not worth waking the pool
        for (int64_t t = 0; t < n_tokens; ++t) out.set_row(table, t, x + t * k);
        return;
    }
    parallel_for(n_tokens, 0, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) out.set_row(table, t, x + t * k);
    });
}

// Rows [g0 * 16, g1 * 16) (clipped to n) of one matrix for `n_tokens` tokens, on either path.
void matmul_groups(const KernelTable& table, const Matrix& w, const uint8_t* mat,
                   const float* x, const QuantizedRows* xq, int64_t n_tokens, int64_t g0,
                   int64_t g1, float* y, int64_t ldy) {
    const QTypeKernels& kernels = kernels_of_type(table, w.qtype);
    if (w.packed()) {
        kernels.matmul_packed(*xq, mat, w.n, g0, g1, y, ldy);
    } else {
        kernels.matmul_f32(x, n_tokens, mat, w.k, g0 * kRowGroup, std::min(g1 * kRowGroup, w.n),
                           y, ldy);
    }
}

// Row groups handed out per chunk: in prefill small, to balance the cores; in decode (one token,
// or two: qmatmul_impl.h, side_by_side) two chunks a thread, so that each chunk's side-by-side
// streams are long enough for the prefetchers. Interleaved runs of lfm-edge bench -t 2 -p 0 -n 128 (Zen 3 VM, Q4_0),
// 8-group chunks and 16 expert chunks a thread -> this: LFM2-350M 89-101 -> 109-115 tok/s;
// LFM2-1.2B (32.3-33.6 -> 29.5-35.7) and 8B-A1B (23.2-29.3 -> 24.7-27.1) within the noise.
int64_t grain_for(int64_t groups, int64_t n_tokens) {
    if (n_tokens > 2) return std::max<int64_t>(1, std::min<int64_t>(2, groups / (4 * num_threads())));
    return std::max<int64_t>(1, groups / (2 * num_threads()));
}

// Tokens per chunk of a long prompt's matmul: the chunk's int8 activations (k bytes a token)
// take half of a core's L2 (512 KB on Zen 3, 1-2 MB on recent Intel cores) while row groups
// stream past them; a multiple of every kernel's token tile, so chunking changes no result.
int64_t token_chunk(int64_t k) {
    constexpr int64_t kChunkBytes = 256 << 10, kTileMultiple = 16;
    return std::max<int64_t>(kTileMultiple, kChunkBytes / k / kTileMultiple * kTileMultiple);
}

// Tasks handed out per chunk of the expert matmuls (tasks: span x row group): at most a quarter
// of a matrix, as a task's cost follows its span's token count, so the two cores finish within a
// few tasks of each other; in decode (4 experts of one token) about 8 chunks a thread.
int64_t expert_grain(int64_t n_spans, int64_t groups) {
    return std::max<int64_t>(1, std::min<int64_t>(groups / 4, n_spans * groups / (4 * num_threads())));
}

// Tasks [begin, end) of a matmul over parts of its rows (task = part * groups + row group: a chunk
// of a long prompt, an expert's span) as runs of row groups of one part: body(part, g0, g1) for
// each, so that a kernel sees a whole run (decode reads the run's groups side by side: see
// qmatmul_impl.h, kDecodeStreams). A run of tasks may cross into the next part.
template <class Body>
void for_group_runs(int64_t begin, int64_t end, int64_t groups, const Body& body) {
    while (begin < end) {
        const int64_t part = begin / groups, g0 = begin % groups;
        const int64_t g1 = std::min(groups, g0 + end - begin);
        body(part, g0, g1);
        begin += g1 - g0;
    }
}

// body(begin, end) over [0, n) rows of `values` values each: on the pool, or on the calling
// thread when there are too few values to be worth waking it (decode).
void rows_on_pool(int64_t n, int64_t values, const std::function<void(int64_t, int64_t)>& body) {
    if (n * values < (1 << 16)) {
        body(0, n);
    } else {
        parallel_for(n, 0, body);
    }
}

// x [T, H] += y [T, H], a prompt's rows on the pool.
void add_rows(float* x, const float* y, int64_t n_tokens, int64_t hidden) {
    rows_on_pool(n_tokens, hidden, [&](int64_t t0, int64_t t1) {
        for (int64_t i = t0 * hidden; i < t1 * hidden; ++i) x[i] += y[i];
    });
}

// What pack_matrices asks of the pages it touches (Linux's madvise; elsewhere nothing):
// - kPopulate: the destination is made present a piece at a time just before it is packed, one
//   MADV_POPULATE_WRITE call (Linux >= 5.14) instead of a page fault per 4 KiB page, and the
//   zeroed pages are still in cache when the packer writes them. Where the call fails, the
//   packer's first writes fault the pages in as before.
// - kRelease: the source, a read-only file mapping, once copied is dropped from this process
//   (MADV_DONTNEED; the pages stay in the page cache), so that a load's peak memory is the packed
//   copy and not twice the file.
enum class PageAdvice { kPopulate, kRelease };
constexpr int64_t kPopulateBytes = 1 << 20;  // the destination is populated in pieces of this

// The advice for the whole pages inside [begin, end).
void advise_pages(const uint8_t* begin, const uint8_t* end, PageAdvice advice) {
#if defined(__linux__)
    constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE, in case the headers predate it
    const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    const uintptr_t first = (reinterpret_cast<uintptr_t>(begin) + page - 1) / page * page;
    const uintptr_t last = reinterpret_cast<uintptr_t>(end) / page * page;
    if (last > first) {
        madvise(reinterpret_cast<void*>(first), last - first,
                advice == PageAdvice::kPopulate ? kPopulateWrite : MADV_DONTNEED);
    }
#else
    (void)begin;
    (void)end;
    (void)advice;
#endif
}

}  // namespace

void pack_matrices(QType qtype, const uint8_t* src, int64_t n, int64_t k, int64_t n_mats,
                   uint8_t* out, bool release_source) {
    const int64_t groups = row_groups(n);
    const int64_t row_bytes = gguf_row_bytes(qtype, k);
    const int64_t src_bytes = n * row_bytes;
    const int64_t dst_bytes = packed_bytes(qtype, n, k);
    const int64_t group_bytes = dst_bytes / groups;
    // where task (matrix m, row group g)'s source rows begin: tasks in order read src in order,
    // and task n_mats * groups is its end
    auto source = [&](int64_t task) {
        const int64_t m = task / groups, g = task % groups;
        return src + m * src_bytes + std::min(g * kRowGroup, n) * row_bytes;
    };
    const int64_t tasks_per_populate = std::max<int64_t>(1, kPopulateBytes / group_bytes);
    parallel_for(n_mats * groups, 0, [&](int64_t begin, int64_t end) {
        for (int64_t t0 = begin; t0 < end; t0 += tasks_per_populate) {
            const int64_t t1 = std::min(end, t0 + tasks_per_populate);
            advise_pages(out + t0 * group_bytes, out + t1 * group_bytes, PageAdvice::kPopulate);
            for (int64_t task = t0; task < t1; ++task) {
                const int64_t m = task / groups, g = task % groups;
                pack_row_groups(qtype, src + m * src_bytes, n, k, g, g + 1, out + m * dst_bytes);
            }
            if (release_source) advise_pages(source(t0), source(t1), PageAdvice::kRelease);
        }
    });
    // the pages that straddled two threads' pieces
    if (release_source) advise_pages(src, src + n_mats * src_bytes, PageAdvice::kRelease);
}

void linear(const Matrix& w, int64_t index, const float* x, int64_t n_tokens, float* y) {
    const KernelTable& table = active_kernels();
    QuantizedBuffer xq;
    if (w.packed()) quantize_all(table, x, n_tokens, w.k, xq);
    const uint8_t* mat = w.mat(index);
    const int64_t groups = row_groups(w.n);
    // Tasks (token chunk, row group), chunk by chunk: a long prompt's activations do not fit
    // in L2, a chunk's do, and every row group then reads them from there.
    const int64_t chunk = token_chunk(w.k);
    const int64_t n_chunks = (n_tokens + chunk - 1) / chunk;
    std::vector<Part> chunks;
    for (int64_t t0 = 0; t0 < n_tokens; t0 += chunk) chunks.push_back({t0, std::min(chunk, n_tokens - t0)});
    const TileLayout tiles(table, xq, w.packed() ? std::move(chunks) : std::vector<Part>{});
    parallel_for(n_chunks * groups, grain_for(groups, n_tokens), [&](int64_t begin, int64_t end) {
        for_group_runs(begin, end, groups, [&](int64_t c, int64_t g0, int64_t g1) {
            const int64_t t0 = c * chunk, count = std::min(chunk, n_tokens - t0);
            const QuantizedRows rows = w.packed() ? tiles.rows(c) : QuantizedRows{};
            matmul_groups(table, w, mat, x + t0 * w.k, &rows, count, g0, g1, y + t0 * w.n, w.n);
        });
    });
}

void moe(const float* x, int64_t n_tokens, const int32_t* experts, const float* weights,
         int64_t top_k, const Matrix& gate, const Matrix& up, const Matrix& down, float* out) {
    const KernelTable& table = active_kernels();
    const int64_t hidden = gate.k, ffn = gate.n, n_expert = gate.n_mats;

    // One row per token-expert pair in every [n_rows, ...] buffer below, grouped by expert in
    // ascending id order and in token order within an expert (as ops.moe): expert e's rows
    // are [first[e], first[e + 1]).
    const int64_t n_rows = n_tokens * top_k;
    std::vector<int64_t> first(static_cast<size_t>(n_expert + 1), 0);
    for (int64_t p = 0; p < n_rows; ++p) ++first[experts[p] + 1];
    for (int64_t e = 0; e < n_expert; ++e) first[e + 1] += first[e];
    std::vector<int64_t> row_token(static_cast<size_t>(n_rows));  // the token of each row
    std::vector<float> row_weight(static_cast<size_t>(n_rows));    // its router weight
    {
        std::vector<int64_t> next(first.begin(), first.end() - 1);
        for (int64_t p = 0; p < n_rows; ++p) {
            const int64_t r = next[experts[p]]++;
            row_token[r] = p / top_k;
            row_weight[r] = weights[p];
        }
    }
    // Each token's rows, in ascending expert order: the order of the weighted sum.
    std::vector<int64_t> token_rows(static_cast<size_t>(n_rows));  // [T, top_k]
    {
        std::vector<int64_t> filled(static_cast<size_t>(n_tokens), 0);
        for (int64_t r = 0; r < n_rows; ++r) {
            const int64_t t = row_token[r];
            token_rows[t * top_k + filled[t]++] = r;
        }
    }

    // The matmuls' work items: an expert's rows, cut into chunks whose activations fit in L2.
    struct Span {
        int64_t expert, first, count;
    };
    std::vector<Span> spans;
    std::vector<Part> span_rows;  // each span's rows, for its tiles
    const int64_t chunk = token_chunk(std::max(hidden, ffn));
    for (int64_t e = 0; e < n_expert; ++e) {
        for (int64_t r = first[e]; r < first[e + 1]; r += chunk) {
            spans.push_back({e, r, std::min(chunk, first[e + 1] - r)});
            span_rows.push_back({r, spans.back().count});
        }
    }
    const auto n_spans = static_cast<int64_t>(spans.size());

    // Each row's input is its token's row: quantized once per token (xt) if the weights are
    // packed, else the floats. Where the rows are the tokens in order (a dense FFN) they are read
    // in place; otherwise copied to each of the token's rows (xq, xs).
    bool rows_are_tokens = n_rows == n_tokens;
    for (int64_t r = 0; rows_are_tokens && r < n_rows; ++r) rows_are_tokens = row_token[r] == r;
    QuantizedBuffer xt, xq;
    Scratch<float> xs;  // [n_rows, H]
    if (gate.packed()) quantize_all(table, x, n_tokens, hidden, xt);
    if (!rows_are_tokens) {
        if (gate.packed()) {
            xq.resize(n_rows, hidden);
        } else {
            xs = Scratch<float>(n_rows * hidden);
        }
        rows_on_pool(n_rows, hidden, [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
                if (gate.packed()) {
                    xq.copy_row(r, xt, row_token[r]);
                } else {
                    std::copy_n(x + row_token[r] * hidden, hidden, xs.get() + r * hidden);
                }
            }
        });
    }
    const QuantizedBuffer& x_rows = rows_are_tokens ? xt : xq;
    const float* x_floats = rows_are_tokens ? x : xs.get();
    const TileLayout x_tiles(table, x_rows, gate.packed() ? span_rows : std::vector<Part>{});

    // h = silu(gate(x)) * up(x): tasks (span, row group), each both matrices' group and then
    // the product over the group's columns while they are in cache.
    const int64_t ffn_groups = row_groups(ffn);
    Scratch<float> h(n_rows * ffn), u(n_rows * ffn);  // [n_rows, F]
    parallel_for(n_spans * ffn_groups, expert_grain(n_spans, ffn_groups), [&](int64_t begin, int64_t end) {
        for_group_runs(begin, end, ffn_groups, [&](int64_t span, int64_t g0, int64_t g1) {
            const Span& s = spans[span];
            const QuantizedRows rows = gate.packed() ? x_tiles.rows(span) : QuantizedRows{};
            const float* xf = gate.packed() ? nullptr : x_floats + s.first * hidden;
            matmul_groups(table, gate, gate.mat(s.expert), xf, &rows, s.count, g0, g1, h.get() + s.first * ffn, ffn);
            matmul_groups(table, up, up.mat(s.expert), xf, &rows, s.count, g0, g1, u.get() + s.first * ffn, ffn);
            const int64_t c0 = g0 * kRowGroup, c1 = std::min(g1 * kRowGroup, ffn);
            for (int64_t r = s.first; r < s.first + s.count; ++r) {
                table.silu_mul(h.get() + r * ffn + c0, u.get() + r * ffn + c0, c1 - c0);
            }
        });
    });
    QuantizedBuffer hq;
    if (down.packed()) quantize_all(table, h.get(), n_rows, ffn, hq);
    const TileLayout h_tiles(table, hq, down.packed() ? std::move(span_rows) : std::vector<Part>{});

    const int64_t hidden_groups = row_groups(hidden);
    Scratch<float> yd(n_rows * hidden);  // [n_rows, H]
    parallel_for(n_spans * hidden_groups, expert_grain(n_spans, hidden_groups), [&](int64_t begin, int64_t end) {
        for_group_runs(begin, end, hidden_groups, [&](int64_t span, int64_t g0, int64_t g1) {
            const Span& s = spans[span];
            const QuantizedRows rows = down.packed() ? h_tiles.rows(span) : QuantizedRows{};
            matmul_groups(table, down, down.mat(s.expert), h.get() + s.first * ffn, &rows, s.count, g0, g1,
                          yd.get() + s.first * hidden, hidden);
        });
    });

    // The weighted sum, each token's experts in ascending order, like ops.moe.
    rows_on_pool(n_tokens, top_k * hidden, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            float* o = out + t * hidden;
            std::fill_n(o, hidden, 0.0f);
            for (int64_t j = 0; j < top_k; ++j) {
                const int64_t r = token_rows[t * top_k + j];
                const float* y = yd.get() + r * hidden;
                const float wt = row_weight[r];
                for (int64_t c = 0; c < hidden; ++c) o[c] += y[c] * wt;
            }
        }
    });
}

void rms_norm(const float* x, int64_t rows, int64_t n, const float* w, float eps, float* out) {
    // a prompt's rows on the pool (each row on its own: the same bits on any number of threads)
    rows_on_pool(rows, n, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* xr = x + r * n;
            // the squares summed in double as eight interleaved partial sums (element i into sum
            // i % 8), added in a fixed order: a row's own bits wherever it runs, and eight chains
            // of additions instead of one, whose latency had made the norms 2-3% of a prompt
            double part[8] = {};
            int64_t i = 0;
            for (; i + 8 <= n; i += 8) {
                for (int j = 0; j < 8; ++j) part[j] += static_cast<double>(xr[i + j]) * xr[i + j];
            }
            for (int j = 0; i < n; ++i, ++j) part[j] += static_cast<double>(xr[i]) * xr[i];
            const double squares = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
            const float denominator = std::sqrt(static_cast<float>(squares / static_cast<double>(n)) + eps);
            float* o = out + r * n;
            for (int64_t i = 0; i < n; ++i) o[i] = (xr[i] / denominator) * w[i];
        }
    });
}

void short_conv(const float* bx, int64_t n_tokens, int64_t hidden, float* state,
                const float* kernel, int64_t width, float* y) {
    // window = [state; bx], rows 0 .. L-2 + T; y[t] = sum_j window[t + j] * kernel[:, j]
    const int64_t carried = width - 1;
    auto window = [&](int64_t row) { return row < carried ? state + row * hidden : bx + (row - carried) * hidden; };
    rows_on_pool(n_tokens, width * hidden, [&](int64_t t0, int64_t t1) {  // each token on its own
        for (int64_t t = t0; t < t1; ++t) {
            float* yt = y + t * hidden;
            std::fill_n(yt, hidden, 0.0f);
            for (int64_t j = 0; j < width; ++j) {
                const float* in = window(t + j);
                for (int64_t c = 0; c < hidden; ++c) yt[c] += in[c] * kernel[c * width + j];
            }
        }
    });
    // the new state: the last L-1 rows of the window
    std::vector<float> last(static_cast<size_t>(carried * hidden));
    for (int64_t r = 0; r < carried; ++r) std::copy_n(window(n_tokens + r), hidden, last.data() + r * hidden);
    std::copy(last.begin(), last.end(), state);
}

void gated_short_conv(const float* bcx, int64_t n_tokens, int64_t hidden, float* state,
                      const float* kernel, int64_t width, float* y) {
    Scratch<float> bx(n_tokens * hidden);  // [T, H]
    rows_on_pool(n_tokens, hidden, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const float* b = bcx + t * 3 * hidden;
            const float* xx = b + 2 * hidden;
            for (int64_t c = 0; c < hidden; ++c) bx[t * hidden + c] = b[c] * xx[c];
        }
    });
    short_conv(bx.get(), n_tokens, hidden, state, kernel, width, y);
    rows_on_pool(n_tokens, hidden, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const float* c_gate = bcx + t * 3 * hidden + hidden;
            for (int64_t c = 0; c < hidden; ++c) y[t * hidden + c] *= c_gate[c];
        }
    });
}

void swiglu_block(float* x, int64_t n_tokens, const float* norm, float eps, const Matrix& gate,
                  const Matrix& up, const Matrix& down) {
    const int64_t hidden = gate.k;
    Scratch<float> h(n_tokens * hidden), y(n_tokens * hidden);  // [T, H]
    rms_norm(x, n_tokens, hidden, norm, eps, h.get());
    // one expert of weight 1 for every token, as ops.swiglu runs it
    const std::vector<int32_t> expert(static_cast<size_t>(n_tokens), 0);
    const std::vector<float> weight(static_cast<size_t>(n_tokens), 1.0f);
    moe(h.get(), n_tokens, expert.data(), weight.data(), 1, gate, up, down, y.get());
    add_rows(x, y.get(), n_tokens, hidden);
}

void moe_block(float* x, int64_t n_tokens, const float* norm, float eps, const MoERouter& router,
               const Matrix& gate, const Matrix& up, const Matrix& down) {
    const int64_t hidden = gate.k, n_expert = gate.n_mats, top_k = router.top_k;
    Scratch<float> h(n_tokens * hidden), y(n_tokens * hidden);  // [T, H]
    Scratch<float> logits(n_tokens * n_expert), weights(n_tokens * top_k);
    std::vector<int32_t> experts(static_cast<size_t>(n_tokens * top_k));
    rms_norm(x, n_tokens, hidden, norm, eps, h.get());
    linear(*router.router, 0, h.get(), n_tokens, logits.get());
    route(logits.get(), n_tokens, n_expert, router.expert_bias, top_k, router.normalize, router.scale,
          experts.data(), weights.get());
    moe(h.get(), n_tokens, experts.data(), weights.get(), top_k, gate, up, down, y.get());
    add_rows(x, y.get(), n_tokens, hidden);
}

void feed_forward_block(const FeedForward& ffn, float* x, int64_t n_tokens, float eps) {
    if (ffn.moe != nullptr) {
        moe_block(x, n_tokens, ffn.norm, eps, *ffn.moe, *ffn.gate, *ffn.up, *ffn.down);
    } else {
        swiglu_block(x, n_tokens, ffn.norm, eps, *ffn.gate, *ffn.up, *ffn.down);
    }
}

void conv_layer(const ConvLayer& layer, float* x, int64_t n_tokens, float* state) {
    const int64_t hidden = layer.out_proj->n;
    Scratch<float> h(n_tokens * hidden), y(n_tokens * hidden);  // [T, H]
    Scratch<float> bcx(n_tokens * 3 * hidden);  // [T, 3H]
    rms_norm(x, n_tokens, hidden, layer.operator_norm, layer.eps, h.get());
    linear(*layer.in_proj, 0, h.get(), n_tokens, bcx.get());
    gated_short_conv(bcx.get(), n_tokens, hidden, state, layer.kernel, layer.width, h.get());
    linear(*layer.out_proj, 0, h.get(), n_tokens, y.get());
    add_rows(x, y.get(), n_tokens, hidden);
    feed_forward_block(layer.ffn, x, n_tokens, layer.eps);
}

namespace {

// Rows [T, n_kv, d] of new keys or values into a head-major cache [n_kv, capacity, d] at
// positions start .., as float16 (rounded as numpy's astype) or float32.
void store_kv(const float* rows, int64_t n_tokens, int64_t n_kv, int64_t d, void* cache, KvType type,
              int64_t capacity, int64_t start) {
    for (int64_t head = 0; head < n_kv; ++head) {
        for (int64_t t = 0; t < n_tokens; ++t) {
            const float* src = rows + (t * n_kv + head) * d;
            const int64_t at = (head * capacity + start + t) * d;
            if (type == KvType::F16) {
                uint16_t* dst = static_cast<uint16_t*>(cache) + at;
                for (int64_t i = 0; i < d; ++i) dst[i] = f32_to_fp16(src[i]);
            } else {
                std::copy_n(src, d, static_cast<float*>(cache) + at);
            }
        }
    }
}

}  // namespace

void attention_layer(const AttentionLayer& layer, float* x, int64_t n_tokens, const KvSlots& kv, int64_t start) {
    const int64_t hidden = layer.wo->n, d = layer.head_dim;
    const int64_t q_width = layer.n_heads * d, kv_width = layer.n_kv * d;
    Scratch<float> h(n_tokens * hidden), y(n_tokens * hidden);  // [T, H]
    Scratch<float> q(n_tokens * q_width), attended(n_tokens * q_width);  // [T, n_heads, d]
    Scratch<float> k(n_tokens * kv_width), v(n_tokens * kv_width);  // [T, n_kv, d]
    rms_norm(x, n_tokens, hidden, layer.operator_norm, layer.eps, h.get());
    linear(*layer.wq, 0, h.get(), n_tokens, q.get());
    linear(*layer.wk, 0, h.get(), n_tokens, k.get());
    linear(*layer.wv, 0, h.get(), n_tokens, v.get());
    std::vector<int64_t> positions(static_cast<size_t>(n_tokens));
    for (int64_t t = 0; t < n_tokens; ++t) positions[t] = start + t;
    rms_norm(q.get(), n_tokens * layer.n_heads, d, layer.q_norm, layer.eps, q.get());  // row by row: in place is safe
    rms_norm(k.get(), n_tokens * layer.n_kv, d, layer.k_norm, layer.eps, k.get());
    rope(q.get(), n_tokens, layer.n_heads, d, positions.data(), layer.rope_base);
    rope(k.get(), n_tokens, layer.n_kv, d, positions.data(), layer.rope_base);
    store_kv(k.get(), n_tokens, layer.n_kv, d, kv.keys, kv.type, kv.capacity, start);
    store_kv(v.get(), n_tokens, layer.n_kv, d, kv.values, kv.type, kv.capacity, start);
    const AttentionArgs args{q.get(), kv.keys, kv.values, attended.get(), layer.n_heads, layer.n_kv, d, start,
                             kv.capacity * d, kv.type, static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)))};
    attention(args, n_tokens);
    linear(*layer.wo, 0, attended.get(), n_tokens, y.get());
    add_rows(x, y.get(), n_tokens, hidden);
    feed_forward_block(layer.ffn, x, n_tokens, layer.eps);
}

void decoder_layers(const DecoderLayer* layers, int64_t n_layers, float* x, int64_t n_tokens, float* conv_states,
                    const KvSlots* kv, int64_t start) {
    for (int64_t i = 0; i < n_layers; ++i) {
        if (const ConvLayer* conv = layers[i].conv) {
            conv_layer(*conv, x, n_tokens, conv_states);
            conv_states += (conv->width - 1) * conv->out_proj->n;
        } else {
            attention_layer(*layers[i].attention, x, n_tokens, *kv++, start);
        }
    }
}

void rope(float* x, int64_t n_tokens, int64_t n_heads, int64_t d, const int64_t* positions,
          double base) {
    const int64_t half = d / 2;
    std::vector<double> inv_freq(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i) {
        inv_freq[i] = 1.0 / std::pow(base, static_cast<double>(2 * i) / static_cast<double>(d));
    }
    std::vector<float> cos_t(static_cast<size_t>(half)), sin_t(static_cast<size_t>(half));
    for (int64_t t = 0; t < n_tokens; ++t) {
        for (int64_t i = 0; i < half; ++i) {
            const double angle = static_cast<double>(positions[t]) * inv_freq[i];
            cos_t[i] = static_cast<float>(std::cos(angle));
            sin_t[i] = static_cast<float>(std::sin(angle));
        }
        for (int64_t h = 0; h < n_heads; ++h) {
            float* v = x + (t * n_heads + h) * d;
            for (int64_t i = 0; i < half; ++i) {
                const float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * cos_t[i] - x2 * sin_t[i];
                v[i + half] = x2 * cos_t[i] + x1 * sin_t[i];
            }
        }
    }
}

void attention(const AttentionArgs& args, int64_t n_tokens) {
    const KernelTable& table = active_kernels();
    // Query rows per task: as many as the kernel takes in one call (kernels.h); the causal tail
    // balances itself. A KV head's tasks run one after the other, so that the threads share its
    // keys and values in the caches (KV head by KV head: a 4096-token prompt's attention took a
    // third longer when the tasks went row block by row block through all the heads).
    const int64_t rows = attention_call_rows(args.n_heads / args.n_kv);
    const int64_t tiles = (n_tokens + rows - 1) / rows;
    parallel_for(args.n_kv * tiles, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
            const int64_t kvh = task / tiles, tile = task % tiles;
            const int64_t t0 = tile * rows;
            table.attention(args, kvh, t0, std::min(t0 + rows, n_tokens));
        }
    });
}

void route(const float* logits, int64_t n_tokens, int64_t n_expert, const float* bias,
           int64_t top_k, bool normalize, float scale, int32_t* experts, float* weights) {
    std::vector<float> score(static_cast<size_t>(n_expert)), choice(score.size());
    std::vector<int32_t> order(score.size());
    for (int64_t t = 0; t < n_tokens; ++t) {
        for (int64_t e = 0; e < n_expert; ++e) {
            score[e] = 1.0f / (1.0f + std::exp(-logits[t * n_expert + e]));
            choice[e] = bias ? score[e] + bias[e] : score[e];
            // NaN last: the comparison below must be a strict weak order (else sorting is UB)
            if (std::isnan(choice[e])) choice[e] = -std::numeric_limits<float>::infinity();
            order[e] = static_cast<int32_t>(e);
        }
        // best first; ties to the lower id, as a stable argsort of -choice (and torch.topk)
        std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int32_t a, int32_t b) {
            return choice[a] > choice[b] || (choice[a] == choice[b] && a < b);
        });
        float total = 0.0f;
        for (int64_t j = 0; j < top_k; ++j) total += score[order[j]];
        for (int64_t j = 0; j < top_k; ++j) {
            float w = score[order[j]];
            if (normalize) w = w / (total + 1e-6f);
            experts[t * top_k + j] = order[j];
            weights[t * top_k + j] = w * scale;
        }
    }
}

}  // namespace lfm
