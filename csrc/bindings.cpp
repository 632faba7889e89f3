// The Python module lfm_edge._C. Compiled with baseline flags.
//
// Every size, shape, dtype and layout handed in from Python is checked here, with a ValueError
// that says what was wrong; the kernels behind the table trust what they get.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dispatch.h"
#include "formats.h"
#include "kernels.h"
#include "ops.h"
#include "pack.h"
#include "packed.h"
#include "qtypes.h"
#include "threadpool.h"

namespace py = pybind11;

void add_probe_bindings(py::module_& m);  // probe_bindings.cpp

namespace {

using lfm::QType;

// Nanoseconds spent inside kernels, with the GIL released, since the module loaded: what a
// decode step spends outside them is the Python (and binding) overhead that bench reports.
std::atomic<int64_t> g_kernel_ns{0};

// Releases the GIL for a kernel call and adds its duration to g_kernel_ns.
class KernelSection {
   public:
    KernelSection() : start_(std::chrono::steady_clock::now()) {}
    ~KernelSection() {
        const auto elapsed = std::chrono::steady_clock::now() - start_;
        g_kernel_ns.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed).count(),
                              std::memory_order_relaxed);
    }
    KernelSection(const KernelSection&) = delete;
    KernelSection& operator=(const KernelSection&) = delete;

   private:
    py::gil_scoped_release release_;
    std::chrono::steady_clock::time_point start_;
};

const char* qtype_name(QType qtype) { return lfm::qtype_info(qtype).name; }

// For a packed-only operation on a type the kernels read in the file's own layout.
py::value_error not_repacked(QType qtype) {
    return py::value_error(std::string(qtype_name(qtype)) + " matrices are not repacked");
}

// "F32=0, F16=1, ..." for the error messages, from the type table.
std::string known_qtypes() {
    std::string out;
    for (const lfm::QTypeInfo& info : lfm::kQTypes) {
        out += (out.empty() ? "" : ", ") + std::string(info.name) + "=" +
               std::to_string(static_cast<int>(info.qtype));
    }
    return out;
}

QType checked_qtype(int64_t id) {
    if (const lfm::QTypeInfo* info = lfm::find_qtype(id)) return info->qtype;
    throw py::value_error("qtype " + std::to_string(id) + " is not supported; use a GGML type id: " +
                          known_qtypes());
}

int64_t checked_mul(int64_t a, int64_t b, const std::string& what) {
    int64_t product = 0;
    if (__builtin_mul_overflow(a, b, &product)) throw py::value_error(what + " is too large");
    return product;
}

// Bytes in one row of k weights of this type.
int64_t checked_row_bytes(QType qtype, int64_t k) {
    if (k <= 0) throw py::value_error("k must be positive, got " + std::to_string(k));
    const lfm::QTypeInfo& info = lfm::qtype_info(qtype);
    if (info.block_values == 1) return checked_mul(k, info.block_bytes, "k");
    if (k % info.block_values != 0) {
        const bool super = info.block_values == 256;
        throw py::value_error("k = " + std::to_string(k) + " is not a multiple of " +
                              std::to_string(info.block_values) + ", which " + info.name + " rows (" +
                              (super ? "super-blocks" : "blocks") + " of " +
                              std::to_string(info.block_values) + " weights) require");
    }
    return lfm::gguf_row_bytes(qtype, k);
}

bool is_c_contiguous(const py::buffer_info& info) {
    py::ssize_t expected_stride = info.itemsize;
    for (py::ssize_t dim = info.ndim - 1; dim >= 0; --dim) {
        if (info.shape[dim] != 1 && info.strides[dim] != expected_stride) return false;
        expected_stride *= info.shape[dim];
    }
    return true;
}

// The weight matrix [n, k] of `qtype` as raw bytes: w may have any dtype, but must be
// C-contiguous and hold exactly n rows.
py::buffer_info checked_weights(const py::buffer& w, QType qtype, int64_t n, int64_t k) {
    if (n <= 0) throw py::value_error("n must be positive, got " + std::to_string(n));
    const int64_t row_bytes = checked_row_bytes(qtype, k);
    const int64_t expected = checked_mul(n, row_bytes, "n * row_bytes");
    py::buffer_info info = w.request();
    if (!is_c_contiguous(info)) throw py::value_error("w must be a C-contiguous buffer");
    const int64_t nbytes = static_cast<int64_t>(info.size) * info.itemsize;
    if (nbytes != expected) {
        throw py::value_error("w holds " + std::to_string(nbytes) + " bytes, but " +
                              std::to_string(n) + " rows of " + qtype_name(qtype) +
                              " with k = " + std::to_string(k) + " take " +
                              std::to_string(expected) + " bytes (" + std::to_string(row_bytes) +
                              " per row)");
    }
    return info;
}

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

// x must be float32 [T, k], C-contiguous and aligned.
void check_activations(const py::array& x, int64_t k) {
    if (!x.dtype().equal(py::dtype::of<float>())) {
        throw py::value_error("x must be float32, got " + dtype_name(x));
    }
    if (x.ndim() != 2) {
        throw py::value_error("x must be 2-D [T, k], got " + std::to_string(x.ndim()) + "-D");
    }
    if (x.shape(1) != k) {
        throw py::value_error("x has " + std::to_string(x.shape(1)) + " columns but k = " +
                              std::to_string(k));
    }
    if (!(x.flags() & py::array::c_style)) {
        throw py::value_error("x must be C-contiguous (np.ascontiguousarray makes a copy that is)");
    }
    if (reinterpret_cast<uintptr_t>(x.data()) % alignof(float) != 0) {
        throw py::value_error("x must be aligned to 4 bytes");
    }
}

// ids as int64, each checked to name a row in [0, n).
std::vector<int64_t> checked_ids(const py::array& ids, int64_t n) {
    const bool is_int32 = ids.dtype().equal(py::dtype::of<int32_t>());
    const bool is_int64 = ids.dtype().equal(py::dtype::of<int64_t>());
    if (!is_int32 && !is_int64) {
        throw py::value_error("ids must be int32 or int64, got " + dtype_name(ids));
    }
    if (ids.ndim() != 1) {
        throw py::value_error("ids must be 1-D, got " + std::to_string(ids.ndim()) + "-D");
    }
    const auto* base = static_cast<const char*>(ids.data());
    std::vector<int64_t> rows(static_cast<size_t>(ids.shape(0)));
    for (py::ssize_t i = 0; i < ids.shape(0); ++i) {
        const char* item = base + i * ids.strides(0);
        int64_t id = 0;
        if (is_int32) {
            int32_t id32 = 0;
            std::memcpy(&id32, item, sizeof id32);
            id = id32;
        } else {
            std::memcpy(&id, item, sizeof id);
        }
        if (id < 0 || id >= n) {
            throw py::value_error("ids[" + std::to_string(i) + "] = " + std::to_string(id) +
                                  " is out of range for a table of n = " + std::to_string(n) +
                                  " rows");
        }
        rows[static_cast<size_t>(i)] = id;
    }
    return rows;
}

const lfm::QTypeKernels& active_kernels_for(QType qtype) {
    return *lfm::kernels_for(lfm::active_kernels(), qtype);  // qtype was checked: never null
}

py::array_t<float> matmul(const py::array& x, const py::buffer& w, int64_t qtype_id, int64_t n,
                          int64_t k) {
    const QType qtype = checked_qtype(qtype_id);
    const py::buffer_info weights = checked_weights(w, qtype, n, k);
    check_activations(x, k);
    const int64_t n_tokens = x.shape(0);
    py::array_t<float> y({n_tokens, n});  // [T, n]
    const lfm::QTypeKernels& kernels = active_kernels_for(qtype);
    const auto* x_data = static_cast<const float*>(x.data());
    const auto* w_data = static_cast<const uint8_t*>(weights.ptr);
    float* y_data = y.mutable_data();
    {
        KernelSection kernel;
        kernels.matmul_f32(x_data, n_tokens, w_data, k, 0, n, y_data, n);
    }
    return y;
}

