// Bindings of csrc/twolayer/: array checks, dtype dispatch, GIL release. Shapes follow kernels.hpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "bindings/arrays.hpp"
#include "twolayer/kernels.hpp"

namespace py = pybind11;
using physai::bind::checked_data;
using physai::bind::checked_mutable_data;
namespace tl = physai::twolayer;

namespace {

struct Config {
  double input_scale, output_scale;
  int activation;
};

// Builds the kernel view of (X, W, b, a): extents from W [E,m,d] and a [E,k,m]; X [n,d] or [E,n,d].
template <class T>
tl::Net<T> make_net(const py::array& X, const py::array& W, const std::optional<py::array>& b, const py::array& a,
                    const Config& config) {
  tl::Net<T> net;
  if (W.ndim() != 3) physai::fail_value("W: expected 3 dimensions [E, m, d], got shape ", physai::bind::shape_string(W));
  net.E = W.shape(0); net.m = W.shape(1); net.d = W.shape(2);
  net.W = checked_data<T>(W, "W", {net.E, net.m, net.d});
  if (a.ndim() != 3) physai::fail_value("a: expected 3 dimensions [E, k, m], got shape ", physai::bind::shape_string(a));
  net.k = a.shape(1);
  net.a = checked_data<T>(a, "a", {net.E, net.k, net.m});
  net.b = b ? checked_data<T>(*b, "b", {net.E, net.m}) : nullptr;
  net.x_shared = X.ndim() == 2;
  net.n = X.ndim() >= 2 ? X.shape(X.ndim() - 2) : 0;
  net.X = net.x_shared ? checked_data<T>(X, "X", {net.n, net.d}) : checked_data<T>(X, "X", {net.E, net.n, net.d});
  net.input_scale = T(config.input_scale);
  net.output_scale = T(config.output_scale);
  net.activation = static_cast<tl::Activation>(config.activation);
  tl::validate(net);
  return net;
}

template <class T>
tl::Targets<T> make_targets(const tl::Net<T>& net, const py::array& Y, int loss) {
  tl::Targets<T> targets;
  if (loss < 0 || loss > int(tl::Loss::CrossEntropy)) physai::fail_value("loss: unknown code ", loss);
  targets.loss = static_cast<tl::Loss>(loss);
  targets.shared = Y.ndim() == 2;
  targets.Y = targets.shared ? checked_data<T>(Y, "Y", {net.n, net.k}) : checked_data<T>(Y, "Y", {net.E, net.n, net.k});
  return targets;
}

template <class T>
py::array_t<T> forward(py::array X, py::array W, std::optional<py::array> b, py::array a, Config config) {
  const auto net = make_net<T>(X, W, b, a, config);
  py::array_t<T> F({net.E, net.n, net.k});
  T* out = F.mutable_data();
  py::gil_scoped_release release;
  tl::forward(net, out);
  return F;
}

template <class T>
py::tuple backward(py::array X, py::array W, std::optional<py::array> b, py::array a, py::array G, Config config,
                   bool want_dX) {
  const auto net = make_net<T>(X, W, b, a, config);
  const T* g = checked_data<T>(G, "G", {net.E, net.n, net.k});
  py::array_t<T> dW({net.E, net.m, net.d}), da({net.E, net.k, net.m});
  py::object db = py::none(), dX = py::none();
  T *db_data = nullptr, *dX_data = nullptr;
  if (net.b) {
    py::array_t<T> array({net.E, net.m});
    db_data = array.mutable_data();
    db = array;
  }
  if (want_dX) {
    py::array_t<T> array({net.E, net.n, net.d});
    dX_data = array.mutable_data();
    dX = array;
  }
  T *dW_data = dW.mutable_data(), *da_data = da.mutable_data();
  {
    py::gil_scoped_release release;
    tl::backward(net, g, dW_data, db_data, da_data, dX_data);
  }
  return py::make_tuple(dW, db, da, dX);
}

template <class T>
py::tuple loss_and_grad(py::array X, py::array W, std::optional<py::array> b, py::array a, py::array Y, Config config,
                        int loss) {
  const auto net = make_net<T>(X, W, b, a, config);
  const auto targets = make_targets(net, Y, loss);
  py::array_t<T> losses(net.E), dW({net.E, net.m, net.d}), da({net.E, net.k, net.m});
  py::object db = py::none();
  T* db_data = nullptr;
  if (net.b) {
    py::array_t<T> array({net.E, net.m});
    db_data = array.mutable_data();
    db = array;
  }
  T *l = losses.mutable_data(), *dW_data = dW.mutable_data(), *da_data = da.mutable_data();
  {
    py::gil_scoped_release release;
    tl::loss_and_grad(net, targets, l, dW_data, db_data, da_data);
  }
  return py::make_tuple(losses, dW, db, da);
}

// Keeps the arrays it views alive for the operator's lifetime.
template <class T>
struct PyHessian {
  py::tuple keep;
  tl::HessianOperator<T> op;
  PyHessian(py::array X, py::array W, std::optional<py::array> b, py::array a, py::array Y, Config config, int loss)
      : PyHessian(py::make_tuple(X, W, b ? py::object(*b) : py::object(py::none()), a, Y),
                  make_net<T>(X, W, b, a, config), Y, loss) {}

