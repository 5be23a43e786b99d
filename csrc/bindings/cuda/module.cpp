// The physai._cuda extension: raw device pointers + a stream in, kernels of csrc/cuda out. The Python layer
// (physai/cuda.py) has checked devices, dtypes, contiguity and shapes; sizes are re-checked in the kernels'
// host code. Also exposes host evaluations of the device math header for tests on machines without a GPU.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/errors.hpp"
#include "cuda/twolayer.hpp"
#include "cuda/twolayer_fused.cuh"
#include <vector>

namespace py = pybind11;
using namespace physai::cuda;

namespace {

Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::Relu;
  if (name == "tanh") return Activation::Tanh;
  if (name == "gelu") return Activation::Gelu;
  if (name == "erf") return Activation::Erf;
  if (name == "quadratic") return Activation::Quadratic;
  if (name == "linear") return Activation::Linear;
  if (name == "softplus") return Activation::Softplus;
  physai::fail_value("activation must be one of relu, tanh, gelu, erf, quadratic, linear, softplus; got '", name, "'");
}

Loss parse_loss(const std::string& name) {
  if (name == "mse") return Loss::Mse;
  if (name == "logistic") return Loss::Logistic;
  if (name == "cross_entropy") return Loss::CrossEntropy;
  physai::fail_value("loss must be one of mse, logistic, cross_entropy; got '", name, "'");
}

// Sizes and pointers of one call, as the Python layer passes them.
struct Call {
  int64_t E, n, d, m, k;
  std::uintptr_t W, b, a, X, Y;  // b = 0: no bias; Y = 0 for forward
  bool x_per_member, y_per_member;
  double input_scale, output_scale;
  std::string activation, loss;
};

template <class T>
Net<T> make_net(const Call& c) {
  Net<T> net;
  net.E = c.E, net.n = c.n, net.d = c.d, net.m = c.m, net.k = c.k;
  net.W = reinterpret_cast<const T*>(c.W);
  net.b = reinterpret_cast<const T*>(c.b);
  net.a = reinterpret_cast<const T*>(c.a);
  net.sW = c.m * c.d, net.sb = c.m, net.sa = c.k * c.m;
  net.X = reinterpret_cast<const T*>(c.X);
  net.sX = c.x_per_member ? c.n * c.d : 0;
  net.Y = reinterpret_cast<const T*>(c.Y);
  net.sY = c.y_per_member ? c.n * c.k : 0;
  net.input_scale = static_cast<T>(c.input_scale), net.output_scale = static_cast<T>(c.output_scale);
  net.act = parse_activation(c.activation);
  net.loss = parse_loss(c.loss);
  return net;
}

template <class T, class P>
Params<T, P> make_params(const Call& c, std::uintptr_t W, std::uintptr_t b, std::uintptr_t a) {
  return {reinterpret_cast<P>(W), reinterpret_cast<P>(b), reinterpret_cast<P>(a), c.m * c.d, c.m, c.k * c.m};
}

bool is_double(const std::string& dtype) {
  if (dtype == "float64") return true;
  if (dtype == "float32") return false;
  physai::fail_type("dtype must be float32 or float64, got '", dtype, "'");
}

py::array_t<double> host_activation(const std::string& name, py::array_t<double, py::array::c_style | py::array::forcecast> x) {
  const Activation act = parse_activation(name);
  const auto n = x.size();
  py::array_t<double> out({py::ssize_t(3), py::ssize_t(n)});
  auto o = out.mutable_unchecked<2>();
  const double* xp = x.data();
  for (py::ssize_t i = 0; i < n; ++i) {
    const ActValues<double> v = activation(act, xp[i]);
    o(0, i) = v.s, o(1, i) = v.d1, o(2, i) = v.d2;
  }
  return out;
}

py::tuple host_loss(const std::string& name, py::array_t<double, py::array::c_style | py::array::forcecast> f,
                    py::array_t<double, py::array::c_style | py::array::forcecast> y,
                    py::array_t<double, py::array::c_style | py::array::forcecast> u) {
  const Loss loss = parse_loss(name);
  PHYSAI_REQUIRE(f.ndim() == 2, "f must have shape [n, k]");
  PHYSAI_REQUIRE(y.ndim() == 2 && y.shape(0) == f.shape(0) && y.shape(1) == f.shape(1), "y must have f's shape");
  PHYSAI_REQUIRE(u.ndim() == 2 && u.shape(0) == f.shape(0) && u.shape(1) == f.shape(1), "u must have f's shape");
  const py::ssize_t n = f.shape(0), k = f.shape(1);
  PHYSAI_REQUIRE(k >= 1, "f must have at least one column");
  py::array_t<double> value(n), grad({n, k}), hu({n, k});
  for (py::ssize_t s = 0; s < n; ++s) {
    value.mutable_data()[s] = loss_grad(loss, f.data() + s * k, y.data() + s * k, grad.mutable_data() + s * k, int(k));
    loss_hvp(loss, f.data() + s * k, y.data() + s * k, u.data() + s * k, hu.mutable_data() + s * k, int(k));
  }
  return py::make_tuple(value, grad, hu);
}