py::array_t<float> dequantize(const py::buffer& w, int64_t qtype_id, int64_t n, int64_t k) {
    const QType qtype = checked_qtype(qtype_id);
    const py::buffer_info weights = checked_weights(w, qtype, n, k);
    const int64_t row_bytes = checked_row_bytes(qtype, k);
    py::array_t<float> out({n, k});  // [n, k]
    const lfm::QTypeKernels& kernels = active_kernels_for(qtype);
    const auto* w_data = static_cast<const uint8_t*>(weights.ptr);
    float* out_data = out.mutable_data();
    {
        KernelSection kernel;
        for (int64_t row = 0; row < n; ++row) {
            kernels.dequantize_row(w_data + row * row_bytes, k, out_data + row * k);
        }
    }
    return out;
}

py::array_t<float> get_rows(const py::buffer& w, int64_t qtype_id, int64_t n, int64_t k,
                            const py::array& ids) {
    const QType qtype = checked_qtype(qtype_id);
    const py::buffer_info weights = checked_weights(w, qtype, n, k);
    const int64_t row_bytes = checked_row_bytes(qtype, k);
    const std::vector<int64_t> rows = checked_ids(ids, n);
    const auto n_rows = static_cast<int64_t>(rows.size());
    py::array_t<float> out({n_rows, k});  // [len(ids), k]
    const lfm::QTypeKernels& kernels = active_kernels_for(qtype);
    const auto* w_data = static_cast<const uint8_t*>(weights.ptr);
    float* out_data = out.mutable_data();
    {
        KernelSection kernel;
        for (int64_t i = 0; i < n_rows; ++i) {
            kernels.dequantize_row(w_data + rows[i] * row_bytes, k, out_data + i * k);
        }
    }
    return out;
}

std::vector<std::string> cpu_isas() {
    std::vector<std::string> names;
    for (const lfm::KernelTable* table : lfm::usable_kernel_tables()) names.push_back(table->isa);
    return names;
}

void set_isa(const std::string& name) {
    if (lfm::set_active_kernels(name)) return;
    std::string usable;
    for (const std::string& isa : cpu_isas()) usable += (usable.empty() ? "" : ", ") + isa;
    throw py::value_error("instruction set '" + name +
                          "' is not available; this CPU and build support: " + usable);
}


// ------------------------------------------------------------------ packed weights and ops

// Refuses a `mapping` that is not a read-only mmap.mmap holding w's bytes: dropping pages is only
// harmless for a file mapping no one writes (anonymous memory would read back as zeros).
void check_read_only_mapping_holds(const py::buffer_info& w, const py::object& mapping) {
    if (!py::isinstance(mapping, py::module_::import("mmap").attr("mmap"))) {
        throw py::type_error("mapping must be an mmap.mmap or None");
    }
    const py::buffer_info m = mapping.cast<py::buffer>().request();
    if (!m.readonly) throw py::value_error("mapping must be read-only (mmap.ACCESS_READ)");
    const auto begin = reinterpret_cast<uintptr_t>(w.ptr), m_begin = reinterpret_cast<uintptr_t>(m.ptr);
    const auto bytes = static_cast<uintptr_t>(w.size * w.itemsize), m_bytes = static_cast<uintptr_t>(m.size * m.itemsize);
    if (begin < m_begin || begin - m_begin > m_bytes || bytes > m_bytes - (begin - m_begin)) {
        throw py::value_error("the weights do not lie inside the given mapping");
    }
}

struct FromPacked {};

// A weight matrix (or a stack of them) ready for the kernels: the quantized types repacked into an
// aligned buffer it owns (or borrowed, already packed), float types as the caller's buffer, kept
// alive by a reference.
class PackedMatrix {
   public:
    // `mapping`, if not None, is the read-only mmap.mmap that w lies in: packing then drops the
    // pages of it that it has read (they fault back in from the file if read again).
    PackedMatrix(const py::buffer& w, QType qtype, int64_t n, int64_t k, int64_t n_mats, const py::object& mapping) {
        if (n_mats <= 0) throw py::value_error("n_mats must be positive, got " + std::to_string(n_mats));
        const py::buffer_info info = checked_weights(w, qtype, checked_mul(n, n_mats, "n * n_mats"), k);
        const bool release_source = !mapping.is_none();
        if (release_source) check_read_only_mapping_holds(info, mapping);
        matrix_ = {qtype, n, k, n_mats, 0, nullptr};
        const auto* src = static_cast<const uint8_t*>(info.ptr);
        if (matrix_.packed()) {
            matrix_.mat_bytes = lfm::packed_bytes(qtype, n, k);
            const int64_t total = checked_mul(matrix_.mat_bytes, n_mats, "the packed size");
            const auto rounded = static_cast<size_t>((total + 63) / 64 * 64);
            storage_.reset(static_cast<uint8_t*>(std::aligned_alloc(64, rounded)));
            if (!storage_) throw std::bad_alloc();
            {
                KernelSection kernel;
                lfm::pack_matrices(qtype, src, n, k, n_mats, storage_.get(), release_source);
            }
            matrix_.data = storage_.get();
        } else {
            matrix_.mat_bytes = checked_row_bytes(qtype, k) * n;
            matrix_.data = src;
            owner_ = w;  // the kernels read the caller's bytes
        }
    }

    // Borrows n_mats matrices already in the kernels' layout: the bytes another PackedMatrix's
    // packed_bytes() gave, saved and mapped back. Only their size and alignment can be checked
    // here (lfm_edge/weight_cache.py checks a CRC of them first); `packed` is kept alive.
    PackedMatrix(FromPacked, const py::buffer& packed, QType qtype, int64_t n, int64_t k, int64_t n_mats) {
        if (!lfm::is_packed_type(qtype)) {
            throw not_repacked(qtype);
        }
        if (n <= 0) throw py::value_error("n must be positive, got " + std::to_string(n));
        if (n_mats <= 0) throw py::value_error("n_mats must be positive, got " + std::to_string(n_mats));
        const py::buffer_info info = packed.request();
        if (!is_c_contiguous(info)) throw py::value_error("packed must be a C-contiguous buffer");
        const int64_t nbytes = static_cast<int64_t>(info.size) * info.itemsize;
        // a packed matrix is never smaller than the file's rows (it adds padding rows and wider
        // scales, a few percent), so this bounds n and k before packed_bytes multiplies them
        const int64_t gguf_bytes = checked_mul(checked_mul(n, n_mats, "n * n_mats"), checked_row_bytes(qtype, k),
                                               "the matrices' size");
        const int64_t expected = gguf_bytes <= nbytes ? lfm::packed_bytes(qtype, n, k) * n_mats : -1;
        if (nbytes != expected) {
            throw py::value_error("packed holds " + std::to_string(nbytes) + " bytes, not the packed size of " +
                                  std::to_string(n_mats) + " x [" + std::to_string(n) + ", " + std::to_string(k) +
                                  "] " + qtype_name(qtype));
        }
        if (reinterpret_cast<uintptr_t>(info.ptr) % 64 != 0) throw py::value_error("packed must be 64-byte aligned");
        matrix_ = {qtype, n, k, n_mats, expected / n_mats, static_cast<const uint8_t*>(info.ptr)};
        owner_ = packed;
    }

