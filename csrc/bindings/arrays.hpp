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

// Whether `a` holds values of T in native byte order (numpy's PyArray_EquivTypes). Dtypes are compared by
// equivalence, never identity: an array that went through pickle (to a process pool or a Dask worker) carries an
// equal dtype object, not numpy's singleton.
template <class T>
bool has_dtype(const py::array& a) {
  return py::isinstance<py::array_t<T>>(a);
}

// Checks that `a` is a C-contiguous array of T with the given shape (-1 = any extent).
template <class T>
void check_array(const py::array& a, const char* name, std::initializer_list<int64_t> shape) {
  if (!has_dtype<T>(a))
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
}

// The data of an array the kernel only reads (read-only arrays are fine).
template <class T>
const T* checked_data(const py::array& a, const char* name, std::initializer_list<int64_t> shape) {
  check_array<T>(a, name, shape);
  return static_cast<const T*>(a.data());
}

// The data of an array the kernel writes to.
template <class T>
T* checked_mutable_data(py::array& a, const char* name, std::initializer_list<int64_t> shape) {
  check_array<T>(a, name, shape);
  if (!a.writeable()) fail_value(name, ": expected a writeable array (it is updated in place)");
  return static_cast<T*>(a.mutable_data());
}

// Calls fn(T{}) with T the element type of `a`, float or double: one binding name serves both precisions.
template <class Fn>
decltype(auto) dispatch_float(const py::array& a, const char* name, Fn&& fn) {
  if (has_dtype<float>(a)) return fn(float{});
  if (has_dtype<double>(a)) return fn(double{});
  fail_type(name, ": expected dtype float32 or float64, got ", std::string(py::str(a.dtype())));
}

}  // namespace physai::bind
