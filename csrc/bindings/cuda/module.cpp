// The physai._cuda extension: raw device pointers + a stream in, kernels of csrc/cuda out. The Python layer
// (physai/cuda.py) has checked devices, dtypes, contiguity and shapes; sizes are re-checked in the kernels'
// host code. Also exposes host evaluations of the device math header for tests on machines without a GPU.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/errors.hpp"
#include "cuda/twolayer.hpp"
#include "cuda/twolayer_fused.cuh"

namespace py = pybind11;
using namespace physai::cuda;

namespace {

namespace tl = physai::twolayer;

// Sizes and pointers of one call, as the Python layer passes them: device pointers as integers (b = 0: no bias;
// Y = 0 for forward), the precision of every array (dtype "float32" or "float64").
struct Call {
  int64_t E, n, d, m, k;
  std::uintptr_t X, Y, W, b, a;
  bool x_per_member, y_per_member;
  double input_scale, output_scale;
  tl::Activation activation;
  tl::Loss loss;
  std::string dtype;
};

template <class T>
Net<T> make_net(const Call& c) {
  Net<T> net;
  net.E = c.E, net.n = c.n, net.d = c.d, net.m = c.m, net.k = c.k;
  net.X = reinterpret_cast<const T*>(c.X);
  net.x_shared = !c.x_per_member;
  net.W = reinterpret_cast<const T*>(c.W);
  net.b = reinterpret_cast<const T*>(c.b);
  net.a = reinterpret_cast<const T*>(c.a);
  net.input_scale = static_cast<T>(c.input_scale), net.output_scale = static_cast<T>(c.output_scale);
  net.activation = c.activation;
  return net;
}

template <class T>
Targets<T> make_targets(const Call& c) {
  Targets<T> targets;
  targets.Y = reinterpret_cast<const T*>(c.Y);
  targets.shared = !c.y_per_member;
  targets.loss = c.loss;
  return targets;
}

template <class T, class P>
Params<T, P> make_params(const Call& c, std::uintptr_t W, std::uintptr_t b, std::uintptr_t a) {
  return {reinterpret_cast<P>(W), reinterpret_cast<P>(b), reinterpret_cast<P>(a), c.m * c.d, c.m, c.k * c.m};
}

// Calls fn(T{}) for the call's precision T, with the GIL released: one binding name serves both precisions.
template <class Fn>
auto by_dtype(const Call& c, Fn&& fn) {
  const bool is_double = c.dtype == "float64";
  if (!is_double && c.dtype != "float32") physai::fail_type("dtype: expected float32 or float64, got '", c.dtype, "'");
  py::gil_scoped_release release;
  return is_double ? fn(double{}) : fn(float{});
}

py::array_t<double> host_activation(tl::Activation act, py::array_t<double, py::array::c_style | py::array::forcecast> x) {
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

py::tuple host_loss(tl::Loss loss, py::array_t<double, py::array::c_style | py::array::forcecast> f,
                    py::array_t<double, py::array::c_style | py::array::forcecast> y,
                    py::array_t<double, py::array::c_style | py::array::forcecast> u) {
  PHYSAI_REQUIRE(f.ndim() == 2, "f: expected shape [n, k]");
  PHYSAI_REQUIRE(y.ndim() == 2 && y.shape(0) == f.shape(0) && y.shape(1) == f.shape(1), "y: expected f's shape");
  PHYSAI_REQUIRE(u.ndim() == 2 && u.shape(0) == f.shape(0) && u.shape(1) == f.shape(1), "u: expected f's shape");
  const py::ssize_t n = f.shape(0), k = f.shape(1);
  PHYSAI_REQUIRE(k >= 1, "f: expected at least one column");
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
py::tuple host_fused(const std::string& mode_name, Arr X, Arr Y, Arr W, py::object b_obj, Arr a, py::object v_obj,
                     tl::Activation act, tl::Loss loss, double input_scale, double output_scale, int64_t TS,
                     int64_t chunks, int64_t nthreads) {
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
  net.X = X.data(), net.x_shared = X.ndim() == 2;
  net.input_scale = input_scale, net.output_scale = output_scale;
  net.activation = act;
  Targets<double> targets;
  targets.Y = Y.data(), targets.shared = Y.ndim() == 2, targets.loss = loss;
  const int64_t sW = net.m * net.d, sb = net.m, sa = net.k * net.m;
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
    v = {vW.data(), bias ? vb.data() : nullptr, va.data(), sW, sb, sa};
  }
  const int64_t P = net.params();
  std::vector<double> ws(net.E * chunks * (P + 1)), smem(TS * shared_per_sample(net, hvp ? Mode::hvp : Mode::grad));
  for (int64_t e = 0; e < net.E; ++e)
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t t = c; t < ntiles; t += chunks)
        for (int phase = 0; phase < kPhases; ++phase)
          for (int64_t tid = 0; tid < nthreads; ++tid) {
            double* row = ws.data() + (e * chunks + c) * (P + 1);
            if (hvp)
              Tile<double, Mode::hvp>{net, targets, v, e, TS, smem.data(), row}.run_phase(phase, t, t == c, tid,
                                                                                          nthreads);
            else
              Tile<double, Mode::grad>{net, targets, v, e, TS, smem.data(), row}.run_phase(phase, t, t == c, tid,
                                                                                           nthreads);
          }
  py::array_t<double> lossv(net.E), oW({net.E, net.m, net.d}), ob({net.E, bias ? net.m : 0}), oa({net.E, net.k, net.m});
  const Params<double> out{oW.mutable_data(), bias ? ob.mutable_data() : nullptr, oa.mutable_data(), sW, sb, sa};
  for (int64_t t = 0; t < net.E * (P + 1); ++t)
    reduce_element(net, targets, ws.data(), chunks, lossv.mutable_data(), out, t);
  py::object db = bias ? py::object(ob) : py::none();
  if (hvp) return py::make_tuple(oW, db, oa);
  return py::make_tuple(lossv, oW, db, oa);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "physai CUDA kernels (fused two-layer networks, power iteration)";
  py::register_local_exception<physai::type_error>(m, "NativeTypeError", PyExc_TypeError);

  m.def("device_count", &device_count,
        "Number of CUDA devices; 0 when there is no driver or device. Raises RuntimeError when the CUDA runtime fails "
        "otherwise (a broken install), so that GPU tests do not skip silently.");
  m.def("build_info", [] {
    py::dict info;
    info["version"] = PHYSAI_VERSION;
    info["cuda_runtime"] = runtime_version();
    info["architectures"] = architectures();
    return info;
  });

  // The Activation and Loss enums are physai._core.twolayer's (bound once there; physai imports _core first).
  py::class_<Call>(m, "Call")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, std::uintptr_t, std::uintptr_t, std::uintptr_t,
                    std::uintptr_t, std::uintptr_t, bool, bool, double, double, tl::Activation, tl::Loss,
                    std::string>(),
           py::arg("E"), py::arg("n"), py::arg("d"), py::arg("m"), py::arg("k"), py::arg("X"), py::arg("Y"),
           py::arg("W"), py::arg("b"), py::arg("a"), py::arg("x_per_member"), py::arg("y_per_member"),
           py::arg("input_scale"), py::arg("output_scale"), py::arg("activation"), py::arg("loss"), py::arg("dtype"));

