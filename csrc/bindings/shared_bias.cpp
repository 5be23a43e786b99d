// Bindings of csrc/twolayer/shared_bias: array checks and GIL release. Shapes as in shared_bias.hpp; float64 only.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "bindings/arrays.hpp"
#include "twolayer/shared_bias.hpp"

namespace py = pybind11;
using physai::bind::checked_data;
using physai::bind::checked_mutable_data;
namespace sb = physai::twolayer::shared_bias;

namespace {

sb::Data make_data(const py::array& X, const py::array& y) {
  if (X.ndim() != 3) physai::fail_value("X: expected 3 dimensions [D, n, d], got shape ", physai::bind::shape_string(X));
  sb::Data data;
  data.D = X.shape(0), data.n = X.shape(1), data.d = X.shape(2);
  data.X = checked_data<double>(X, "X", {data.D, data.n, data.d});
  data.y = checked_data<double>(y, "y", {data.D, data.n});
  return data;
}

sb::Members make_members(py::array& a_plus, py::array& a_minus, py::array& b, const py::array& dataset) {
  sb::Members members;
  if (a_plus.ndim() != 1) physai::fail_value("a_plus: expected 1 dimension [E], got shape ", physai::bind::shape_string(a_plus));
  members.E = a_plus.shape(0);
  members.a_plus = checked_mutable_data<double>(a_plus, "a_plus", {members.E});
  members.a_minus = checked_mutable_data<double>(a_minus, "a_minus", {members.E});
  members.b = checked_mutable_data<double>(b, "b", {members.E});
  members.dataset = checked_data<int64_t>(dataset, "dataset", {members.E});
  return members;
}

}  // namespace

void bind_shared_bias(py::module_& m) {
  m.def(
      "shared_bias_evaluate",
      [](const py::array& X, const py::array& y, py::array a_plus, py::array a_minus, py::array b,
         const py::array& dataset) {
        const sb::Data data = make_data(X, y);
        const sb::Members members = make_members(a_plus, a_minus, b, dataset);
        py::array_t<double> loss({members.E}), gradient({members.E, int64_t(3)}),
            hessian({members.E, int64_t(3), int64_t(3)});
        double *l = loss.mutable_data(), *g = gradient.mutable_data(), *h = hessian.mutable_data();
        {
          py::gil_scoped_release release;
          sb::evaluate(data, members, l, g, h);
        }
        return py::make_tuple(loss, gradient, hessian);
      },
      py::arg("X"), py::arg("y"), py::arg("a_plus"), py::arg("a_minus"), py::arg("b"), py::arg("dataset"),
      "Loss [E], gradient [E, 3] and Hessian [E, 3, 3] of the shared-bias network (physai.twolayer.shared_bias).");
  m.def(
      "shared_bias_train",
      [](const py::array& X, const py::array& y, py::array a_plus, py::array a_minus, py::array b,
         const py::array& dataset, const py::array& lr, const py::array& steps, const py::array& record_steps) {
        const sb::Data data = make_data(X, y);
        const sb::Members members = make_members(a_plus, a_minus, b, dataset);
        const int64_t E = members.E;
        const double* rates = checked_data<double>(lr, "lr", {E});
        const int64_t* counts = checked_data<int64_t>(steps, "steps", {E});
        if (record_steps.ndim() != 2)
          physai::fail_value("record_steps: expected 2 dimensions [K, E], got shape ",
                             physai::bind::shape_string(record_steps));
        const int64_t K = record_steps.shape(0);
        const int64_t* records = checked_data<int64_t>(record_steps, "record_steps", {K, E});
        py::array_t<double> loss({K, E}), params({K, E, int64_t(3)}), hessian({K, E, int64_t(3), int64_t(3)});
        double *l = loss.mutable_data(), *p = params.mutable_data(), *h = hessian.mutable_data();
        {
          py::gil_scoped_release release;
          sb::train(data, members, rates, counts, records, K, l, p, h);
        }
        return py::make_tuple(loss, params, hessian);
      },
      py::arg("X"), py::arg("y"), py::arg("a_plus"), py::arg("a_minus"), py::arg("b"), py::arg("dataset"),
      py::arg("lr"), py::arg("steps"), py::arg("record_steps"),
      "Gradient descent on the shared-bias network, parameters updated in place; returns the records (loss [K, E], "
      "params [K, E, 3], hessian [K, E, 3, 3]).");
}