    const lfm::Matrix& matrix() const { return matrix_; }
    int64_t nbytes() const { return matrix_.mat_bytes * matrix_.n_mats; }

    // The kernels' bytes of a repacked matrix, read-only uint8 [nbytes], for saving (a view:
    // `self` is kept alive by it).
    static py::array_t<uint8_t> packed_bytes(const py::object& self) {
        const PackedMatrix& p = self.cast<const PackedMatrix&>();
        if (!p.matrix_.packed()) {
            throw not_repacked(p.matrix_.qtype);
        }
        py::array_t<uint8_t> view({p.nbytes()}, {int64_t{1}}, p.matrix_.data, self);
        view.attr("flags").attr("writeable") = false;
        return view;
    }

    // The GGUF bytes the kernels' copy stands for, [n_mats * n, row_bytes]: for the tests, which
    // show the repacking lossless by comparing them with the file's.
    py::array_t<uint8_t> gguf_bytes() const {
        const lfm::Matrix& m = matrix_;
        const int64_t row_bytes = checked_row_bytes(m.qtype, m.k);
        py::array_t<uint8_t> out({m.n_mats * m.n, row_bytes});
        uint8_t* dst = out.mutable_data();
        for (int64_t i = 0; i < m.n_mats; ++i) {
            if (m.packed()) {
                lfm::unpack_matrix(m.qtype, m.mat(i), m.n, m.k, dst + i * m.n * row_bytes);
            } else {
                std::memcpy(dst + i * m.n * row_bytes, m.mat(i), static_cast<size_t>(m.n * row_bytes));
            }
        }
        return out;
    }

   private:
    struct Free {
        void operator()(uint8_t* p) const { std::free(p); }
    };
    lfm::Matrix matrix_{};
    std::unique_ptr<uint8_t, Free> storage_;
    py::object owner_;
};

// a must be float32, C-contiguous, aligned; returns its shape.
std::vector<int64_t> checked_f32(const py::array& a, const std::string& name) {
    if (!a.dtype().equal(py::dtype::of<float>())) {
        throw py::value_error(name + " must be float32, got " + dtype_name(a));
    }
    if (!(a.flags() & py::array::c_style)) throw py::value_error(name + " must be C-contiguous");
    if (reinterpret_cast<uintptr_t>(a.data()) % alignof(float) != 0) {
        throw py::value_error(name + " must be aligned to 4 bytes");
    }
    return std::vector<int64_t>(a.shape(), a.shape() + a.ndim());
}

std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

void expect_shape(const std::vector<int64_t>& shape, const std::vector<int64_t>& want,
                  const std::string& name) {
    if (shape != want) {
        throw py::value_error(name + " has shape " + shape_str(shape) + ", expected " + shape_str(want));
    }
}

py::array_t<float> linear(const py::array& x, const PackedMatrix& w, int64_t index) {
    const lfm::Matrix& m = w.matrix();
    check_activations(x, m.k);
    if (index < 0 || index >= m.n_mats) {
        throw py::value_error("index " + std::to_string(index) + " is out of range for " +
                              std::to_string(m.n_mats) + " stacked matrices");
    }
    const int64_t n_tokens = x.shape(0);
    py::array_t<float> y({n_tokens, m.n});  // [T, n]
    const auto* x_data = static_cast<const float*>(x.data());
    float* y_data = y.mutable_data();
    if (n_tokens > 0) {
        KernelSection kernel;
        lfm::linear(m, index, x_data, n_tokens, y_data);
    }
    return y;
}

// ids [T, top_k] of int32 / int64 as int32, each in [0, n).
std::vector<int32_t> checked_expert_ids(const py::array& ids, int64_t n_tokens, int64_t n) {
    const bool is_int32 = ids.dtype().equal(py::dtype::of<int32_t>());
    const bool is_int64 = ids.dtype().equal(py::dtype::of<int64_t>());
    if (!is_int32 && !is_int64) throw py::value_error("experts must be int32 or int64, got " + dtype_name(ids));
    if (ids.ndim() != 2 || ids.shape(0) != n_tokens) {
        throw py::value_error("experts must be [T, top_k] with T = " + std::to_string(n_tokens));
    }
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> as64(ids);
    std::vector<int32_t> out(static_cast<size_t>(as64.size()));
    for (py::ssize_t i = 0; i < as64.size(); ++i) {
        const int64_t e = as64.data()[i];
        if (e < 0 || e >= n) {
            throw py::value_error("expert id " + std::to_string(e) + " is out of range for " +
                                  std::to_string(n) + " experts");
        }
        out[static_cast<size_t>(i)] = static_cast<int32_t>(e);
    }
    return out;
}

py::array_t<float> moe(const py::array& x, const py::array& experts, const py::array& weights,
                       const PackedMatrix& gate, const PackedMatrix& up, const PackedMatrix& down) {
    const lfm::Matrix &g = gate.matrix(), &u = up.matrix(), &d = down.matrix();
    if (u.n != g.n || u.k != g.k || u.n_mats != g.n_mats || d.n != g.k || d.k != g.n || d.n_mats != g.n_mats) {
        throw py::value_error("gate/up must be [E, F, H] and down [E, H, F] with the same E, F, H");
    }
    if (u.qtype != g.qtype) throw py::value_error("gate and up must have the same type");
    check_activations(x, g.k);
    const int64_t n_tokens = x.shape(0);
    const std::vector<int32_t> ids = checked_expert_ids(experts, n_tokens, g.n_mats);
    const int64_t top_k = experts.shape(1);
    expect_shape(checked_f32(weights, "weights"), {n_tokens, top_k}, "weights");
    py::array_t<float> out({n_tokens, g.k});  // [T, H]
    const auto* x_data = static_cast<const float*>(x.data());
    const auto* w_data = static_cast<const float*>(weights.data());
    float* out_data = out.mutable_data();
    {
        KernelSection kernel;
        lfm::moe(x_data, n_tokens, ids.data(), w_data, top_k, g, u, d, out_data);
    }
    return out;
}

py::array_t<float> rms_norm(const py::array& x, const py::array& w, double eps) {
    const std::vector<int64_t> shape = checked_f32(x, "x");
    if (shape.empty()) throw py::value_error("x must have at least one dimension");
    const int64_t n = shape.back();
    expect_shape(checked_f32(w, "weight"), {n}, "weight");
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
    py::array_t<float> out(shape);
    const auto* x_data = static_cast<const float*>(x.data());
    const auto* w_data = static_cast<const float*>(w.data());
    float* out_data = out.mutable_data();
    {
        KernelSection kernel;
        lfm::rms_norm(x_data, rows, n, w_data, static_cast<float>(eps), out_data);
    }
    return out;
}

// silu(h) * u elementwise (the SwiGLU product of the MoE and the dense FFN), for the tests.
py::array_t<float> silu_mul(const py::array& h, const py::array& u) {
    const std::vector<int64_t> shape = checked_f32(h, "h");
    expect_shape(checked_f32(u, "u"), shape, "u");
    int64_t n = 1;
    for (const int64_t d : shape) n *= d;
    py::array_t<float> out(shape);
    std::memcpy(out.mutable_data(), h.data(), static_cast<size_t>(n) * sizeof(float));
    {
        KernelSection kernel;
        lfm::active_kernels().silu_mul(out.mutable_data(), static_cast<const float*>(u.data()), n);
    }
    return out;
}

