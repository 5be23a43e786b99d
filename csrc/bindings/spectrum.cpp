// Bindings of csrc/spectrum/ (filled in by the spectrum work).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_spectrum(py::module_& m) {}
