// Bindings of csrc/lego/: numpy outputs are allocated here, filled by lego::generate without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "bindings/arrays.hpp"
#include "lego/generate.hpp"

namespace py = pybind11;
using physai::bind::checked_data;

void bind_lego(py::module_& m) {
  m.attr("max_vars") = physai::lego::kMaxVars;
  m.attr("chunk") = physai::lego::kChunk;
  m.def(
      "generate",
      [](int32_t n_vars, py::array table, int32_t graph, int32_t components, bool shuffle, py::tuple token_ids,
         uint64_t seed, uint64_t start, int64_t batch) {
        if (token_ids.size() != 7) physai::fail_value("token_ids: expected 7 ids, got ", token_ids.size());
        const int32_t n_elements = static_cast<int32_t>(table.ndim() == 2 ? table.shape(0) : 0);
        const int32_t* table_data = checked_data<int32_t>(table, "table", {n_elements, n_elements});
        if (graph != 0 && graph != 1) physai::fail_value("graph: expected 0 (chain) or 1 (tree), got ", graph);
        physai::lego::Spec spec{n_vars, n_elements, components, static_cast<physai::lego::Graph>(graph), shuffle,
                                table_data, token_ids[0].cast<int64_t>(), token_ids[1].cast<int64_t>(),
                                token_ids[2].cast<int64_t>(), token_ids[3].cast<int64_t>(),
                                token_ids[4].cast<int64_t>(), token_ids[5].cast<int64_t>(),
                                token_ids[6].cast<int64_t>()};
        if (batch < 0) physai::fail_value("batch_size: expected >= 0, got ", batch);
        const int64_t row = physai::lego::tokens_per_sentence(n_vars > 0 ? n_vars : 0);
        py::array_t<int64_t> tokens({batch, row}), labels({batch, int64_t(n_vars)}),
            positions({batch, int64_t(n_vars)}), depth({batch, int64_t(n_vars)});
        int64_t *t = tokens.mutable_data(), *l = labels.mutable_data(), *p = positions.mutable_data(),
                *d = depth.mutable_data();
        {
          py::gil_scoped_release release;
          physai::lego::generate(spec, seed, start, batch, t, l, p, d);
        }
        return py::make_tuple(tokens, labels, positions, depth);
      },
      py::arg("n_vars"), py::arg("table"), py::arg("graph"), py::arg("components"), py::arg("shuffle"),
      py::arg("token_ids"), py::arg("seed"), py::arg("start"), py::arg("batch"));
}