// state [L-1, H] (written), kernel [H, L]: checked against `hidden`; returns L.
int64_t checked_conv_state(const py::array& state, const py::array& kernel, int64_t hidden) {
    const std::vector<int64_t> ks = checked_f32(kernel, "kernel");
    if (ks.size() != 2 || ks[0] != hidden || ks[1] < 1) {
        throw py::value_error("kernel has shape " + shape_str(ks) + ", expected [" + std::to_string(hidden) + ", L]");
    }
    expect_shape(checked_f32(state, "state"), {ks[1] - 1, hidden}, "state");
    if (!state.writeable()) throw py::value_error("state must be writeable");
    return ks[1];
}

py::array_t<float> short_conv(const py::array& bx, py::array& state, const py::array& kernel,
                              bool gated) {
    const std::vector<int64_t> shape = checked_f32(bx, gated ? "bcx" : "bx");
    if (shape.size() != 2 || (gated && shape[1] % 3 != 0)) {
        throw py::value_error(gated ? "bcx must be [T, 3H]" : "bx must be [T, H]");
    }
    const int64_t n_tokens = shape[0], hidden = gated ? shape[1] / 3 : shape[1];
    const int64_t width = checked_conv_state(state, kernel, hidden);
    py::array_t<float> y({n_tokens, hidden});  // [T, H]
    const auto* in = static_cast<const float*>(bx.data());
    auto* st = static_cast<float*>(state.mutable_data());
    const auto* kern = static_cast<const float*>(kernel.data());
    float* y_data = y.mutable_data();
    {
        KernelSection kernel;
        if (gated) {
            lfm::gated_short_conv(in, n_tokens, hidden, st, kern, width, y_data);
        } else {
            lfm::short_conv(in, n_tokens, hidden, st, kern, width, y_data);
        }
    }
    return y;
}

py::array_t<float> rope(const py::array& x, const py::array& positions, double base) {
    const std::vector<int64_t> shape = checked_f32(x, "x");
    if (shape.size() != 3 || shape[2] % 2 != 0) throw py::value_error("x must be [T, n_heads, d] with d even");
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> pos(positions);
    if (pos.ndim() != 1 || pos.shape(0) != shape[0]) throw py::value_error("positions must be [T]");
    py::array_t<float> out(shape);
    std::memcpy(out.mutable_data(), x.data(), static_cast<size_t>(x.nbytes()));
    float* out_data = out.mutable_data();
    const int64_t* p = pos.data();
    {
        KernelSection kernel;
        lfm::rope(out_data, shape[0], shape[1], shape[2], p, base);
    }
    return out;
}

// k, v: the head-major KV cache of one layer [n_kv, capacity, d], float32 or float16; the
// first q_start + T positions are attended to.
// A layer's KV cache: keys and values [n_kv, capacity, d] of one dtype, float32 or float16,
// C-contiguous and aligned. Returns its type and shape.
std::pair<lfm::KvType, std::vector<int64_t>> checked_kv_cache(const py::array& k, const py::array& v) {
    lfm::KvType kv_type;
    if (k.dtype().equal(py::dtype::of<float>())) {
        kv_type = lfm::KvType::F32;
    } else if (k.dtype().equal(py::dtype("float16"))) {
        kv_type = lfm::KvType::F16;
    } else {
        throw py::value_error("k must be float32 or float16, got " + dtype_name(k));
    }
    if (!v.dtype().equal(k.dtype())) throw py::value_error("k and v must have the same dtype");
    for (const py::array* a : {&k, &v}) {
        if (!(a->flags() & py::array::c_style)) throw py::value_error("k and v must be C-contiguous");
        if (reinterpret_cast<uintptr_t>(a->data()) % a->itemsize() != 0) {
            throw py::value_error("k and v must be aligned to their element size");
        }
    }
    std::vector<int64_t> ks(k.shape(), k.shape() + k.ndim());
    if (ks.size() != 3) throw py::value_error("k and v must be [n_kv, capacity, d]");
    expect_shape(std::vector<int64_t>(v.shape(), v.shape() + v.ndim()), ks, "v");
    return {kv_type, ks};
}

// The head shapes the attention kernels take (attention_impl.h: kMaxGroup, kMaxHeadDim).
void check_attention_heads(int64_t n_heads, int64_t n_kv, int64_t d) {
    if (n_kv <= 0 || n_heads % n_kv != 0 || n_heads / n_kv > 16) {
        throw py::value_error("n_heads must be a multiple of n_kv, at most 16 per KV head");
    }
    if (d > 256) throw py::value_error("head_dim above 256 is not supported");
}

py::array_t<float> attention(const py::array& q, const py::array& k, const py::array& v, int64_t q_start) {
    const std::vector<int64_t> qs = checked_f32(q, "q");
    const auto [kv_type, ks] = checked_kv_cache(k, v);
    if (qs.size() != 3) throw py::value_error("q must be [T, n_heads, d] and k, v [n_kv, capacity, d]");
    const int64_t n_tokens = qs[0], n_heads = qs[1], d = qs[2], n_kv = ks[0], capacity = ks[1];
    if (ks[2] != d) throw py::value_error("q and k have different head sizes");
    check_attention_heads(n_heads, n_kv, d);
    if (q_start < 0 || q_start + n_tokens > capacity) {
        throw py::value_error("k holds " + std::to_string(capacity) + " positions, fewer than q_start + T = " +
                              std::to_string(q_start + n_tokens));
    }
    py::array_t<float> out({n_tokens, n_heads * d});  // [T, n_heads * d]
    lfm::AttentionArgs args{static_cast<const float*>(q.data()), k.data(), v.data(), out.mutable_data(),
                            n_heads, n_kv, d, q_start, capacity * d, kv_type,
                            static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)))};
    {
        KernelSection kernel;
        lfm::attention(args, n_tokens);
    }
    return out;
}

// One matrix of a block: a single (not stacked) matrix of `want_n` x `want_k`.
const lfm::Matrix& checked_block_matrix(const PackedMatrix& w, int64_t want_n, int64_t want_k,
                                        const std::string& name) {
    const lfm::Matrix& m = w.matrix();
    if (m.n_mats != 1 || m.n != want_n || m.k != want_k) {
        throw py::value_error(name + " is " + std::to_string(m.n_mats) + " x [" + std::to_string(m.n) + ", " +
                              std::to_string(m.k) + "], expected one [" + std::to_string(want_n) + ", " +
                              std::to_string(want_k) + "] matrix");
    }
    return m;
}

// A pre-norm dense SwiGLU's weights: norm [H], gate and up [F, H] of one type, down [H, F].
struct SwiGLUWeights {
    py::array norm;
    const lfm::Matrix *gate, *up, *down;

    SwiGLUWeights(const py::array& norm_, const PackedMatrix& g, const PackedMatrix& u, const PackedMatrix& d)
        : norm(norm_) {
        const int64_t hidden = g.matrix().k, ffn = g.matrix().n;
        gate = &checked_block_matrix(g, ffn, hidden, "gate");
        up = &checked_block_matrix(u, ffn, hidden, "up");
        down = &checked_block_matrix(d, hidden, ffn, "down");
        if (up->qtype != gate->qtype) throw py::value_error("gate and up must have the same type");
        expect_shape(checked_f32(norm, "ffn_norm"), {hidden}, "ffn_norm");
    }
};

// x + the block's output, a new float32 [T, H] array; x is checked against H.
py::array_t<float> residual_copy(const py::array& x, int64_t hidden) {
    check_activations(x, hidden);
    py::array_t<float> out({static_cast<int64_t>(x.shape(0)), hidden});
    std::memcpy(out.mutable_data(), x.data(), static_cast<size_t>(x.nbytes()));
    return out;
}

