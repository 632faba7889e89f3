// The probes' part of lfm_edge._C (see probe.h), compiled with baseline flags. Python's side:
// lfm_edge/probes.py. Every call uses the probe table of the active instruction set.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "probe.h"

namespace py = pybind11;

namespace {

int checked_streams(int streams) {
    if (streams == 1 || streams == 2 || streams == 4 || streams == 8) return streams;
    throw py::value_error("streams must be 1, 2, 4 or 8, got " + std::to_string(streams));
}

int checked_threads(int threads) {
    if (threads >= 1 && threads <= 1024) return threads;
    throw py::value_error("threads must be 1 to 1024, got " + std::to_string(threads));
}

int checked_repeats(int repeats) {
    if (repeats >= 1) return repeats;
    throw py::value_error("repeats must be at least 1, got " + std::to_string(repeats));
}

}  // namespace

void add_probe_bindings(py::module_& m) {
    m.def("probe_read_sum",
          [](const py::array_t<uint8_t, 0>& data, int streams) {
              streams = checked_streams(streams);
              if (data.ndim() != 1 || !(data.flags() & py::array::c_style)) {
                  throw py::value_error("data must be a 1-D C-contiguous uint8 array");
              }
              const int64_t n = data.shape(0);
              if (n % (64 * streams) != 0) {
                  throw py::value_error("len(data) must be a multiple of 64 * streams, got " + std::to_string(n));
              }
              const uint8_t* p = data.data();
              py::gil_scoped_release release;
              return lfm::active_probe_kernels().read_sum(p, n, streams);
          },
          py::arg("data"), py::arg("streams"),
          "The bandwidth probe's loop on data: the sum mod 2**64 of its little-endian uint64 words, read "
          "as `streams` contiguous parts at once.");
    m.def("probe_int8_mac",
          [](uint32_t a4, uint32_t b4, int64_t iterations) {
              if (iterations < 0) throw py::value_error("iterations must be >= 0");
              py::gil_scoped_release release;
              return lfm::active_probe_kernels().int8_mac(a4, b4, iterations);
          },
          py::arg("a4"), py::arg("b4"), py::arg("iterations"),
          "The int8 peak probe's loop: the sum of its accumulators' int32 lanes, each of which adds "
          "dot(bytes of a4 as uint8, bytes of b4 as int8) per iteration.");
    m.def("probe_int8_info",
          [] {
              const lfm::ProbeKernels& k = lfm::active_probe_kernels();
              return py::dict(py::arg("isa") = k.isa, py::arg("macs_per_iteration") = k.int8_macs_per_iteration,
                              py::arg("instructions") = k.int8_instructions);
          },
          "The int8 peak probe of the active instruction set: isa, macs_per_iteration, instructions.");
    m.def("measure_read_bandwidth",
          [](int64_t bytes, int threads, int streams, int repeats, bool huge_pages) {
              if (bytes < 1) throw py::value_error("bytes must be positive");
              threads = checked_threads(threads);
              streams = checked_streams(streams);
              repeats = checked_repeats(repeats);
              const lfm::ProbeKernels& k = lfm::active_probe_kernels();
              py::gil_scoped_release release;
              return lfm::measure_read_bandwidth(k, bytes, threads, streams, repeats, huge_pages);
          },
          py::arg("bytes"), py::arg("threads"), py::arg("streams"), py::arg("repeats"), py::arg("huge_pages") = true,
          "GB/s of each of `repeats` passes of `threads` threads reading a buffer of `bytes` (rounded up to 2 MiB "
          "per thread), each its own slice with `streams` streams; written by its readers beforehand.");
    m.def("measure_int8_peak",
          [](int threads, int64_t iterations, int repeats) {
              threads = checked_threads(threads);
              repeats = checked_repeats(repeats);
              if (iterations < 1) throw py::value_error("iterations must be positive");
              const lfm::ProbeKernels& k = lfm::active_probe_kernels();
              py::gil_scoped_release release;
              return lfm::measure_int8_peak(k, threads, iterations, repeats);
          },
          py::arg("threads"), py::arg("iterations"), py::arg("repeats"),
          "GMAC/s of each of `repeats` runs of the int8 multiply-accumulate loop, `iterations` on each thread.");
}
