// The physai._core extension: build information, thread control, and one submodule per subsystem.
#include <pybind11/pybind11.h>

#include <omp.h>

#include "common/blas.hpp"
#include "common/errors.hpp"
#include "common/scratch.hpp"
#include "common/threading.hpp"

namespace py = pybind11;

void bind_rng(py::module_& m);
void bind_lego(py::module_& m);
void bind_twolayer(py::module_& m);
void bind_shared_bias(py::module_& m);
void bind_spectrum(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "physai native kernels (CPU)";
  // physai's own parallel loops own the threads; BLAS inside them runs single-threaded (see common/gemm.hpp).
  physai::blas::set_num_threads(1);
  py::register_local_exception<physai::type_error>(m, "NativeTypeError", PyExc_TypeError);

  m.def("build_info", [] {
    py::dict info;
    info["version"] = PHYSAI_VERSION;
    info["compiler"] = std::string("gcc ") + __VERSION__;
    info["openmp"] = _OPENMP;
    info["openmp_max_threads"] = omp_get_max_threads();
    info["blas"] = std::string(physai::blas::config());
    return info;
  });
  m.def("num_threads", &physai::num_threads);
  m.def("set_num_threads", &physai::set_num_threads, py::arg("n"));
  m.def("configured_num_threads", &physai::configured_num_threads);
  m.def("blas_num_threads", &physai::blas::num_threads);
  m.def("scratch_retained_bytes", [] { return physai::ScratchStack::local().retained_bytes(); });

  auto rng = m.def_submodule("rng", "counter-based random numbers (Philox4x32-10)");
  bind_rng(rng);
  auto lego = m.def_submodule("lego", "LEGO batch generation");
  bind_lego(lego);
  auto twolayer = m.def_submodule("twolayer", "fused two-layer network kernels");
  bind_twolayer(twolayer);
  bind_shared_bias(twolayer);
  auto spectrum = m.def_submodule("spectrum", "power iteration and Lanczos");
  bind_spectrum(spectrum);
}