py::array_t<float> swiglu_block(const py::array& x, const py::array& norm, double eps, const PackedMatrix& gate,
                                const PackedMatrix& up, const PackedMatrix& down) {
    const SwiGLUWeights w(norm, gate, up, down);
    py::array_t<float> out = residual_copy(x, w.gate->k);
    if (out.shape(0) > 0) {
        KernelSection kernel;
        lfm::swiglu_block(out.mutable_data(), out.shape(0), static_cast<const float*>(w.norm.data()),
                          static_cast<float>(eps), *w.gate, *w.up, *w.down);
    }
    return out;
}

// A sparse MoE FFN's weights: norm [H], router [E, H], expert_bias [E] or None, gate and up
// [E, F, H] of one type, down [E, H, F], 1 <= top_k <= E.
struct MoEWeights {
    py::array norm, expert_bias;
    const lfm::Matrix *gate, *up, *down;
    lfm::MoERouter router{};

    MoEWeights(const py::array& norm_, const PackedMatrix& router_matrix, const py::object& bias, int64_t top_k,
               bool normalize, double scale, const PackedMatrix& g, const PackedMatrix& u, const PackedMatrix& d)
        : norm(norm_), gate(&g.matrix()), up(&u.matrix()), down(&d.matrix()) {
        const int64_t n_expert = gate->n_mats, ffn = gate->n, hidden = gate->k;
        if (up->n_mats != n_expert || up->n != ffn || up->k != hidden || down->n_mats != n_expert ||
            down->n != hidden || down->k != ffn) {
            throw py::value_error("gate/up must be [E, F, H] and down [E, H, F] with the same E, F, H");
        }
        if (up->qtype != gate->qtype) throw py::value_error("gate and up must have the same type");
        expect_shape(checked_f32(norm, "ffn_norm"), {hidden}, "ffn_norm");
        const lfm::Matrix& r = checked_block_matrix(router_matrix, n_expert, hidden, "router");
        if (top_k < 1 || top_k > n_expert) {
            throw py::value_error("top_k must be in 1 .. " + std::to_string(n_expert) + ", got " + std::to_string(top_k));
        }
        if (!bias.is_none()) {
            expert_bias = bias.cast<py::array>();
            expect_shape(checked_f32(expert_bias, "expert_bias"), {n_expert}, "expert_bias");
        }
        router = {&r, bias.is_none() ? nullptr : static_cast<const float*>(expert_bias.data()), top_k, normalize,
                  static_cast<float>(scale)};
    }
};

// The FFN that ends an LFM2 layer (lfm::FeedForward): a dense SwiGLU or, given a router, a sparse
// MoE, its weights checked once when made. It holds references to them, so they live as long as it.
class FeedForwardWeights {
   public:
    FeedForwardWeights(const py::array& norm, const py::object& gate, const py::object& up, const py::object& down,
                       const py::object& router, const py::object& expert_bias, int64_t top_k, bool normalize,
                       double scale)
        : owners_{gate, up, down, router} {
        const auto& g = gate.cast<const PackedMatrix&>();
        const auto& u = up.cast<const PackedMatrix&>();
        const auto& d = down.cast<const PackedMatrix&>();
        if (router.is_none()) {
            dense_.emplace(norm, g, u, d);
            ffn_ = {static_cast<const float*>(dense_->norm.data()), dense_->gate, dense_->up, dense_->down, nullptr};
        } else {
            moe_.emplace(norm, router.cast<const PackedMatrix&>(), expert_bias, top_k, normalize, scale, g, u, d);
            ffn_ = {static_cast<const float*>(moe_->norm.data()), moe_->gate, moe_->up, moe_->down, &moe_->router};
        }
    }
    FeedForwardWeights(const FeedForwardWeights&) = delete;  // ffn_ points into its own members
    FeedForwardWeights& operator=(const FeedForwardWeights&) = delete;

    const lfm::FeedForward& ffn() const { return ffn_; }
    int64_t hidden() const { return ffn_.gate->k; }

   private:
    std::optional<SwiGLUWeights> dense_;
    std::optional<MoEWeights> moe_;
    py::object owners_[4];  // the PackedMatrix objects ffn_ points into (the router: None if dense)
    lfm::FeedForward ffn_{};
};

// An LFM2 conv layer with its FFN (lfm::conv_layer), its weights checked once when made; it
// holds references to them, so they live as long as it does.
class ConvLayer {
   public:
    ConvLayer(const py::array& operator_norm, const py::array& ffn_norm, double eps, const py::object& in_proj,
              const py::array& kernel, const py::object& out_proj, const py::object& gate, const py::object& up,
              const py::object& down, const py::object& router, const py::object& expert_bias, int64_t top_k,
              bool normalize, double scale)
        : ffn_(ffn_norm, gate, up, down, router, expert_bias, top_k, normalize, scale),
          operator_norm_(operator_norm), kernel_(kernel), owners_{in_proj, out_proj} {
        const int64_t hidden = ffn_.hidden();
        const std::vector<int64_t> ks = checked_f32(kernel, "kernel");
        if (ks.size() != 2 || ks[0] != hidden || ks[1] < 1) {
            throw py::value_error("kernel has shape " + shape_str(ks) + ", expected [" + std::to_string(hidden) + ", L]");
        }
        expect_shape(checked_f32(operator_norm, "operator_norm"), {hidden}, "operator_norm");
        layer_ = {static_cast<const float*>(operator_norm_.data()), static_cast<float>(eps),
                  &checked_block_matrix(in_proj.cast<const PackedMatrix&>(), 3 * hidden, hidden, "in_proj"),
                  static_cast<const float*>(kernel_.data()), ks[1],
                  &checked_block_matrix(out_proj.cast<const PackedMatrix&>(), hidden, hidden, "out_proj"),
                  ffn_.ffn()};
    }

    // The layer's output for x [T, H] (a new array); state [L-1, H] is updated in place.
    py::array_t<float> operator()(const py::array& x, py::array& state) const {
        const int64_t hidden = ffn_.hidden();
        expect_shape(checked_f32(state, "state"), {layer_.width - 1, hidden}, "state");
        if (!state.writeable()) throw py::value_error("state must be writeable");
        py::array_t<float> out = residual_copy(x, hidden);
        auto* st = static_cast<float*>(state.mutable_data());
        if (out.shape(0) > 0) {
            KernelSection kernel;
            lfm::conv_layer(layer_, out.mutable_data(), out.shape(0), st);
        }
        return out;
    }

    const lfm::ConvLayer& layer() const { return layer_; }
    int64_t hidden() const { return ffn_.hidden(); }

   private:
    FeedForwardWeights ffn_;
    py::array operator_norm_, kernel_;
    py::object owners_[2];  // in_proj, out_proj: the PackedMatrix objects layer_ points into
    lfm::ConvLayer layer_{};
};

