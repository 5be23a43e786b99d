// Glue for passing numpy arrays to kernels: dtype, contiguity and shape checks that name the argument.
// No computation lives here.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "common/errors.hpp"

namespace physai::bind {

namespace py = pybind11;

inline std::string shape_string(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// Checks that `a` is a C-contiguous array of T with the given shape (-1 = any extent) and returns its data.
template <class T>
T* checked_data(py::array& a, const char* name, std::initializer_list<int64_t> shape) {
  if (!py::isinstance<py::array_t<T>>(a) || !a.dtype().is(py::dtype::of<T>()))
    fail_type(name, ": expected dtype ", std::string(py::str(py::dtype::of<T>())), ", got ",
              std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) fail_value(name, ": expected a C-contiguous array");
  if (a.ndim() != static_cast<py::ssize_t>(shape.size()))
    fail_value(name, ": expected ", shape.size(), " dimensions, got shape ", shape_string(a));
  int i = 0;
  for (int64_t extent : shape) {
    if (extent >= 0 && a.shape(i) != extent)
      fail_value(name, ": expected extent ", extent, " in dimension ", i, ", got shape ", shape_string(a));
    ++i;
  }
  return static_cast<T*>(a.mutable_data());
}

template <class T>
const T* checked_data(const py::array& a, const char* name, std::initializer_list<int64_t> shape) {
  return checked_data<T>(const_cast<py::array&>(a), name, shape);
}

}  // namespace physai::bind
