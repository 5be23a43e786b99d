// The shared-bias network of shared_bias.hpp. With one bias and one weight per sign, a sample enters the network
// only through four numbers at the current bias, S+ = sum_i (x_i + b)_+, S- = sum_i (b - x_i)_+ and the counts
// N+, N- of the active units. With each sample's coordinates sorted once, and the partial sums of the sorted
// values kept, those are a count and a partial sum: S+ = (sum of x_i > -b) + b N+, S- = b N- - (sum of x_i < b).
// A step then costs O(n) (each sample's cursors move by the few coordinates the bias crossed; the first step of a
// call walks them in O(n d)) instead of the O(n d) of summing the units. Each call sorts the data sets it uses,
// O(D n d log d), and keeps three arrays of X's size. The values are the direct sums' up to rounding: the partial
// sums are accumulated from the nearer end (above -b from the top, below b from the bottom), but S+ = sum + b N+
// cancels when |b| is large against the spread of the active x_i, with an error of order
// eps (|sum| + |b| N+), a few ulps of S+ for data of order one.
//
// Members are independent: each runs its whole schedule as one task (train.cpp explains why), its sums taken in
// sample order, so its values do not depend on the thread count or on the rest of the ensemble.
#include "twolayer/shared_bias.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <memory>
#include <vector>

#include "common/errors.hpp"
#include "common/threading.hpp"

namespace physai::twolayer::shared_bias {

namespace {

// Each sample's coordinates in increasing order and their partial sums: below[k, j] = sum of the j smallest,
// above[k, j] = sum of those from index j up (the d - j largest).
struct SortedData {
  int64_t n, d;
  std::vector<double> sorted, below, above;

  SortedData(const double* X, int64_t n_, int64_t d_)
      : n(n_), d(d_), sorted(X, X + n_ * d_), below(n_ * (d_ + 1)), above(n_ * (d_ + 1)) {
    for (int64_t k = 0; k < n; ++k) {
      double* row = sorted.data() + k * d;
      std::sort(row, row + d);
      double *lo = below.data() + k * (d + 1), *hi = above.data() + k * (d + 1);
      lo[0] = 0;
      for (int64_t j = 0; j < d; ++j) lo[j + 1] = lo[j] + row[j];
      hi[d] = 0;
      for (int64_t j = d - 1; j >= 0; --j) hi[j] = hi[j + 1] + row[j];
    }
  }
};

// One member's view of one data set: for every sample, the cursors at the current bias, plus = index of the first
// coordinate > -b (N+ = d - plus), minus = number of coordinates < b (N-).
class Member {
 public:
  Member(const SortedData& data, const double* y) : data_(data), y_(y), plus_(data.n, 0), minus_(data.n, 0) {}

  // Loss, gradient and (when hessian is not null) Hessian at (a+, a-, b); the loss only when loss is not null.
  void evaluate(double a_plus, double a_minus, double b, double* loss, double* gradient, double* hessian) {
    const int64_t n = data_.n, d = data_.d;
    double value = 0, g[3] = {0, 0, 0}, h[3][3] = {{0, 0, 0}, {0, 0, 0}, {0, 0, 0}};
    for (int64_t k = 0; k < n; ++k) {
      const double* row = data_.sorted.data() + k * d;
      int64_t& p = plus_[k];
      int64_t& q = minus_[k];
      // Both loops stop at once when b is NaN (every comparison is false), so a diverged member costs nothing.
      while (p > 0 && row[p - 1] > -b) --p;
      while (p < d && row[p] <= -b) ++p;
      while (q > 0 && row[q - 1] >= b) --q;
      while (q < d && row[q] < b) ++q;
      const double n_plus = double(d - p), n_minus = double(q);
      // no active unit: exactly 0, also when b is infinite (b * 0 would be NaN)
      const double s_plus = p < d ? data_.above[k * (d + 1) + p] + b * n_plus : 0.0;
      const double s_minus = q > 0 ? b * n_minus - data_.below[k * (d + 1) + q] : 0.0;
      const double f = a_plus * s_plus + a_minus * s_minus, y = y_[k], margin = y * f;
      // sigma(-margin) without overflow; the loss log(1 + exp(-margin)) likewise
      const double e = std::exp(-std::abs(margin));
      const double sigma_minus = margin >= 0 ? e / (1 + e) : 1 / (1 + e);
      if (loss) value += (margin >= 0 ? 0.0 : -margin) + std::log1p(e);
      const double slope = -y * sigma_minus;  // dl/df
      const double J[3] = {s_plus, s_minus, a_plus * n_plus + a_minus * n_minus};
      for (int i = 0; i < 3; ++i) g[i] += slope * J[i];
      if (hessian) {
        // d2l/df2 = sigma(m) sigma(-m) = e / (1 + e)^2 (sigmoid_slope of math.hpp, sharing e): sigma_minus (1 -
        // sigma_minus) cancels as sigma_minus nears 1, with a relative error of about eps e^{-m} (5e4 ulps at a margin
        // of -10.7, found by hypothesis; exactly 0 below -37)
        const double r = 1 / (1 + e), curvature = e * r * r;
        for (int i = 0; i < 3; ++i)
          for (int j = i; j < 3; ++j) h[i][j] += curvature * J[i] * J[j];
        // f's only second derivatives: d2f / da+- db = N+-
        h[0][2] += slope * n_plus;
        h[1][2] += slope * n_minus;
      }
    }
    const double scale = 1.0 / double(n);
    if (loss) *loss = value * scale;
    for (int i = 0; i < 3; ++i) gradient[i] = g[i] * scale;
    if (hessian)
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) hessian[3 * i + j] = (i <= j ? h[i][j] : h[j][i]) * scale;
  }

