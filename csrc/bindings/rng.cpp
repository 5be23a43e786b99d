// Exposes the counter-based generator so tests can compare it with physai/_rng.py and known answers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "common/errors.hpp"
#include "common/philox.hpp"

namespace py = pybind11;

void bind_rng(py::module_& m) {
  m.def("philox4x32_10", [](std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key) {
    physai::Philox4x32::apply(counter.data(), key[0], key[1]);
    return counter;
  }, py::arg("counter"), py::arg("key"));
  m.def("stream_u32", [](uint64_t seed, uint64_t sample, uint32_t domain, int64_t count) {
    if (count < 0) physai::fail_value("count: expected >= 0, got ", count);
    py::array_t<uint32_t> out(count);
    auto* data = out.mutable_data();
    physai::CounterStream stream(seed, sample, domain);
    for (int64_t j = 0; j < count; ++j) data[j] = stream.next_u32();
    return out;
  }, py::arg("seed"), py::arg("sample"), py::arg("domain"), py::arg("count"));
  m.def("stream_uniform_int", [](uint64_t seed, uint64_t sample, uint32_t domain, uint32_t n, int64_t count) {
    if (n == 0) physai::fail_value("n: expected a range of >= 1 values, got 0");
    if (count < 0) physai::fail_value("count: expected >= 0, got ", count);
    py::array_t<uint32_t> out(count);
    auto* data = out.mutable_data();
    physai::CounterStream stream(seed, sample, domain);
    for (int64_t j = 0; j < count; ++j) data[j] = stream.uniform_int(n);
    return out;
  }, py::arg("seed"), py::arg("sample"), py::arg("domain"), py::arg("n"), py::arg("count"));
  m.def("stream_blocks", [](uint64_t seed, uint64_t first, int64_t count, uint32_t domain, uint32_t blocks) {
    if (count < 0) physai::fail_value("count: expected >= 0, got ", count);
    py::array_t<uint32_t> out({count, int64_t(4) * blocks});
    physai::philox_stream_blocks(seed, first, count, domain, blocks, out.mutable_data());
    return out;
  }, py::arg("seed"), py::arg("first"), py::arg("count"), py::arg("domain"), py::arg("blocks"));
}