// An LFM2 attention layer with its FFN (lfm::attention_layer), its weights checked once when
// made; it holds references to them, so they live as long as it does.
class AttentionLayer {
   public:
    AttentionLayer(const py::array& operator_norm, const py::array& ffn_norm, double eps, const py::object& wq,
                   const py::object& wk, const py::object& wv, const py::object& wo, const py::array& q_norm,
                   const py::array& k_norm, int64_t n_heads, double rope_base, const py::object& gate,
                   const py::object& up, const py::object& down, const py::object& router,
                   const py::object& expert_bias, int64_t top_k, bool normalize, double scale)
        : ffn_(ffn_norm, gate, up, down, router, expert_bias, top_k, normalize, scale),
          operator_norm_(operator_norm), q_norm_(q_norm), k_norm_(k_norm), owners_{wq, wk, wv, wo} {
        const int64_t hidden = ffn_.hidden();
        expect_shape(checked_f32(operator_norm, "operator_norm"), {hidden}, "operator_norm");
        if (n_heads < 1 || hidden % n_heads != 0) {
            throw py::value_error("n_heads must divide the hidden size " + std::to_string(hidden) + ", got " +
                                  std::to_string(n_heads));
        }
        const std::vector<int64_t> qn = checked_f32(q_norm, "q_norm");
        if (qn.size() != 1 || qn[0] < 2 || qn[0] % 2 != 0) {  // RoPE turns the head's two halves
            throw py::value_error("q_norm must be [head_dim] with head_dim even, got " + shape_str(qn));
        }
        const int64_t d = qn[0];
        expect_shape(checked_f32(k_norm, "k_norm"), {d}, "k_norm");
        const lfm::Matrix& q = checked_block_matrix(wq.cast<const PackedMatrix&>(), n_heads * d, hidden, "wq");
        const int64_t kv_rows = wk.cast<const PackedMatrix&>().matrix().n;
        if (kv_rows % d != 0) {
            throw py::value_error("wk has " + std::to_string(kv_rows) + " rows, not whole heads of " + std::to_string(d));
        }
        const int64_t n_kv = kv_rows / d;
        check_attention_heads(n_heads, n_kv, d);
        layer_ = {static_cast<const float*>(operator_norm_.data()), static_cast<float>(eps), &q,
                  &checked_block_matrix(wk.cast<const PackedMatrix&>(), n_kv * d, hidden, "wk"),
                  &checked_block_matrix(wv.cast<const PackedMatrix&>(), n_kv * d, hidden, "wv"),
                  &checked_block_matrix(wo.cast<const PackedMatrix&>(), hidden, n_heads * d, "wo"),
                  static_cast<const float*>(q_norm_.data()), static_cast<const float*>(k_norm_.data()),
                  n_heads, n_kv, d, rope_base, ffn_.ffn()};
    }

    // The layer's output for x [T, H] (a new array) of tokens at positions start ..; their keys and
    // values are written into the cache k, v [n_kv, capacity, d] at those positions.
    py::array_t<float> operator()(const py::array& x, py::array& k, py::array& v, int64_t start) const {
        py::array_t<float> out = residual_copy(x, ffn_.hidden());
        const int64_t n_tokens = out.shape(0);
        const lfm::KvSlots slots = checked_slots(k, v, n_tokens, start);
        if (n_tokens > 0) {
            KernelSection kernel;
            lfm::attention_layer(layer_, out.mutable_data(), n_tokens, slots, start);
        }
        return out;
    }

    // This layer's cache k, v [n_kv, capacity, d] (float32 or float16, writeable), with room for T
    // tokens at positions start ..
    lfm::KvSlots checked_slots(py::array& k, py::array& v, int64_t n_tokens, int64_t start) const {
        const auto [kv_type, ks] = checked_kv_cache(k, v);
        if (ks[0] != layer_.n_kv || ks[2] != layer_.head_dim) {
            throw py::value_error("the KV cache has shape " + shape_str(ks) + ", expected [" +
                                  std::to_string(layer_.n_kv) + ", capacity, " + std::to_string(layer_.head_dim) + "]");
        }
        if (!k.writeable() || !v.writeable()) throw py::value_error("the KV cache must be writeable");
        const int64_t capacity = ks[1];
        if (start < 0 || start > capacity - n_tokens) {
            throw py::value_error("the KV cache holds " + std::to_string(capacity) + " positions, fewer than start + T = " +
                                  std::to_string(start) + " + " + std::to_string(n_tokens));
        }
        return {k.mutable_data(), v.mutable_data(), kv_type, capacity};
    }

    const lfm::AttentionLayer& layer() const { return layer_; }
    int64_t hidden() const { return ffn_.hidden(); }

   private:
    FeedForwardWeights ffn_;
    py::array operator_norm_, q_norm_, k_norm_;
    py::object owners_[4];  // wq, wk, wv, wo: the PackedMatrix objects layer_ points into
    lfm::AttentionLayer layer_{};
};

// A model's decoder layers (ConvLayer and AttentionLayer objects, in order) run in one call for
// one sequence (lfm::decoder_layers): the Python between the layers of a decode step, gone. It
// holds references to the layers.
class LayerStack {
   public:
    explicit LayerStack(const py::list& layers) : owners_(layers) {
        if (layers.empty()) throw py::value_error("a layer stack needs at least one layer");
        for (const py::handle item : layers) {
            int64_t hidden;
            if (py::isinstance<ConvLayer>(item)) {
                const auto& conv = item.cast<const ConvLayer&>();
                hidden = conv.hidden();
                if (n_conv_ > 0 && conv.layer().width != width_) {
                    throw py::value_error("the conv layers have different widths");
                }
                width_ = conv.layer().width;
                layers_.push_back({&conv.layer(), nullptr});
                ++n_conv_;
            } else if (py::isinstance<AttentionLayer>(item)) {
                const auto& attention = item.cast<const AttentionLayer&>();
                hidden = attention.hidden();
                attention_.push_back(&attention);
                layers_.push_back({nullptr, &attention.layer()});
            } else {
                throw py::value_error("a layer stack takes ConvLayer and AttentionLayer objects, got " +
                                      std::string(py::str(py::type::of(item).attr("__name__"))));
            }
            if (hidden_ > 0 && hidden != hidden_) throw py::value_error("the layers have different hidden sizes");
            hidden_ = hidden;
        }
    }

    // The layers' output for x [T, H] of one sequence at positions start .. (a new array). conv_states
    // [n_conv, L-1, H] (the conv layers' states in order) is updated in place; kv holds one (k, v)
    // pair per attention layer, in order, which get the tokens' keys and values.
    py::array_t<float> operator()(const py::array& x, py::array& conv_states, const py::sequence& kv, int64_t start) const {
        py::array_t<float> out = residual_copy(x, hidden_);
        const int64_t n_tokens = out.shape(0);
        const std::vector<int64_t> cs = checked_f32(conv_states, "conv_states");
        // without conv layers there is no width to check: a cache holds [0, L-1, H] of them
        const int64_t carried = n_conv_ > 0 ? width_ - 1 : (cs.size() == 3 ? cs[1] : 0);
        expect_shape(cs, {n_conv_, carried, hidden_}, "conv_states");
        if (!conv_states.writeable()) throw py::value_error("conv_states must be writeable");
        if (static_cast<size_t>(py::len(kv)) != attention_.size()) {
            throw py::value_error("kv has " + std::to_string(py::len(kv)) + " (k, v) pairs for " +
                                  std::to_string(attention_.size()) + " attention layers");
        }
        std::vector<lfm::KvSlots> slots;
        for (size_t i = 0; i < attention_.size(); ++i) {
            const py::object item = kv[i];
            if (!py::isinstance<py::sequence>(item) || py::len(item) != 2) {
                throw py::value_error("kv must hold (k, v) pairs of arrays");
            }
            const auto pair = item.cast<py::sequence>();
            const py::object k_item = pair[0], v_item = pair[1];
            if (!py::isinstance<py::array>(k_item) || !py::isinstance<py::array>(v_item)) {
                throw py::value_error("kv must hold (k, v) pairs of arrays");
            }
            auto k = k_item.cast<py::array>(), v = v_item.cast<py::array>();
            slots.push_back(attention_[i]->checked_slots(k, v, n_tokens, start));
        }
        auto* states = static_cast<float*>(conv_states.mutable_data());
        if (n_tokens > 0) {
            KernelSection kernel;
            lfm::decoder_layers(layers_.data(), static_cast<int64_t>(layers_.size()), out.mutable_data(), n_tokens,
                                states, slots.data(), start);
        }
        return out;
    }