 private:
  const SortedData& data_;
  const double* y_;
  std::vector<int64_t> plus_, minus_;
};

void validate(const Data& data, const Members& members) {
  PHYSAI_REQUIRE(data.D >= 1 && data.n >= 1 && data.d >= 1, "X: expected a non-empty [D, n, d] array");
  PHYSAI_REQUIRE(members.E >= 0, "members: expected E >= 0");
  for (int64_t i = 0; i < data.D * data.n * data.d; ++i)
    PHYSAI_REQUIRE(std::isfinite(data.X[i]), "X: expected finite values (sorting needs them)");
  for (int64_t i = 0; i < data.D * data.n; ++i)
    PHYSAI_REQUIRE(data.y[i] == 1.0 || data.y[i] == -1.0, "y: expected labels -1 or +1, got ", data.y[i]);
  for (int64_t e = 0; e < members.E; ++e)
    PHYSAI_REQUIRE(members.dataset[e] >= 0 && members.dataset[e] < data.D, "dataset: expected indices in [0, ",
                   data.D, "), got ", members.dataset[e]);
}

// The sorted copies of the data sets some member uses, built in parallel (one task per data set).
std::vector<std::unique_ptr<SortedData>> sort_data(const Data& data, const Members& members) {
  std::vector<char> used(data.D, 0);
  for (int64_t e = 0; e < members.E; ++e) used[members.dataset[e]] = 1;
  std::vector<std::unique_ptr<SortedData>> sorted(data.D);
  std::vector<std::exception_ptr> errors(data.D);
  parallel_tasks(data.D, [&](int64_t s) {
    try {
      if (used[s]) sorted[s] = std::make_unique<SortedData>(data.X + s * data.n * data.d, data.n, data.d);
    } catch (...) {
      errors[s] = std::current_exception();
    }
  });
  for (auto& error : errors)
    if (error) std::rethrow_exception(error);
  return sorted;
}

// body(e) for every member as one task each; the first exception, in member order, is rethrown after all ran.
template <class Body>
void over_members(int64_t E, Body&& body) {
  std::vector<std::exception_ptr> errors(E);
  parallel_tasks(E, [&](int64_t e) {
    try {
      body(e);
    } catch (...) {
      errors[e] = std::current_exception();
    }
  });
  for (auto& error : errors)
    if (error) std::rethrow_exception(error);
}

}  // namespace

void evaluate(const Data& data, const Members& members, double* loss, double* gradient, double* hessian) {
  validate(data, members);
  const auto sorted = sort_data(data, members);
  over_members(members.E, [&](int64_t e) {
    const int64_t s = members.dataset[e];
    Member member(*sorted[s], data.y + s * data.n);
    member.evaluate(members.a_plus[e], members.a_minus[e], members.b[e], loss + e, gradient + 3 * e,
                    hessian + 9 * e);
  });
}

void train(const Data& data, const Members& members, const double* lr, const int64_t* steps,
           const int64_t* record_steps, int64_t K, double* record_loss, double* record_params,
           double* record_hessian) {
  validate(data, members);
  const int64_t E = members.E;
  for (int64_t e = 0; e < E; ++e) {
    PHYSAI_REQUIRE(std::isfinite(lr[e]) && lr[e] > 0, "lr: expected finite positive rates, got ", lr[e]);
    PHYSAI_REQUIRE(steps[e] >= 0, "steps: expected >= 0, got ", steps[e]);
    for (int64_t r = 0; r < K; ++r)
      PHYSAI_REQUIRE(record_steps[r * E + e] >= 0 && record_steps[r * E + e] <= steps[e],
                     "record_steps: expected steps in [0, steps] of their member, got ", record_steps[r * E + e]);
  }
  const auto sorted = sort_data(data, members);
  over_members(E, [&](int64_t e) {
    const int64_t s = members.dataset[e];
    Member member(*sorted[s], data.y + s * data.n);
    double &a_plus = members.a_plus[e], &a_minus = members.a_minus[e], &b = members.b[e];
    // record_steps[., e] need not be sorted: the records due at each step are found by one pass over them
    std::vector<int64_t> order(K);
    for (int64_t r = 0; r < K; ++r) order[r] = r;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t i, int64_t j) { return record_steps[i * E + e] < record_steps[j * E + e]; });
    int64_t next = 0;
    double gradient[3], hessian[9], value;
    for (int64_t t = 0; t <= steps[e]; ++t) {
      const bool recorded = next < K && record_steps[order[next] * E + e] == t;
      if (!recorded && t == steps[e]) break;
      member.evaluate(a_plus, a_minus, b, recorded ? &value : nullptr, gradient, recorded ? hessian : nullptr);
      for (; next < K && record_steps[order[next] * E + e] == t; ++next) {
        const int64_t r = order[next];
        record_loss[r * E + e] = value;
        double* params = record_params + (r * E + e) * 3;
        params[0] = a_plus, params[1] = a_minus, params[2] = b;
        std::copy(hessian, hessian + 9, record_hessian + (r * E + e) * 9);
      }
      if (t == steps[e]) break;
      a_plus -= lr[e] * gradient[0];
      a_minus -= lr[e] * gradient[1];
      b -= lr[e] * gradient[2];
    }
  });
}

}  // namespace physai::twolayer::shared_bias