  PyHessian(py::tuple arrays, const tl::Net<T>& net, const py::array& Y, int loss)
      : keep(std::move(arrays)), op(net, make_targets(net, Y, loss)) {}

  py::array_t<T> matvec(py::array V) const {
    const auto& net = op.net();
    const T* v = checked_data<T>(V, "v", {net.E, op.params()});
    py::array_t<T> out({net.E, op.params()});
    T* o = out.mutable_data();
    py::gil_scoped_release release;
    op.apply(v, o);
    return out;
  }
};

// Solver settings shared by hessian_eigs and sharpness tracking.
struct EigOptions {
  int64_t k;
  std::string which;
  double tol;
  int64_t max_matvecs, ncv;
  uint64_t seed;
  bool lanczos;

  physai::spectrum::Options native() const {
    return physai::spectrum::make_options(k, which, tol, max_matvecs, ncv, seed);
  }
};

template <class T>
py::tuple hessian_eigs(py::array X, py::array W, std::optional<py::array> b, py::array a, py::array Y, Config config,
                       int loss, EigOptions eig, std::optional<py::array> v0) {
  const auto net = make_net<T>(X, W, b, a, config);
  const auto targets = make_targets(net, Y, loss);
  const auto options = eig.native();
  const int64_t P = net.params();
  const T* start = v0 ? checked_data<T>(*v0, "v0", {net.E, P}) : nullptr;
  py::array_t<T> values({net.E, options.k}), vectors({net.E, options.k, P});
  py::array_t<int64_t> matvecs(net.E);
  py::array_t<bool> converged(net.E);
  T *vals = values.mutable_data(), *vecs = vectors.mutable_data();
  int64_t* counts = matvecs.mutable_data();
  auto* ok = reinterpret_cast<uint8_t*>(converged.mutable_data());
  {
    py::gil_scoped_release release;
    tl::hessian_eigs(net, targets, options, eig.lanczos, start, vals, vecs, counts, ok);
  }
  return py::make_tuple(values, vectors, matvecs, converged);
}

template <class T>
py::tuple train(py::array X, py::array W, std::optional<py::array> b, py::array a, py::array Y, Config config,
                int loss, py::array lr, double lr_W, double lr_b, double lr_a, int64_t steps, int64_t batch_size,
                int64_t track_every, EigOptions eig) {
  auto net = make_net<T>(X, W, b, a, config);
  const auto targets = make_targets(net, Y, loss);
  tl::Schedule<T> schedule;
  schedule.lr = checked_data<T>(lr, "lr", {net.E});
  schedule.lr_W = T(lr_W); schedule.lr_b = T(lr_b); schedule.lr_a = T(lr_a);
  schedule.steps = steps;
  schedule.batch_size = batch_size;
  if (steps < 0) physai::fail_value("steps: expected >= 0, got ", steps);
  if (track_every < 0) physai::fail_value("track_sharpness_every: expected >= 0, got ", track_every);
  const int64_t tracks = track_every > 0 ? (steps + track_every - 1) / track_every : 0;
  py::array_t<T> losses({steps, net.E}), sharpness({tracks, net.E});
  py::array_t<int64_t> matvecs({tracks, net.E});
  tl::Tracking<T> tracking;
  tracking.every = track_every;
  tracking.options = eig.native();
  tracking.use_lanczos = eig.lanczos;
  tracking.sharpness = sharpness.mutable_data();
  tracking.matvecs = matvecs.mutable_data();
  T* out = losses.mutable_data();
  T *w = checked_mutable_data<T>(W, "W", {-1, -1, -1}), *bb = b ? checked_mutable_data<T>(*b, "b", {-1, -1}) : nullptr,
    *aa = checked_mutable_data<T>(a, "a", {-1, -1, -1});
  {
    py::gil_scoped_release release;
    tl::train(net, w, bb, aa, targets, schedule, out, tracking);
  }
  return py::make_tuple(losses, sharpness, matvecs);
}

template <class T>
void bind_dtype(py::module_& m, const char* suffix) {
  const std::string s(suffix);
  m.def(("forward_" + s).c_str(), &forward<T>, py::arg("X"), py::arg("W"), py::arg("b"), py::arg("a"), py::arg("config"));
  m.def(("backward_" + s).c_str(), &backward<T>, py::arg("X"), py::arg("W"), py::arg("b"), py::arg("a"), py::arg("G"),
        py::arg("config"), py::arg("want_dX"));
  m.def(("loss_and_grad_" + s).c_str(), &loss_and_grad<T>, py::arg("X"), py::arg("W"), py::arg("b"), py::arg("a"),
        py::arg("Y"), py::arg("config"), py::arg("loss"));
  m.def(("train_" + s).c_str(), &train<T>, py::arg("X"), py::arg("W"), py::arg("b"), py::arg("a"), py::arg("Y"),
        py::arg("config"), py::arg("loss"), py::arg("lr"), py::arg("lr_W"), py::arg("lr_b"), py::arg("lr_a"),
        py::arg("steps"), py::arg("batch_size"), py::arg("track_every"), py::arg("eig"));
  m.def(("hessian_eigs_" + s).c_str(), &hessian_eigs<T>, py::arg("X"), py::arg("W"), py::arg("b"), py::arg("a"),
        py::arg("Y"), py::arg("config"), py::arg("loss"), py::arg("eig"), py::arg("v0"));
  py::class_<PyHessian<T>>(m, ("HessianOperator_" + s).c_str())
      .def(py::init<py::array, py::array, std::optional<py::array>, py::array, py::array, Config, int>(),
           py::arg("X"), py::arg("W"), py::arg("b"), py::arg("a"), py::arg("Y"), py::arg("config"), py::arg("loss"))
      .def("matvec", &PyHessian<T>::matvec, py::arg("v"))
      .def_property_readonly("params", [](const PyHessian<T>& h) { return h.op.params(); });
}

}  // namespace

void bind_twolayer(py::module_& m) {
  py::class_<Config>(m, "Config")
      .def(py::init<double, double, int>(), py::arg("input_scale"), py::arg("output_scale"), py::arg("activation"));
  py::class_<EigOptions>(m, "EigOptions")
      .def(py::init<int64_t, std::string, double, int64_t, int64_t, uint64_t, bool>(), py::arg("k"), py::arg("which"),
           py::arg("tol"), py::arg("max_matvecs"), py::arg("ncv"), py::arg("seed"), py::arg("lanczos"));
  bind_dtype<float>(m, "f32");
  bind_dtype<double>(m, "f64");
}
