// The Python module lfm_edge._C. Compiled with baseline flags.
//
// Every size, shape, dtype and layout handed in from Python is checked here, with a ValueError
// that says what was wrong; the kernels behind the table trust what they get.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "dispatch.h"
#include "kernels.h"

namespace py = pybind11;

namespace {

using lfm::QType;

const char* qtype_name(QType qtype) {
    switch (qtype) {
        case QType::F32: return "F32";
        case QType::F16: return "F16";
        case QType::BF16: return "BF16";
        case QType::Q8_0: return "Q8_0";
        case QType::Q4_0: return "Q4_0";
    }
    return "?";
}

QType checked_qtype(int64_t id) {
    for (QType qtype : {QType::F32, QType::F16, QType::Q4_0, QType::Q8_0, QType::BF16}) {
        if (id == static_cast<int64_t>(qtype)) return qtype;
    }
    throw py::value_error("qtype " + std::to_string(id) +
                          " is not supported; use a GGML type id: F32=0, F16=1, Q4_0=2, "
                          "Q8_0=8 or BF16=30");
}

int64_t checked_mul(int64_t a, int64_t b, const std::string& what) {
    int64_t product = 0;
    if (__builtin_mul_overflow(a, b, &product)) throw py::value_error(what + " is too large");
    return product;
}

// Bytes in one row of k weights of this type.
int64_t checked_row_bytes(QType qtype, int64_t k) {
    if (k <= 0) throw py::value_error("k must be positive, got " + std::to_string(k));
    switch (qtype) {
        case QType::F32: return checked_mul(k, 4, "k");
        case QType::F16:
        case QType::BF16: return checked_mul(k, 2, "k");
        case QType::Q8_0:
        case QType::Q4_0: break;
    }
    if (k % 32 != 0) {
        throw py::value_error("k = " + std::to_string(k) + " is not a multiple of 32, which " +
                              qtype_name(qtype) + " rows (blocks of 32 weights) require");
    }
    return k / 32 * (qtype == QType::Q8_0 ? 34 : 18);
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
        py::gil_scoped_release release;
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
        py::gil_scoped_release release;
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
        py::gil_scoped_release release;
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

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "lfm-edge CPU kernels. Weight types are GGML ids: F32=0, F16=1, Q4_0=2, Q8_0=8, "
              "BF16=30; a weight matrix is n rows of k values in GGUF's on-disk row layout.";

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
}
