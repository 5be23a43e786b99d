// The ReLU network of Ahn et al. (arXiv 2212.07469, eq. (2)) for sparse coding: units ReLU(+x_i + b) and
// ReLU(-x_i + b) on every input coordinate, one output weight per sign shared by all coordinates, one shared bias,
//
//     f(x) = a+ sum_i ReLU(x_i + b) + a- sum_i ReLU(-x_i + b),
//
// trained by full-batch gradient descent on the mean logistic loss (1/n) sum_k log(1 + exp(-y_k f(x_k))).
// Every member e of an ensemble has its own (a+, a-, b), learning rate and number of steps, and trains on data set
// dataset[e]. float64 only. numpy twin: physai/twolayer/reference.py (shared_bias_*).
#pragma once
#include <cstdint>

namespace physai::twolayer::shared_bias {

// D data sets of n samples of dimension d: X [D, n, d], labels y [D, n] in {-1, +1}.
struct Data {
  const double* X;
  const double* y;
  int64_t D, n, d;
};

// Members: parameters [E] each, and dataset [E] (the data set each trains on).
struct Members {
  double *a_plus, *a_minus, *b;
  const int64_t* dataset;
  int64_t E;
};

// Loss [E], gradient [E, 3] and Hessian [E, 3, 3] in the order (a+, a-, b) of every member at its parameters.
void evaluate(const Data& data, const Members& members, double* loss, double* gradient, double* hessian);

// Gradient descent: member e takes steps[e] steps of size lr[e], updating its parameters in place. Before step t
// (t = steps[e]: after the last one) it records loss, parameters (a+, a-, b) and Hessian at each r < K with
// record_steps[r * E + e] == t, into record_loss [K, E], record_params [K, E, 3], record_hessian [K, E, 3, 3].
void train(const Data& data, const Members& members, const double* lr, const int64_t* steps,
           const int64_t* record_steps, int64_t K, double* record_loss, double* record_params,
           double* record_hessian);

}  // namespace physai::twolayer::shared_bias
