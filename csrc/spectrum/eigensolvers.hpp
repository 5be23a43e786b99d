// Batched symmetric eigensolvers over a matvec callback: power iteration and thick-restart Lanczos with full
// reorthogonalization. Header-only templates so that any C++ operator (e.g. a fused two-layer HVP) plugs in as
// a lambda `void(const T* V /*[batch, n]*/, T* out /*[batch, n]*/)` with no Python in the loop.
//
// Every batch member runs its own solver and converges independently. The callback is always called on the
// whole [batch, n] block (so batched operators keep their shape); members that have converged are fed zero
// vectors and are not charged a matvec (an operator may skip zero rows, as the fused two-layer HVP does). Vectors
// are stored in T, every reduction is accumulated in double in a fixed order, and members never share work, so
// results do not depend on the thread count.
#pragma once
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "common/errors.hpp"
#include "common/philox.hpp"
#include "common/threading.hpp"

namespace physai::spectrum {

enum class Which { LargestAlgebraic, LargestMagnitude };

struct Options {
  int64_t k = 1;                 // wanted eigenpairs per member
  Which which = Which::LargestAlgebraic;
  double tol = 1e-6;             // converged when ||A y - theta y|| <= tol * max(|theta|, |theta_1|), each pair
  int64_t max_matvecs = 1000;    // per member
  int64_t ncv = 0;               // Krylov dimension (Lanczos); 0 = min(n, max(2k + 1, 20))
  uint64_t seed = 0;             // starting vectors when no warm start is given
};

// Options from the Python-facing spellings ("LA" / "LM"), shared by every binding that runs a solver.
inline Options make_options(int64_t k, const std::string& which, double tol, int64_t max_matvecs, int64_t ncv,
                            uint64_t seed) {
  Options opt;
  opt.k = k;
  if (which == "LA")
    opt.which = Which::LargestAlgebraic;
  else if (which == "LM")
    opt.which = Which::LargestMagnitude;
  else
    fail_value("which: expected 'LA' or 'LM', got '", which, "'");
  opt.tol = tol;
  opt.max_matvecs = max_matvecs;
  opt.ncv = ncv;
  opt.seed = seed;
  return opt;
}

// Random-stream domains, shared with physai/spectrum/reference.py.
constexpr uint32_t kDomainStart = 0x5ec0;     // starting vector of member b: stream (seed, b, kDomainStart)
constexpr uint32_t kDomainBreakdown = 0x5ec1; // fresh directions after an invariant subspace is found

namespace detail {

// Four partial sums in a fixed lane order, so the loop vectorises and the result still depends only on n.
template <class T>
double dot(const T* a, const T* b, int64_t n) {
  double partial[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int q = 0; q < 4; ++q) partial[q] += static_cast<double>(a[i + q]) * static_cast<double>(b[i + q]);
  for (int q = 0; i + q < n; ++q) partial[q] += static_cast<double>(a[i + q]) * static_cast<double>(b[i + q]);
  return (partial[0] + partial[1]) + (partial[2] + partial[3]);
}

template <class T>
double norm(const T* a, int64_t n) {
  return std::sqrt(dot(a, a, n));
}

// Uniform in [-1, 1): cheap, and any direction with a component along the wanted eigenvectors will do.
template <class T>
void random_vector(CounterStream& stream, T* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<T>(2.0 * stream.uniform_double() - 1.0);
}

// The unit starting vector of batch row b, which is member `member`: row b of the warm start v0, or random from
// stream (seed, member, kDomainStart).
template <class T>
void start_vector(const Options& opt, const T* v0, int64_t b, int64_t member, int64_t n, T* x, const char* solver) {
  if (v0) {
    std::copy(v0 + b * n, v0 + (b + 1) * n, x);
  } else {
    CounterStream stream(opt.seed, static_cast<uint64_t>(member), kDomainStart);
    random_vector(stream, x, n);
  }
  // Scaled by its largest entry first, so that the squares in the norm neither overflow nor underflow.
  double largest = 0.0;
  bool finite = true;
  for (int64_t t = 0; t < n; ++t) {
    finite &= std::isfinite(static_cast<double>(x[t]));
    largest = std::max(largest, std::abs(static_cast<double>(x[t])));
  }
  PHYSAI_REQUIRE(largest > 0 && finite, solver, ": v0 of member ", member, " is zero or not finite");
  for (int64_t t = 0; t < n; ++t) x[t] = static_cast<T>(x[t] / largest);
  const double nx = norm(x, n);
  for (int64_t t = 0; t < n; ++t) x[t] = static_cast<T>(x[t] / nx);
}

// Gives each eigenvector a reproducible sign: its largest-magnitude entry (first on ties) is positive.
template <class T>
void fix_sign(T* v, int64_t n) {
  int64_t arg = 0;
  for (int64_t i = 1; i < n; ++i)
    if (std::abs(v[i]) > std::abs(v[arg])) arg = i;
  if (v[arg] < 0)
    for (int64_t i = 0; i < n; ++i) v[i] = -v[i];
}

// parallel_for whose body may throw: an exception must not escape an OpenMP region, so each member's is kept
// and the first (in member order) is rethrown after the loop. Members of a few thousand values run on one thread:
// the solver's work per member is a handful of passes over them, less than waking the other threads costs.
template <class Body>
void guarded_parallel_for(int64_t batch, int64_t n, Body&& body) {
  constexpr int64_t kParallelValues = int64_t(1) << 14;
  std::vector<std::exception_ptr> errors(batch);
  auto guarded = [&](int64_t i) {
    try {
      body(i);
    } catch (...) {
      errors[i] = std::current_exception();
    }
  };
  if (batch * n < kParallelValues) {
    for (int64_t i = 0; i < batch; ++i) guarded(i);
  } else {
    parallel_for(batch, guarded);
  }
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Indices of eigenvalues theta[0..m) from most to least wanted.
inline std::vector<int> wanted_order(const std::vector<double>& theta, int m, Which which) {
  std::vector<int> order(m);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    if (which == Which::LargestMagnitude && std::abs(theta[a]) != std::abs(theta[b]))
      return std::abs(theta[a]) > std::abs(theta[b]);
    return theta[a] > theta[b];
  });
  return order;
}

// Dense symmetric eigensolver of the small projected matrix (LAPACK dsyev, column-major, ascending).
inline void small_eigh(const std::vector<double>& H, int ld, int m, std::vector<double>& theta,
                       std::vector<double>& S) {
  S.assign(static_cast<size_t>(m) * m, 0.0);
  for (int j = 0; j < m; ++j)
    for (int i = 0; i < m; ++i) S[i + static_cast<size_t>(j) * m] = H[i + static_cast<size_t>(j) * ld];
  theta.assign(m, 0.0);
  const int info = scipy_LAPACKE_dsyev(LAPACK_COL_MAJOR, 'V', 'U', m, S.data(), m, theta.data());
  PHYSAI_REQUIRE(info == 0, "lanczos: the projected eigenproblem failed (LAPACK dsyev info ", info,
                 "); the operator returned non-finite values or is not symmetric");
}

template <class T>
struct LanczosMember {
  int64_t n = 0;
  int m = 0;                      // Krylov dimension
  // (m + 1) x n orthonormal vectors, uninitialised: a row is written before it is read, and a tracked training step
  // that needs one or two products would otherwise clear all m + 1 rows.
  std::unique_ptr<T[]> basis;
  std::vector<double> H;          // m x m projection V^T A V, column-major
  std::vector<double> theta, S;   // Ritz values / vectors of the current projection
  int j = 0;                      // index of the basis vector the next matvec is applied to
  // The Krylov space became exactly invariant before filling the basis: its Ritz pairs are exact, but a Krylov
  // space holds one vector per eigenvalue (and none where v0 has no component), so they need not be the wanted ones
  // (a repeated top eigenvalue, or a warm start that is itself an eigenvector). Convergence then waits until the
  // basis is full, extended by random directions. (A v0 merely close to another eigenvector can still converge to
  // it: no residual test can tell.)
  bool exhausted = false;
  bool done = false;
  int64_t matvecs = 0;
  CounterStream breakdown{0, 0, kDomainBreakdown};
  std::vector<T> scratch;