  m.def("forward", [](const Call& c, std::uintptr_t f, std::uintptr_t stream) {
    by_dtype(c, [&](auto zero) {
      using T = decltype(zero);
      forward(make_net<T>(c), reinterpret_cast<T*>(f), stream);
      return 0;
    });
  }, py::arg("call"), py::arg("f"), py::arg("stream"));
  m.def("loss_and_grad", [](const Call& c, std::uintptr_t loss, std::uintptr_t dW, std::uintptr_t db,
                            std::uintptr_t da, std::uintptr_t stream) {
    by_dtype(c, [&](auto zero) {
      using T = decltype(zero);
      loss_and_grad(make_net<T>(c), make_targets<T>(c), reinterpret_cast<T*>(loss), make_params<T, T*>(c, dW, db, da),
                    stream);
      return 0;
    });
  }, py::arg("call"), py::arg("loss"), py::arg("dW"), py::arg("db"), py::arg("da"), py::arg("stream"));
  m.def("hvp", [](const Call& c, std::uintptr_t vW, std::uintptr_t vb, std::uintptr_t va, std::uintptr_t oW,
                  std::uintptr_t ob, std::uintptr_t oa, std::uintptr_t stream) {
    by_dtype(c, [&](auto zero) {
      using T = decltype(zero);
      hvp(make_net<T>(c), make_targets<T>(c), make_params<T, const T*>(c, vW, vb, va), make_params<T, T*>(c, oW, ob, oa),
          stream);
      return 0;
    });
  }, py::arg("call"), py::arg("vW"), py::arg("vb"), py::arg("va"), py::arg("HW"), py::arg("Hb"), py::arg("Ha"),
     py::arg("stream"));
  m.def("power_iteration", [](const Call& c, std::uintptr_t v, std::uintptr_t values, int64_t max_matvecs, double tol,
                              std::uintptr_t stream) {
    py::array_t<int64_t> matvecs(c.E);
    py::array_t<bool> converged(c.E);
    int64_t* counts = matvecs.mutable_data();
    auto* ok = reinterpret_cast<uint8_t*>(converged.mutable_data());
    by_dtype(c, [&](auto zero) {
      using T = decltype(zero);
      power_iteration(make_net<T>(c), make_targets<T>(c), reinterpret_cast<T*>(v), reinterpret_cast<T*>(values),
                      max_matvecs, tol, counts, ok, stream);
      return 0;
    });
    return py::make_tuple(matvecs, converged);
  }, py::arg("call"), py::arg("v"), py::arg("values"), py::arg("max_matvecs"), py::arg("tol"), py::arg("stream"),
     "Power iteration in place on v [E, P]; values [E] on the device; returns (matvecs [E], converged [E]).");

  m.def("_host_activation", &host_activation, py::arg("activation"), py::arg("x"),
        "Host evaluation of the device activation math: array [3, x.size] of sigma, sigma', sigma''.");
  m.def("_host_loss", &host_loss, py::arg("loss"), py::arg("f"), py::arg("y"), py::arg("u"),
        "Host evaluation of the device loss math per sample (unnormalized): (value [n], grad [n,k], H u [n,k]).");
  m.def("_host_fused", &host_fused, py::arg("mode"), py::arg("X"), py::arg("Y"), py::arg("W"), py::arg("b"),
        py::arg("a"), py::arg("v"), py::arg("activation"), py::arg("loss"), py::arg("input_scale"),
        py::arg("output_scale"), py::arg("TS"), py::arg("chunks"), py::arg("nthreads"),
        "Host emulation (float64) of the fused grad/hvp kernels and their reduction, for tests without a GPU.");
}
