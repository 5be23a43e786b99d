// Bindings of csrc/twolayer/ (filled in by the twolayer work).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_twolayer(py::module_& m) {}