  T* v(int i) { return basis.get() + static_cast<size_t>(i) * n; }

  // Removes the span of basis[0..count) from w twice (classical Gram-Schmidt, then a correction pass);
  // coefficients (summed over both passes) go to coef.
  void orthogonalize(T* w, int count, double* coef) {
    for (int pass = 0; pass < 2; ++pass) {
      for (int i = 0; i < count; ++i) {
        const double c = dot(v(i), w, n);
        if (coef) coef[i] += c;
        const T* vi = v(i);
        for (int64_t t = 0; t < n; ++t) w[t] = static_cast<T>(w[t] - c * vi[t]);
      }
    }
  }

  // Ritz vector sum_l S[l, col] basis[l] over the first `rows` basis vectors into out.
  void ritz_vector(int rows, int col, T* out) {
    std::vector<double> acc(n, 0.0);
    for (int l = 0; l < rows; ++l) {
      const double s = S[l + static_cast<size_t>(col) * rows];
      const T* vl = v(l);
      for (int64_t t = 0; t < n; ++t) acc[t] += s * vl[t];
    }
    for (int64_t t = 0; t < n; ++t) out[t] = static_cast<T>(acc[t]);
  }
};

}  // namespace detail

// Power iteration for the dominant (largest-magnitude) eigenpair of each member.
//   matvec: void(const T* V, T* out), both [batch, n] row-major.
//   v0: optional warm start [batch, n] (nullptr: random from opt.seed).
//   values [batch], vectors [batch, n], matvecs [batch], converged [batch] are written.
//   first_member: batch row b is member first_member + b of a larger batch, which is the index its random streams
//   use and its errors name, so solving members one at a time gives the bits of one batched call.
template <class T, class MatVec>
void power_iteration(MatVec&& matvec, int64_t batch, int64_t n, const Options& opt, const T* v0, T* values,
                     T* vectors, int64_t* matvecs, uint8_t* converged, int64_t first_member = 0) {
  PHYSAI_REQUIRE(batch >= 1 && n >= 1, "power_iteration: batch and n must be >= 1");
  PHYSAI_REQUIRE(opt.tol > 0, "power_iteration: tol must be > 0, got ", opt.tol);
  PHYSAI_REQUIRE(opt.max_matvecs >= 1, "power_iteration: max_matvecs must be >= 1");
  std::vector<T> X(static_cast<size_t>(batch) * n), Y(X.size());
  std::vector<uint8_t> done(batch, 0);
  detail::guarded_parallel_for(batch, n, [&](int64_t b) {
    T* x = X.data() + b * n;
    detail::start_vector(opt, v0, b, first_member + b, n, x, "power_iteration");
    matvecs[b] = 0;
    converged[b] = 0;
  });
  int64_t active = batch;
  while (active > 0) {
    matvec(static_cast<const T*>(X.data()), Y.data());
    detail::guarded_parallel_for(batch, n, [&](int64_t b) {
      if (done[b]) return;
      T* x = X.data() + b * n;
      const T* y = Y.data() + b * n;
      ++matvecs[b];
      const double theta = detail::dot(x, y, n);
      double res2 = 0.0, ny2 = 0.0;
      for (int64_t t = 0; t < n; ++t) {
        const double r = y[t] - theta * x[t];
        res2 += r * r;
        ny2 += static_cast<double>(y[t]) * y[t];
      }
      PHYSAI_REQUIRE(std::isfinite(ny2), "power_iteration: the operator returned non-finite values for member ",
                     first_member + b);
      const bool ok = std::sqrt(res2) <= opt.tol * std::abs(theta) || ny2 == 0.0;
      if (ok || matvecs[b] >= opt.max_matvecs) {
        values[b] = static_cast<T>(theta);
        std::copy(x, x + n, vectors + b * n);
        detail::fix_sign(vectors + b * n, n);
        converged[b] = ok;
        done[b] = 1;
        std::fill(x, x + n, T(0));
        return;
      }
      const double ny = std::sqrt(ny2);
      for (int64_t t = 0; t < n; ++t) x[t] = static_cast<T>(y[t] / ny);
    });
    active = std::count(done.begin(), done.end(), uint8_t(0));
  }
}

