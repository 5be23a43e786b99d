// Bindings of csrc/twolayer/: the Activation and Loss enums, array checks, dtype dispatch (one name per function;
// the precision is that of W), GIL release. Shapes follow kernels.hpp. Every function takes its arrays in one
// order: data first (X, then Y or the output gradients G), then the parameters W, b, a.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>

#include "bindings/arrays.hpp"
#include "common/gemm.hpp"
#include "twolayer/kernels.hpp"
#include "twolayer/schedule.hpp"

namespace py = pybind11;
using physai::bind::checked_data;
using physai::bind::checked_mutable_data;
using physai::bind::dispatch_float;
namespace tl = physai::twolayer;

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------------------------

struct Config {
  double input_scale, output_scale;
  tl::Activation activation;
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
  net.activation = config.activation;
  tl::validate(net);
  return net;
}

template <class T>
tl::Targets<T> make_targets(const tl::Net<T>& net, const py::array& Y, tl::Loss loss) {
  tl::Targets<T> targets;
  targets.loss = loss;
  targets.shared = Y.ndim() == 2;
  targets.Y = targets.shared ? checked_data<T>(Y, "Y", {net.n, net.k}) : checked_data<T>(Y, "Y", {net.E, net.n, net.k});
  return targets;
}

// D1 is saved exactly when sigma' cannot be read off S.
template <class T>
void check_saved_slope(const tl::Net<T>& net, bool has_D1) {
  if (has_D1 == tl::slope_from_value(net.activation))
    physai::fail_value("D1: expected ", has_D1 ? "None" : "an array", " for this activation (slope_from_value is ",
                       has_D1 ? "True" : "False", ")");
}

// An optional output of the shape given (None when absent) and its data pointer.
template <class T>
std::pair<py::object, T*> optional_output(bool present, std::initializer_list<py::ssize_t> shape) {
  if (!present) return {py::none(), nullptr};
  py::array_t<T> array(shape);
  T* data = array.mutable_data();
  return {std::move(array), data};
}

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

// ---------------------------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------------------------

py::array forward(const py::array& X, const py::array& W, const std::optional<py::array>& b, const py::array& a,
                  const Config& config) {
  return dispatch_float(W, "W", [&](auto zero) -> py::array {
    using T = decltype(zero);
    const auto net = make_net<T>(X, W, b, a, config);
    py::array_t<T> F({net.E, net.n, net.k});
    T* out = F.mutable_data();
    py::gil_scoped_release release;
    tl::forward(net, out);
    return F;
  });
}

py::tuple backward(const py::array& X, const py::array& G, const py::array& W, const std::optional<py::array>& b,
                   const py::array& a, const Config& config, bool want_dX) {
  return dispatch_float(W, "W", [&](auto zero) -> py::tuple {
    using T = decltype(zero);
    const auto net = make_net<T>(X, W, b, a, config);
    const T* g = checked_data<T>(G, "G", {net.E, net.n, net.k});
    py::array_t<T> dW({net.E, net.m, net.d}), da({net.E, net.k, net.m});
    auto [db, db_data] = optional_output<T>(net.b != nullptr, {net.E, net.m});
    auto [dX, dX_data] = optional_output<T>(want_dX, {net.E, net.n, net.d});
    T *dW_data = dW.mutable_data(), *da_data = da.mutable_data();
    {
      py::gil_scoped_release release;
      tl::backward(net, g, dW_data, db_data, da_data, dX_data);
    }
    return py::make_tuple(dW, db, da, dX);
  });
}

// The forward of a training step into F [E, n, k], S [E, n, m] and D1 [E, n, m] (None where slope_from_value), arrays
// the caller allocated (torch tensors' memory, written in place).
void forward_saving(const py::array& X, const py::array& W, const std::optional<py::array>& b, const py::array& a,
                    const Config& config, py::array F, py::array S, std::optional<py::array> D1) {
  dispatch_float(W, "W", [&](auto zero) {
    using T = decltype(zero);
    const auto net = make_net<T>(X, W, b, a, config);
    T* f = checked_mutable_data<T>(F, "F", {net.E, net.n, net.k});
    T* s = checked_mutable_data<T>(S, "S", {net.E, net.n, net.m});
    T* d1 = D1 ? checked_mutable_data<T>(*D1, "D1", {net.E, net.n, net.m}) : nullptr;
    check_saved_slope(net, d1 != nullptr);
    py::gil_scoped_release release;
    tl::forward_saving(net, f, s, d1);
  });
}