using Arr = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Runs the GPU kernels' phases and reduction on the host (float64), one emulated block at a time, with the
// given tile size, number of blocks per member and threads per block. Returns (loss, dW, db, da) for
// mode "grad" and (HW, Hb, Ha) for mode "hvp" (db/Hb None without bias).
py::tuple host_fused(const std::string& mode_name, Arr W, py::object b_obj, Arr a, Arr X, Arr Y, py::object v_obj,
                     const std::string& act, const std::string& loss, double input_scale, double output_scale,
                     int64_t TS, int64_t chunks, int64_t nthreads) {
  PHYSAI_REQUIRE(mode_name == "grad" || mode_name == "hvp", "mode must be grad or hvp");
  const bool hvp = mode_name == "hvp";
  const bool bias = !b_obj.is_none();
  PHYSAI_REQUIRE(W.ndim() == 3 && a.ndim() == 3 && X.ndim() >= 2 && Y.ndim() == X.ndim(), "bad ranks");
  Net<double> net;
  net.E = W.shape(0), net.m = W.shape(1), net.d = W.shape(2), net.k = a.shape(1), net.n = X.shape(X.ndim() - 2);
  PHYSAI_REQUIRE(a.shape(0) == net.E && a.shape(2) == net.m && X.shape(X.ndim() - 1) == net.d &&
                 Y.shape(Y.ndim() - 2) == net.n && Y.shape(Y.ndim() - 1) == net.k, "inconsistent shapes");
  Arr b = bias ? b_obj.cast<Arr>() : Arr(std::vector<py::ssize_t>{0});
  PHYSAI_REQUIRE(!bias || b.size() == net.E * net.m, "b must have shape [E, m]");
  net.W = W.data(), net.b = bias ? b.data() : nullptr, net.a = a.data();
  net.sW = net.m * net.d, net.sb = net.m, net.sa = net.k * net.m;
  net.X = X.data(), net.sX = X.ndim() == 3 ? net.n * net.d : 0;
  net.Y = Y.data(), net.sY = Y.ndim() == 3 ? net.n * net.k : 0;
  net.input_scale = input_scale, net.output_scale = output_scale;
  net.act = parse_activation(act), net.loss = parse_loss(loss);
  const int64_t ntiles = (net.n + TS - 1) / TS;
  PHYSAI_REQUIRE(TS >= 1 && chunks >= 1 && chunks <= ntiles && nthreads >= 1, "need TS >= 1, 1 <= chunks <= tiles");
  Params<double, const double*> v;
  Arr vW, vb, va;
  if (hvp) {
    auto t = v_obj.cast<py::tuple>();
    vW = t[0].cast<Arr>(), va = t[2].cast<Arr>();
    PHYSAI_REQUIRE(vW.size() == W.size() && va.size() == a.size(), "direction must match (W, b, a)");
    if (bias) {
      vb = t[1].cast<Arr>();
      PHYSAI_REQUIRE(vb.size() == b.size(), "vb must match b");
    }
    v = {vW.data(), bias ? vb.data() : nullptr, va.data(), net.sW, net.sb, net.sa};
  }
  const int64_t P = num_params(net);
  std::vector<double> ws(net.E * chunks * (P + 1)), smem(TS * shared_per_sample(net, hvp ? Mode::hvp : Mode::grad));
  for (int64_t e = 0; e < net.E; ++e)
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t t = c; t < ntiles; t += chunks)
        for (int phase = 0; phase < kPhases; ++phase)
          for (int64_t tid = 0; tid < nthreads; ++tid) {
            double* row = ws.data() + (e * chunks + c) * (P + 1);
            if (hvp) Tile<double, Mode::hvp>{net, v, e, TS, smem.data(), row}.run_phase(phase, t, t == c, tid, nthreads);
            else Tile<double, Mode::grad>{net, v, e, TS, smem.data(), row}.run_phase(phase, t, t == c, tid, nthreads);
          }
  py::array_t<double> lossv(net.E), oW({net.E, net.m, net.d}), ob({net.E, bias ? net.m : 0}), oa({net.E, net.k, net.m});
  const Params<double> out{oW.mutable_data(), bias ? ob.mutable_data() : nullptr, oa.mutable_data(), net.sW, net.sb, net.sa};
  for (int64_t t = 0; t < net.E * (P + 1); ++t) reduce_element(net, ws.data(), chunks, lossv.mutable_data(), out, t);
  py::object db = bias ? py::object(ob) : py::none();
  if (hvp) return py::make_tuple(oW, db, oa);
  return py::make_tuple(lossv, oW, db, oa);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "physai CUDA kernels (fused two-layer networks, power iteration)";
  py::register_local_exception<physai::type_error>(m, "NativeTypeError", PyExc_TypeError);

  m.def("device_count", &device_count, "Number of CUDA devices; 0 when there is no driver or device.");
  m.def("build_info", [] {
    py::dict info;
    info["version"] = PHYSAI_VERSION;
    info["cuda_runtime"] = runtime_version();
    info["architectures"] = architectures();
    return info;
  });

  py::class_<Call>(m, "Call")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                    std::uintptr_t, std::uintptr_t, bool, bool, double, double, std::string, std::string>(),
           py::arg("E"), py::arg("n"), py::arg("d"), py::arg("m"), py::arg("k"), py::arg("W"), py::arg("b"),
           py::arg("a"), py::arg("X"), py::arg("Y"), py::arg("x_per_member"), py::arg("y_per_member"),
           py::arg("input_scale"), py::arg("output_scale"), py::arg("activation"), py::arg("loss"));

  m.def("forward", [](const Call& c, const std::string& dtype, std::uintptr_t f, std::uintptr_t stream) {
    const bool dbl = is_double(dtype);
    py::gil_scoped_release release;
    if (dbl) forward(make_net<double>(c), reinterpret_cast<double*>(f), stream);
    else forward(make_net<float>(c), reinterpret_cast<float*>(f), stream);
  });
  m.def("loss_and_grad", [](const Call& c, const std::string& dtype, std::uintptr_t loss, std::uintptr_t dW,
                            std::uintptr_t db, std::uintptr_t da, std::uintptr_t stream) {
    const bool dbl = is_double(dtype);
    py::gil_scoped_release release;
    if (dbl) loss_and_grad(make_net<double>(c), reinterpret_cast<double*>(loss), make_params<double, double*>(c, dW, db, da), stream);
    else loss_and_grad(make_net<float>(c), reinterpret_cast<float*>(loss), make_params<float, float*>(c, dW, db, da), stream);
  });
  m.def("hvp", [](const Call& c, const std::string& dtype, std::uintptr_t vW, std::uintptr_t vb, std::uintptr_t va,
                  std::uintptr_t oW, std::uintptr_t ob, std::uintptr_t oa, std::uintptr_t stream) {
    const bool dbl = is_double(dtype);
    py::gil_scoped_release release;
    if (dbl) hvp(make_net<double>(c), make_params<double, const double*>(c, vW, vb, va), make_params<double, double*>(c, oW, ob, oa), stream);
    else hvp(make_net<float>(c), make_params<float, const float*>(c, vW, vb, va), make_params<float, float*>(c, oW, ob, oa), stream);
  });
  m.def("power_iteration", [](const Call& c, const std::string& dtype, std::uintptr_t v, std::uintptr_t eig, int iters,
                              double tol, std::uintptr_t stream) {
    const bool dbl = is_double(dtype);
    py::gil_scoped_release release;
    if (dbl) return power_iteration(make_net<double>(c), reinterpret_cast<double*>(v), reinterpret_cast<double*>(eig), iters, tol, stream);
    return power_iteration(make_net<float>(c), reinterpret_cast<float*>(v), reinterpret_cast<float*>(eig), iters, tol, stream);
  });

  m.def("_host_activation", &host_activation, py::arg("name"), py::arg("x"),
        "Host evaluation of the device activation math: array [3, x.size] of sigma, sigma', sigma''.");
  m.def("_host_loss", &host_loss, py::arg("name"), py::arg("f"), py::arg("y"), py::arg("u"),
        "Host evaluation of the device loss math per sample (unnormalized): (value [n], grad [n,k], H u [n,k]).");
  m.def("_host_fused", &host_fused, py::arg("mode"), py::arg("W"), py::arg("b"), py::arg("a"), py::arg("X"),
        py::arg("Y"), py::arg("v"), py::arg("activation"), py::arg("loss"), py::arg("input_scale"),
        py::arg("output_scale"), py::arg("TS"), py::arg("chunks"), py::arg("nthreads"),
        "Host emulation (float64) of the fused grad/hvp kernels and their reduction, for tests without a GPU.");
}
