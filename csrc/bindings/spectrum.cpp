// Bindings of csrc/spectrum/: the eigensolvers driven by a Python matvec callback. The GIL is released for
// the solver and re-acquired only inside the callback.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>

#include "bindings/arrays.hpp"
#include "spectrum/eigensolvers.hpp"

namespace py = pybind11;
using physai::bind::checked_data;
namespace sp = physai::spectrum;

namespace {

// Wraps a Python callable f(V: ndarray[batch, n]) -> ndarray[batch, n] of the same dtype as a C++ matvec.
template <class T>
auto python_matvec(const py::function& f, int64_t batch, int64_t n) {
  return [&f, batch, n](const T* V, T* out) {
    py::gil_scoped_acquire gil;
    py::array_t<T> x({batch, n});
    std::copy(V, V + batch * n, x.mutable_data());
    py::object result = f(x);
    if (!py::isinstance<py::array>(result))
      physai::fail_type("matvec: expected the callback to return a numpy array, got ",
                        std::string(py::str(py::type::of(result))));
    const T* y = checked_data<T>(result.cast<py::array>(), "matvec result", {batch, n});
    std::copy(y, y + batch * n, out);
  };
}

template <class T>
py::tuple run(bool use_lanczos, const py::function& f, int64_t batch, int64_t n, int64_t k, const std::string& which,
              double tol, int64_t max_matvecs, int64_t ncv, uint64_t seed, const py::object& v0) {
  PHYSAI_REQUIRE(batch >= 1 && n >= 1, "batch and n must be >= 1, got batch=", batch, " n=", n);
  const sp::Options opt = sp::make_options(k, which, tol, max_matvecs, ncv, seed);
  const T* start = nullptr;
  py::array v0_array;
  if (!v0.is_none()) {
    v0_array = v0.cast<py::array>();
    start = checked_data<T>(v0_array, "v0", {batch, n});
  }
  const int64_t kk = use_lanczos ? k : 1;
  py::array_t<T> values({batch, kk}), vectors({batch, kk, n});
  py::array_t<int64_t> matvecs(batch);
  py::array_t<bool> converged(batch);
  T* pv = values.mutable_data();
  T* pw = vectors.mutable_data();
  int64_t* pm = matvecs.mutable_data();
  auto* pc = reinterpret_cast<uint8_t*>(converged.mutable_data());
  auto mv = python_matvec<T>(f, batch, n);
  {
    py::gil_scoped_release release;
    if (use_lanczos)
      sp::lanczos<T>(mv, batch, n, opt, start, pv, pw, pm, pc);
    else
      sp::power_iteration<T>(mv, batch, n, opt, start, pv, pw, pm, pc);
  }
  return py::make_tuple(values, vectors, matvecs, converged);
}

// Calls fn(T{}) for the solver precision T named by `dtype` (float32 or float64): one binding name per solver.
template <class Fn>
py::tuple by_dtype(const py::dtype& dtype, Fn&& fn) {
  if (dtype.equal(py::dtype::of<float>())) return fn(float{});
  if (dtype.equal(py::dtype::of<double>())) return fn(double{});
  physai::fail_type("dtype: expected float32 or float64, got ", std::string(py::str(dtype)));
}

}  // namespace

void bind_spectrum(py::module_& m) {
  m.def("lanczos",
        [](const py::function& f, int64_t batch, int64_t n, int64_t k, const std::string& which, double tol,
           int64_t max_matvecs, int64_t ncv, uint64_t seed, const py::object& v0, const py::dtype& dtype) {
          return by_dtype(dtype, [&](auto zero) {
            return run<decltype(zero)>(true, f, batch, n, k, which, tol, max_matvecs, ncv, seed, v0);
          });
        },
        py::arg("matvec"), py::arg("batch"), py::arg("n"), py::arg("k"), py::arg("which"), py::arg("tol"),
        py::arg("max_matvecs"), py::arg("ncv"), py::arg("seed"), py::arg("v0"), py::arg("dtype"),
        "Thick-restart Lanczos; returns (values[batch,k], vectors[batch,k,n], matvecs[batch], converged[batch]).");
  m.def("power_iteration",
        [](const py::function& f, int64_t batch, int64_t n, double tol, int64_t max_matvecs, uint64_t seed,
           const py::object& v0, const py::dtype& dtype) {
          return by_dtype(dtype, [&](auto zero) {
            return run<decltype(zero)>(false, f, batch, n, 1, "LM", tol, max_matvecs, 0, seed, v0);
          });
        },
        py::arg("matvec"), py::arg("batch"), py::arg("n"), py::arg("tol"), py::arg("max_matvecs"),
        py::arg("seed"), py::arg("v0"), py::arg("dtype"),
        "Power iteration; returns (values[batch,1], vectors[batch,1,n], matvecs[batch], converged[batch]).");
}