// backward's gradients from forward_saving's S and D1, into arrays the caller allocated (dW, da, and db, dX or None).
void backward_saved(const py::array& X, const py::array& G, const py::array& W, const std::optional<py::array>& b,
                    const py::array& a, const py::array& S, const std::optional<py::array>& D1, const Config& config,
                    py::array dW, std::optional<py::array> db, py::array da, std::optional<py::array> dX) {
  dispatch_float(W, "W", [&](auto zero) {
    using T = decltype(zero);
    const auto net = make_net<T>(X, W, b, a, config);
    const T* g = checked_data<T>(G, "G", {net.E, net.n, net.k});
    const T* s = checked_data<T>(S, "S", {net.E, net.n, net.m});
    const T* d1 = D1 ? checked_data<T>(*D1, "D1", {net.E, net.n, net.m}) : nullptr;
    check_saved_slope(net, d1 != nullptr);
    if (db.has_value() != (net.b != nullptr)) physai::fail_value("db: expected an array exactly when b is given");
    T* dW_data = checked_mutable_data<T>(dW, "dW", {net.E, net.m, net.d});
    T* db_data = db ? checked_mutable_data<T>(*db, "db", {net.E, net.m}) : nullptr;
    T* da_data = checked_mutable_data<T>(da, "da", {net.E, net.k, net.m});
    T* dX_data = dX ? checked_mutable_data<T>(*dX, "dX", {net.E, net.n, net.d}) : nullptr;
    py::gil_scoped_release release;
    tl::backward_saved(net, g, s, d1, dW_data, db_data, da_data, dX_data);
  });
}

py::tuple loss_and_grad(const py::array& X, const py::array& Y, const py::array& W, const std::optional<py::array>& b,
                        const py::array& a, const Config& config, tl::Loss loss) {
  return dispatch_float(W, "W", [&](auto zero) -> py::tuple {
    using T = decltype(zero);
    const auto net = make_net<T>(X, W, b, a, config);
    const auto targets = make_targets(net, Y, loss);
    py::array_t<T> losses(net.E), dW({net.E, net.m, net.d}), da({net.E, net.k, net.m});
    auto [db, db_data] = optional_output<T>(net.b != nullptr, {net.E, net.m});
    T *l = losses.mutable_data(), *dW_data = dW.mutable_data(), *da_data = da.mutable_data();
    {
      py::gil_scoped_release release;
      tl::loss_and_grad(net, targets, l, dW_data, db_data, da_data);
    }
    return py::make_tuple(losses, dW, db, da);
  });
}

// The Hessian operator of either precision behind one Python type; it keeps the arrays it views alive.
class HessianOperator {
 public:
  virtual ~HessianOperator() = default;
  virtual py::array matvec(const py::array& V) const = 0;
  virtual int64_t params() const = 0;
};

template <class T>
class TypedHessianOperator final : public HessianOperator {
 public:
  TypedHessianOperator(py::tuple arrays, const tl::Net<T>& net, const tl::Targets<T>& targets)
      : keep_(std::move(arrays)), op_(net, targets) {}

  py::array matvec(const py::array& V) const override {
    const auto& net = op_.net();
    const T* v = checked_data<T>(V, "v", {net.E, op_.params()});
    py::array_t<T> out({net.E, op_.params()});
    T* o = out.mutable_data();
    py::gil_scoped_release release;
    op_.apply(v, o);
    return out;
  }
  int64_t params() const override { return op_.params(); }

 private:
  py::tuple keep_;
  tl::HessianOperator<T> op_;
};

std::unique_ptr<HessianOperator> hessian_operator(const py::array& X, const py::array& Y, const py::array& W,
                                                  const std::optional<py::array>& b, const py::array& a,
                                                  const Config& config, tl::Loss loss) {
  return dispatch_float(W, "W", [&](auto zero) -> std::unique_ptr<HessianOperator> {
    using T = decltype(zero);
    const auto net = make_net<T>(X, W, b, a, config);
    const auto targets = make_targets(net, Y, loss);
    py::tuple arrays = py::make_tuple(X, Y, W, b ? py::object(*b) : py::object(py::none()), a);
    return std::make_unique<TypedHessianOperator<T>>(std::move(arrays), net, targets);
  });
}