   private:
    py::list owners_;
    std::vector<lfm::DecoderLayer> layers_;
    std::vector<const AttentionLayer*> attention_;
    int64_t n_conv_ = 0, width_ = 0, hidden_ = 0;
};

py::tuple route(const py::array& logits, const py::object& bias, int64_t top_k, bool normalize, double scale) {
    const std::vector<int64_t> shape = checked_f32(logits, "logits");
    if (shape.size() != 2) throw py::value_error("logits must be [T, E]");
    const int64_t n_tokens = shape[0], n_expert = shape[1];
    if (top_k < 1 || top_k > n_expert) throw py::value_error("top_k must be in 1 .. E");
    const float* bias_data = nullptr;
    py::array bias_array;
    if (!bias.is_none()) {
        bias_array = bias.cast<py::array>();
        expect_shape(checked_f32(bias_array, "expert_bias"), {n_expert}, "expert_bias");
        bias_data = static_cast<const float*>(bias_array.data());
    }
    py::array_t<int32_t> experts({n_tokens, top_k});
    py::array_t<float> weights({n_tokens, top_k});
    const auto* l = static_cast<const float*>(logits.data());
    int32_t* e = experts.mutable_data();
    float* w = weights.mutable_data();
    {
        KernelSection kernel;
        lfm::route(l, n_tokens, n_expert, bias_data, top_k, normalize, static_cast<float>(scale), e, w);
    }
    return py::make_tuple(experts, weights);
}