// Thick-restart Lanczos with full reorthogonalization for the k most wanted eigenpairs of each member.
//   matvec: void(const T* V, T* out), both [batch, n] row-major.
//   v0: optional warm start [batch, n] (e.g. the previous top eigenvector), nullptr: random from opt.seed.
//   values [batch, k] (most wanted first), vectors [batch, k, n], matvecs [batch], converged [batch].
//   first_member: as in power_iteration.
template <class T, class MatVec>
void lanczos(MatVec&& matvec, int64_t batch, int64_t n, const Options& opt, const T* v0, T* values, T* vectors,
             int64_t* matvecs, uint8_t* converged, int64_t first_member = 0) {
  PHYSAI_REQUIRE(batch >= 1 && n >= 1, "lanczos: batch and n must be >= 1");
  PHYSAI_REQUIRE(opt.k >= 1 && opt.k <= n, "lanczos: k must be in [1, n=", n, "], got ", opt.k);
  PHYSAI_REQUIRE(opt.tol > 0, "lanczos: tol must be > 0, got ", opt.tol);
  PHYSAI_REQUIRE(opt.max_matvecs >= opt.k, "lanczos: max_matvecs must be >= k=", opt.k, ", got ", opt.max_matvecs);
  const int64_t ncv = opt.ncv > 0 ? opt.ncv : std::min<int64_t>(n, std::max<int64_t>(2 * opt.k + 1, 20));
  PHYSAI_REQUIRE(ncv <= n && (ncv > opt.k || ncv == n),
                 "lanczos: ncv must be in (k, n] (or equal n), got ncv=", ncv, " k=", opt.k, " n=", n);
  const int m = static_cast<int>(ncv);
  const int k = static_cast<int>(opt.k);

  std::vector<detail::LanczosMember<T>> members(batch);
  std::vector<T> X(static_cast<size_t>(batch) * n), Y(X.size());
  detail::guarded_parallel_for(batch, n, [&](int64_t b) {
    auto& s = members[b];
    s.n = n;
    s.m = m;
    s.basis.reset(new T[static_cast<size_t>(m + 1) * n]);
    s.H.assign(static_cast<size_t>(m) * m, 0.0);
    s.breakdown = CounterStream(opt.seed, static_cast<uint64_t>(first_member + b), kDomainBreakdown);
    T* x = s.v(0);
    detail::start_vector(opt, v0, b, first_member + b, n, x, "lanczos");
    matvecs[b] = 0;
    converged[b] = 0;
  });

  auto finish = [&](int64_t b, int rows, const std::vector<int>& order, bool ok) {
    auto& s = members[b];
    for (int i = 0; i < k; ++i) {
      values[b * k + i] = static_cast<T>(s.theta[order[i]]);
      T* out = vectors + (b * k + i) * n;
      s.ritz_vector(rows, order[i], out);
      detail::fix_sign(out, n);
    }
    converged[b] = ok;
    s.done = true;
    s.basis.reset();  // release the member's memory early
  };

  int64_t active = batch;
  while (active > 0) {
    for (int64_t b = 0; b < batch; ++b) {
      auto& s = members[b];
      if (s.done)
        std::fill(X.begin() + b * n, X.begin() + (b + 1) * n, T(0));
      else
        std::copy(s.v(s.j), s.v(s.j) + n, X.begin() + b * n);
    }
    matvec(static_cast<const T*>(X.data()), Y.data());
    detail::guarded_parallel_for(batch, n, [&](int64_t b) {
      auto& s = members[b];
      if (s.done) return;
      ++matvecs[b];
      const int j = s.j;
      T* w = s.v(j + 1);
      std::copy(Y.begin() + b * n, Y.begin() + (b + 1) * n, w);
      std::vector<double> coef(j + 1, 0.0);
      s.orthogonalize(w, j + 1, coef.data());
      for (int i = 0; i <= j; ++i) s.H[i + static_cast<size_t>(j) * m] = s.H[j + static_cast<size_t>(i) * m] = coef[i];
      double beta = detail::norm(w, n);
      PHYSAI_REQUIRE(std::isfinite(beta), "lanczos: the operator returned non-finite values for member ",
                     first_member + b);
      const int rows = j + 1;
      detail::small_eigh(s.H, m, rows, s.theta, s.S);
      const auto order = detail::wanted_order(s.theta, rows, opt.which);
      double scale = 0.0;
      for (double t : s.theta) scale = std::max(scale, std::abs(t));
      // Invariant subspace: the Krylov space of v0 is exhausted (relative to the operator's scale).
      const bool invariant = beta <= 1e-12 * std::max(scale, 1e-300) || rows == n;
      if (invariant) beta = 0.0;
      if (invariant && rows < n) s.exhausted = true;
      bool ok = rows >= k && (!s.exhausted || rows == m);
      // Relative to the larger of the pair's and the most wanted pair's magnitude: a residual relative to an
      // eigenvalue near zero alone would be out of reach of the arithmetic, however long the run.
      const double top = std::abs(s.theta[order[0]]);
      for (int i = 0; ok && i < k; ++i) {
        const double residual = beta * std::abs(s.S[j + static_cast<size_t>(order[i]) * rows]);
        ok = residual <= opt.tol * std::max(std::abs(s.theta[order[i]]), top) || residual == 0.0;
      }
      // rows >= k also on the last allowed matvec, since max_matvecs >= k.
      if (ok || matvecs[b] >= opt.max_matvecs) {
        finish(b, rows, order, ok);
        return;
      }
      if (invariant) {
        // Continue in a fresh random direction orthogonal to everything found so far (its coupling is zero).
        double nw = 0.0;
        while (!(nw > 1e-3)) {
          detail::random_vector(s.breakdown, w, n);
          s.orthogonalize(w, j + 1, nullptr);
          nw = detail::norm(w, n);
        }
        beta = nw;
      }
      for (int64_t t = 0; t < n; ++t) w[t] = static_cast<T>(w[t] / beta);
      s.j = j + 1;
      if (s.j < m) return;
      // Thick restart: keep the p most wanted Ritz vectors plus the residual direction basis[m].
      const int p = std::min(m - 1, std::max(k, k + (m - k) / 2));
      s.scratch.resize(static_cast<size_t>(p) * n);
      for (int i = 0; i < p; ++i) s.ritz_vector(m, order[i], s.scratch.data() + static_cast<size_t>(i) * n);
      std::copy(s.v(m), s.v(m) + n, s.v(p));
      std::copy(s.scratch.begin(), s.scratch.end(), s.v(0));
      std::fill(s.H.begin(), s.H.end(), 0.0);
      for (int i = 0; i < p; ++i) s.H[i + static_cast<size_t>(i) * m] = s.theta[order[i]];
      s.j = p;
      s.exhausted = false;
    });
    active = 0;
    for (const auto& s : members) active += !s.done;
  }
}

}  // namespace physai::spectrum