py::tuple hessian_eigs(const py::array& X, const py::array& Y, const py::array& W, const std::optional<py::array>& b,
                       const py::array& a, const Config& config, tl::Loss loss, const EigOptions& eig,
                       const std::optional<py::array>& v0) {
  return dispatch_float(W, "W", [&](auto zero) -> py::tuple {
    using T = decltype(zero);
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
  });
}

py::tuple train(const py::array& X, const py::array& Y, py::array W, std::optional<py::array> b, py::array a,
                const Config& config, tl::Loss loss, const py::array& lr, double lr_W, double lr_b, double lr_a,
                int64_t steps, int64_t batch_size, int64_t track_every, const EigOptions& eig,
                const py::array& streams) {
  if (steps < 0) physai::fail_value("steps: expected >= 0, got ", steps);
  if (track_every < 0) physai::fail_value("track_sharpness_every: expected >= 0, got ", track_every);
  return dispatch_float(W, "W", [&](auto zero) -> py::tuple {
    using T = decltype(zero);
    const auto net = make_net<T>(X, W, b, a, config);
    const auto targets = make_targets(net, Y, loss);
    tl::Schedule<T> schedule;
    schedule.lr = checked_data<T>(lr, "lr", {net.E});
    schedule.lr_W = T(lr_W); schedule.lr_b = T(lr_b); schedule.lr_a = T(lr_a);
    schedule.steps = steps;
    schedule.batch_size = batch_size;
    const int64_t tracks = track_every > 0 ? (steps + track_every - 1) / track_every : 0;
    py::array_t<T> losses({steps, net.E}), sharpness({tracks, net.E});
    py::array_t<int64_t> matvecs({tracks, net.E});
    tl::Tracking<T> tracking;
    tracking.every = track_every;
    tracking.options = eig.native();
    tracking.use_lanczos = eig.lanczos;
    tracking.sharpness = sharpness.mutable_data();
    tracking.matvecs = matvecs.mutable_data();
    tracking.streams = checked_data<int64_t>(streams, "streams", {net.E});
    T* out = losses.mutable_data();
    T* w = checked_mutable_data<T>(W, "W", {-1, -1, -1});
    T* bb = b ? checked_mutable_data<T>(*b, "b", {-1, -1}) : nullptr;
    T* aa = checked_mutable_data<T>(a, "a", {-1, -1, -1});
    {
      py::gil_scoped_release release;
      tl::train(net, w, bb, aa, targets, schedule, out, tracking);
    }
    return py::make_tuple(losses, sharpness, matvecs);
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Module
// ---------------------------------------------------------------------------------------------------------------

void bind_twolayer(py::module_& m) {
  // The one table of names and codes; physai.twolayer.params and physai.cuda read it from here.
  py::enum_<tl::Activation>(m, "Activation", "Hidden-layer activations (csrc/twolayer/math.hpp)")
      .value("relu", tl::Activation::Relu)
      .value("tanh", tl::Activation::Tanh)
      .value("gelu", tl::Activation::Gelu)
      .value("erf", tl::Activation::Erf)
      .value("quadratic", tl::Activation::Quadratic)
      .value("linear", tl::Activation::Linear)
      .value("softplus", tl::Activation::Softplus);
  py::enum_<tl::Loss>(m, "Loss", "Losses, means over the batch (csrc/twolayer/math.hpp)")
      .value("mse", tl::Loss::Mse)
      .value("logistic", tl::Loss::Logistic)
      .value("cross_entropy", tl::Loss::CrossEntropy);

  py::class_<Config>(m, "Config")
      .def(py::init<double, double, tl::Activation>(), py::arg("input_scale"), py::arg("output_scale"),
           py::arg("activation"));
  py::class_<EigOptions>(m, "EigOptions")
      .def(py::init<int64_t, std::string, double, int64_t, int64_t, uint64_t, bool>(), py::arg("k"), py::arg("which"),
           py::arg("tol"), py::arg("max_matvecs"), py::arg("ncv"), py::arg("seed"), py::arg("lanczos"));
  py::class_<HessianOperator>(m, "HessianOperator")
      .def("matvec", &HessianOperator::matvec, py::arg("v"))
      .def_property_readonly("params", &HessianOperator::params);

  // The shape thresholds that pick a schedule (schedule.hpp, gemm.hpp), so tests can aim at each path by name.
  py::dict schedule;
  schedule["block_rows"] = tl::detail::kBlockRows;
  schedule["parallel_work"] = tl::detail::kParallelWork;
  schedule["blocked_work"] = tl::detail::kBlockedWork;
  schedule["gemm_block"] = physai::gemm::kBlock;
  schedule["gemm_wide_block"] = physai::gemm::kWideBlock;
  schedule["gemm_wide_operand"] = physai::gemm::kWideOperand;
  schedule["tile_values"] = tl::detail::kTileValues;
  schedule["wide_saved_blocks"] = tl::detail::kWideSavedBlocks;
  schedule["wide_saved_min_rows"] = tl::detail::kWideSavedMinRows;
  schedule["wide_saved_rows"] = tl::detail::kWideSavedRows;
  schedule["small_dim"] = physai::gemm::kSmallDim;
  const auto per_dtype = [](int64_t float32, int64_t float64) {
    py::dict limits;
    limits["float32"] = float32;
    limits["float64"] = float64;
    return limits;
  };
  namespace gm = physai::gemm;
  schedule["micro_transposed_values"] =
      per_dtype(gm::micro_transposed_values<float>(), gm::micro_transposed_values<double>());
  schedule["micro_transposed_side"] =
      per_dtype(gm::micro_transposed_side<float>(), gm::micro_transposed_side<double>());
  schedule["micro_values"] = per_dtype(gm::micro_values<float>(), gm::micro_values<double>());
  m.attr("schedule") = schedule;

  m.def("forward", &forward, py::arg("X"), py::arg("W"), py::arg("b"), py::arg("a"), py::arg("config"),
        "Outputs F [E, n, k].");
  m.def("backward", &backward, py::arg("X"), py::arg("G"), py::arg("W"), py::arg("b"), py::arg("a"),
        py::arg("config"), py::arg("want_dX"), "Gradients (dW, db, da, dX) of sum(F * G).");
  m.def("forward_saving", &forward_saving, py::arg("X"), py::arg("W"), py::arg("b"), py::arg("a"), py::arg("config"),
        py::arg("F"), py::arg("S"), py::arg("D1"),
        "Outputs F [E, n, k] and the hidden layer S = sigma(Z) and D1 = sigma'(Z) [E, n, m] for backward_saved, "
        "written into the arrays given; D1 None where slope_from_value(activation).");
  m.def("backward_saved", &backward_saved, py::arg("X"), py::arg("G"), py::arg("W"), py::arg("b"), py::arg("a"),
        py::arg("S"), py::arg("D1"), py::arg("config"), py::arg("dW"), py::arg("db"), py::arg("da"), py::arg("dX"),
        "Gradients of sum(F * G) from forward_saving's S and D1, written into dW, db, da and dX (db and dX may be "
        "None).");
  m.def("slope_from_value", &tl::slope_from_value, py::arg("activation"),
        "Whether sigma' is read off sigma's value (so forward_saving keeps no D1).");
  m.def("loss_and_grad", &loss_and_grad, py::arg("X"), py::arg("Y"), py::arg("W"), py::arg("b"), py::arg("a"),
        py::arg("config"), py::arg("loss"), "(loss [E], dW, db, da).");
  m.def("hessian_operator", &hessian_operator, py::arg("X"), py::arg("Y"), py::arg("W"), py::arg("b"), py::arg("a"),
        py::arg("config"), py::arg("loss"), "Each member's loss Hessian at the current parameters, as an operator.");
  m.def("hessian_eigs", &hessian_eigs, py::arg("X"), py::arg("Y"), py::arg("W"), py::arg("b"), py::arg("a"),
        py::arg("config"), py::arg("loss"), py::arg("eig"), py::arg("v0"),
        "(values [E, k], vectors [E, k, P], matvecs [E], converged [E]).");
  m.def("train", &train, py::arg("X"), py::arg("Y"), py::arg("W"), py::arg("b"), py::arg("a"), py::arg("config"),
        py::arg("loss"), py::arg("lr"), py::arg("lr_W"), py::arg("lr_b"), py::arg("lr_a"), py::arg("steps"),
        py::arg("batch_size"), py::arg("track_every"), py::arg("eig"), py::arg("streams"),
        "Gradient descent in place on W, b, a (streams [E] int64: member e's random-stream key); returns "
        "(losses [steps, E], sharpness [T, E], matvecs [T, E]).");
}
