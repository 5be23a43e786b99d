// Bindings of csrc/lego/ (filled in by the lego work).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_lego(py::module_& m) {}