py::tuple quantize_activations(const py::array& x) {
    const std::vector<int64_t> shape = checked_f32(x, "x");
    if (shape.size() != 2 || shape[1] % 32 != 0) throw py::value_error("x must be [T, k] with k a multiple of 32");
    const int64_t n_tokens = shape[0], k = shape[1];
    py::array_t<int8_t> q({n_tokens, k});
    py::array_t<float> d({n_tokens, k / 32});
    py::array_t<int32_t> sum({n_tokens, k / 32});
    const lfm::KernelTable& table = lfm::active_kernels();
    for (int64_t t = 0; t < n_tokens; ++t) {
        table.quantize_row(static_cast<const float*>(x.data()) + t * k, k, q.mutable_data() + t * k,
                           d.mutable_data() + t * (k / 32), sum.mutable_data() + t * (k / 32));
    }
    return py::make_tuple(q, d, sum);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "lfm-edge CPU kernels. Weight types are GGML ids (see qtypes()); a weight matrix is n "
              "rows of k values in GGUF's on-disk row layout.";
    m.def("qtypes", [] {
              py::dict out;
              for (const lfm::QTypeInfo& info : lfm::kQTypes) out[info.name] = static_cast<int>(info.qtype);
              return out;
          }, "The weight types these kernels read: {name: GGML id}.");
    m.attr("PACK_FORMAT") = lfm::kPackFormat;  // the packed layouts' version (packed.h)

    m.def("matmul", &matmul, py::arg("x"), py::arg("w"), py::arg("qtype"), py::arg("n"),
          py::arg("k"),
          "y = x @ W.T as float32 [T, n]. x: float32 C-contiguous [T, k]; w: the bytes of W "
          "[n, k] of type qtype, dequantized exactly, sums accumulated in float32.");
    m.def("dequantize", &dequantize, py::arg("w"), py::arg("qtype"), py::arg("n"), py::arg("k"),
          "W [n, k] as float32.");
    m.def("get_rows", &get_rows, py::arg("w"), py::arg("qtype"), py::arg("n"), py::arg("k"),
          py::arg("ids"),
          "Rows ids of W [n, k] as float32 [len(ids), k] (embedding lookup). ids: 1-D int32 or "
          "int64, each in [0, n).");
    m.def("row_bytes",
          [](int64_t qtype, int64_t k) { return checked_row_bytes(checked_qtype(qtype), k); },
          py::arg("qtype"), py::arg("k"), "Bytes in one row of k weights of type qtype.");
    m.def("isa", [] { return std::string(lfm::active_kernels().isa); },
          "The instruction set the kernels use now: 'scalar', 'avx2' or 'avx512'.");
    m.def("cpu_isas", &cpu_isas,
          "Instruction sets compiled in and supported by this CPU, lowest first.");
    m.def("set_isa", &set_isa, py::arg("name"),
          "Use the kernels of one of cpu_isas() from now on (process-wide).");
    m.def("decode_streaming",
          [] { return std::string(lfm::decode_streaming() == lfm::DecodeStreaming::kNonTemporal ? "nontemporal" : "prefetch-l2"); },
          "How the AVX-512 decode kernels stream weights: 'prefetch-l2' (Intel) or 'nontemporal' (AMD).");
    m.def("set_decode_streaming",
          [](const std::string& name) {
              if (name == "prefetch-l2") {
                  lfm::set_decode_streaming(lfm::DecodeStreaming::kPrefetchL2);
              } else if (name == "nontemporal") {
                  lfm::set_decode_streaming(lfm::DecodeStreaming::kNonTemporal);
              } else {
                  throw py::value_error("decode streaming is 'prefetch-l2' or 'nontemporal', not '" + name + "'");
              }
          },
          py::arg("name"), "Stream weights in decode that way from now on (process-wide).");

    py::class_<PackedMatrix>(m, "PackedMatrix",
                             "A weight matrix (or a stack of n_mats) in the layout the kernels "
                             "stream: the quantized types repacked into 16-row groups, float types "
                             "borrowed as stored.")
        .def(py::init([](const py::buffer& w, int64_t qtype, int64_t n, int64_t k, int64_t n_mats,
                         const py::object& mapping) {
                 return std::make_unique<PackedMatrix>(w, checked_qtype(qtype), n, k, n_mats, mapping);
             }),
             py::arg("w"), py::arg("qtype"), py::arg("n"), py::arg("k"), py::arg("n_mats") = 1,
             py::arg("mapping") = py::none())
        .def_static("from_packed",
                    [](const py::buffer& packed, int64_t qtype, int64_t n, int64_t k, int64_t n_mats) {
                        return std::make_unique<PackedMatrix>(FromPacked{}, packed, checked_qtype(qtype), n, k,
                                                              n_mats);
                    },
                    py::arg("packed"), py::arg("qtype"), py::arg("n"), py::arg("k"), py::arg("n_mats") = 1,
                    "Matrices already in the kernels' layout (the bytes packed_bytes() gave), borrowed: "
                    "packed must be exactly their packed size and 64-byte aligned.")
        .def("packed_bytes", &PackedMatrix::packed_bytes,
             "The kernels' bytes of a repacked matrix, read-only uint8 [nbytes] (a view), for saving.")
        .def_property_readonly("qtype", [](const PackedMatrix& p) { return static_cast<int>(p.matrix().qtype); })
        .def_property_readonly("n", [](const PackedMatrix& p) { return p.matrix().n; })
        .def_property_readonly("k", [](const PackedMatrix& p) { return p.matrix().k; })
        .def_property_readonly("n_mats", [](const PackedMatrix& p) { return p.matrix().n_mats; })
        .def_property_readonly("nbytes", &PackedMatrix::nbytes, "bytes the kernels read for all matrices")
        .def_property_readonly("int8_activations", [](const PackedMatrix& p) { return p.matrix().packed(); })
        .def("gguf_bytes", &PackedMatrix::gguf_bytes,
             "The matrix back in GGUF's row layout, uint8 [n_mats * n, row_bytes] (the repacking is "
             "lossless: these are the bytes it was made from).");

    m.def("linear", &linear, py::arg("x"), py::arg("w"), py::arg("index") = 0,
          "y = x @ W[index].T as float32 [T, n] for a PackedMatrix; int8 activations for the "
          "quantized types, exact float32 for float types.");
    m.def("moe", &moe, py::arg("x"), py::arg("experts"), py::arg("weights"), py::arg("gate"),
          py::arg("up"), py::arg("down"),
          "sum_j weights[t, j] * down_e(silu(gate_e(x)) * up_e(x)), e = experts[t, j]: [T, H].");
    m.def("swiglu_block", &swiglu_block, py::arg("x"), py::arg("norm"), py::arg("eps"), py::arg("gate"),
          py::arg("up"), py::arg("down"),
          "x + down(silu(gate(h)) * up(h)), h = rms_norm(x, norm, eps): a pre-norm dense SwiGLU and its "
          "residual, [T, H] (a new array).");
    py::class_<ConvLayer>(m, "ConvLayer",
                          "An LFM2 layer of a gated short conv and its FFN, run in one call: "
                          "x + out_proj(C * conv(B * x')), (B, C, x') = in_proj(rms_norm(x)), then "
                          "swiglu_block, or with a router the sigmoid-routed top-k MoE of the expert "
                          "stacks gate/up/down and its residual. Keeps references to its weights.")
        .def(py::init<const py::array&, const py::array&, double, const py::object&, const py::array&,
                      const py::object&, const py::object&, const py::object&, const py::object&,
                      const py::object&, const py::object&, int64_t, bool, double>(),
             py::arg("operator_norm"), py::arg("ffn_norm"), py::arg("eps"), py::arg("in_proj"), py::arg("kernel"),
             py::arg("out_proj"), py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("router") = py::none(),
             py::arg("expert_bias") = py::none(), py::arg("top_k") = 0, py::arg("normalize") = true,
             py::arg("scale") = 1.0)
        .def("__call__", &ConvLayer::operator(), py::arg("x"), py::arg("state").noconvert(),
             "The layer's output [T, H] for x [T, H] of one sequence; the conv state [L-1, H] is "
             "updated in place.");
    py::class_<AttentionLayer>(m, "AttentionLayer",
                               "An LFM2 attention layer and its FFN, run in one call: q, k, v = wq h, wk h, "
                               "wv h (h = rms_norm(x)), per-head rms_norm and NeoX RoPE on q and k, k and v "
                               "stored in the KV cache, x + wo(causal GQA attention), then the FFN as ConvLayer's. "
                               "Keeps references to its weights.")
        .def(py::init<const py::array&, const py::array&, double, const py::object&, const py::object&,
                      const py::object&, const py::object&, const py::array&, const py::array&, int64_t, double,
                      const py::object&, const py::object&, const py::object&, const py::object&,
                      const py::object&, int64_t, bool, double>(),
             py::arg("operator_norm"), py::arg("ffn_norm"), py::arg("eps"), py::arg("wq"), py::arg("wk"),
             py::arg("wv"), py::arg("wo"), py::arg("q_norm"), py::arg("k_norm"), py::arg("n_heads"),
             py::arg("rope_base"), py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("router") = py::none(),
             py::arg("expert_bias") = py::none(), py::arg("top_k") = 0, py::arg("normalize") = true,
             py::arg("scale") = 1.0)
        .def("__call__", &AttentionLayer::operator(), py::arg("x"), py::arg("k").noconvert(), py::arg("v").noconvert(),
             py::arg("start"),
             "The layer's output [T, H] for x [T, H] of one sequence at positions start ..; their keys and "
             "values go into the cache k, v [n_kv, capacity, d] (float32 or float16) at those positions.");
    py::class_<LayerStack>(m, "LayerStack",
                           "A model's decoder layers (ConvLayer and AttentionLayer objects, in order) run in one "
                           "call for one sequence. Keeps references to them.")
        .def(py::init<const py::list&>(), py::arg("layers"))
        .def("__call__", &LayerStack::operator(), py::arg("x"), py::arg("conv_states").noconvert(), py::arg("kv"),
             py::arg("start"),
             "The layers' output [T, H] for x [T, H] of one sequence at positions start ..; conv_states "
             "[n_conv, L-1, H] (the conv layers' in order) is updated in place, and kv, one (k, v) cache "
             "pair per attention layer in order, gets the tokens' keys and values.");
    m.def("silu_mul", &silu_mul, py::arg("h"), py::arg("u"),
          "silu(h) * u = h / (1 + exp(-h)) * u elementwise, by the active kernels.");
    m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"),
          "x / sqrt(mean(x^2) + eps) * weight over the last axis.");
    m.def("short_conv",
          [](const py::array& bx, py::array& state, const py::array& kernel) { return short_conv(bx, state, kernel, false); },
          py::arg("bx"), py::arg("state"), py::arg("kernel"),
          "Causal depthwise conv of bx [T, H] with state [L-1, H] (updated in place), kernel [H, L].");
    m.def("gated_short_conv",
          [](const py::array& bcx, py::array& state, const py::array& kernel) { return short_conv(bcx, state, kernel, true); },
          py::arg("bcx"), py::arg("state"), py::arg("kernel"),
          "C * conv(B * x) for bcx [T, 3H] = (B, C, x); state and kernel as short_conv.");
    m.def("rope", &rope, py::arg("x"), py::arg("positions"), py::arg("base"),
          "NeoX RoPE of x [T, n_heads, d] at positions [T] (a new array).");
    m.def("attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_start"),
          "Causal GQA attention, online softmax: q [T, n_heads, d] over the first q_start + T positions of "
          "a KV cache k, v [n_kv, capacity, d] (float32 or float16) -> [T, n_heads * d].");
    m.def("float_to_half_bits", [](const py::array& x) {
              checked_f32(x, "x");
              py::array_t<uint16_t> bits(std::vector<int64_t>(x.shape(), x.shape() + x.ndim()));
              const auto* f = static_cast<const float*>(x.data());
              uint16_t* h = bits.mutable_data();
              for (py::ssize_t i = 0; i < x.size(); ++i) h[i] = lfm::f32_to_fp16(f[i]);
              return bits;
          }, py::arg("x"),
          "The float16 bits the native KV cache stores for float32 x (to test against numpy's astype).");
    m.def("route", &route, py::arg("logits"), py::arg("expert_bias"), py::arg("top_k"),
          py::arg("normalize"), py::arg("scale"),
          "Sigmoid top-k routing: (experts int32 [T, k], weights float32 [T, k]).");
    m.def("quantize_activations", &quantize_activations, py::arg("x"),
          "The int8 activations the packed kernels use: (q int8 [T, k], d [T, k/32], sum int32 [T, k/32]).");
    m.def("set_threads", [](int n) {
              if (n < 1) throw py::value_error("n_threads must be at least 1, got " + std::to_string(n));
              py::gil_scoped_release release;
              lfm::set_num_threads(n);
          }, py::arg("n"), "Use n threads (the caller included) for every kernel from now on.");
    m.def("threads", [] { return lfm::num_threads(); }, "Threads the kernels use.");
    m.def("pool_stats", [] {
              const lfm::PoolStats s = lfm::pool_stats();
              return py::dict(py::arg("stalls") = s.stalls, py::arg("solo_jobs") = s.solo_jobs);
          },
          "Jobs that waited for a helper thread that was not running (stalls), and jobs run on the "
          "calling thread alone after one (solo_jobs), since the pool was made.");
    m.def("kernel_time_ns", [] { return g_kernel_ns.load(std::memory_order_relaxed); },
          "Nanoseconds spent inside kernels (GIL released) since the module loaded, all threads' calls summed.");
    add_probe_bindings(m);
}
