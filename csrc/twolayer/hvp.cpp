// The Hessian of each member's loss as an operator (kernels.hpp), by Pearlmutter's R-operator: the forward-mode
// derivative of the backward pass along a direction v, R{.} = d/dt (.)(theta + t v) at t = 0. Construction caches
// what every product reuses (S, sigma', the outputs and their gradients, dS sigma'); a product then costs about one
// gradient: two input-size GEMMs around one pass over the rows (r_rows). Also the eigensolver entry point on it.
// numpy twin: physai/twolayer/reference.py (hvp).
#include <algorithm>
#include <array>
#include <cmath>
#include <exception>
#include <vector>

#include "common/errors.hpp"
#include "common/gemm.hpp"
#include "common/scratch.hpp"
#include "common/simd.hpp"
#include "twolayer/kernels.hpp"
#include "twolayer/passes.hpp"
#include "twolayer/rows.hpp"
#include "twolayer/schedule.hpp"

namespace physai::twolayer {

using gemm::gemm;
using gemm::Trans;
using namespace detail;

namespace {

// ---------------------------------------------------------------------------------------------------------------
// The R-operator pass over a tile's rows
// ---------------------------------------------------------------------------------------------------------------

using simd::load;
using simd::store;

// What the pass reads (row-major tiles; vb null without bias) and writes.
template <class T>
struct RRows {
  Loss loss;
  bool tanh;  // the single-output pass recomputes sigma' and sigma'' from S rather than reading their caches
  int64_t m, k;
  T os, scale;
  const T *vb, *a, *va;            // direction's bias part, output weights, direction's output part
  const T *S, *D1, *dS_D2, *F, *Y, *G;  // cached forward and backward of the tile (dS_D2 = dS sigma'')
  T *RZ, *RS, *RF, *RG, *RdZ;      // RZ holds input_scale X vW^T on entry
};

// r_rows for one output (regression, binary logistic): R{S} and both output dot products in one pass over the row,
// the backward in a second, where k dot products and a combination over k would take four passes and two folds.
// At small widths the per-row work, not the arithmetic, is what an HVP's row pass costs. Tanh: sigma' = 1 - S^2 and
// sigma'' = -2 S sigma' from S alone, rather than from the caches of sigma' and dS sigma'': an ensemble's caches do
// not fit in cache, and the recomputation costs fewer operations than the loads.
template <bool Tanh, class T>
PHYSAI_INLINE void r_rows_single_output(const RRows<T>& p, int64_t r0, int64_t rows) {
  const int64_t m = p.m;
  const T os = p.os, *vb = p.vb, *a = p.a, *va = p.va;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    T *RZ = p.RZ + r * m, *RS = p.RS + r * m, *RdZ = p.RdZ + r * m;
    const T* S = p.S + r * m;
    const T *D1 = Tanh ? nullptr : p.D1 + r * m, *dS_D2 = Tanh ? nullptr : p.dS_D2 + r * m;  // tanh: no caches
    // Plain loops over the row (vectorised at the clone's full width), the terms of R{F} parked in RdZ's row until
    // the backward overwrites it, and summed in a fixed order there.
#pragma omp simd
    for (int64_t q = 0; q < m; ++q) {
      if (vb) RZ[q] += vb[q];
      const T t = S[q], slope = Tanh ? T(1) - t * t : D1[q];
      RS[q] = slope * RZ[q];
      RdZ[q] = RS[q] * a[q] + t * va[q];
    }
    p.RF[r] = os * simd::sum(m, RdZ);
    loss_row_hessian(p.loss, p.F + r, p.Y + r, 1, p.scale, p.RF + r, p.RG + r);
    const T RG = p.RG[r], G = p.G[r];
#pragma omp simd
    for (int64_t q = 0; q < m; ++q) {
      const T RdS = RG * a[q] + G * va[q];
      if constexpr (Tanh) {
        // os sigma' (R{dS} + (sigma''/sigma') dS R{Z}/os), sigma''/sigma' = -2 S: fewer products than the two terms
        const T t = S[q];
        RdZ[q] = (os * (T(1) - t * t)) * (RdS - T(2) * ((t * (G * a[q])) * RZ[q]));
      } else {
        RdZ[q] = os * RdS * D1[q] + dS_D2[q] * RZ[q];
      }
    }
  }
}

// One pass over the rows of an HVP: R{Z} += vb; R{S} = sigma' R{Z}; R{F} = os (a R{S} + va S) (k dot products);
// R{G} = H_f R{F}; R{dZ} = os (R{G} a + G va) sigma' + dS sigma'' R{Z}.
template <class T>
PHYSAI_INLINE void r_rows_impl(const RRows<T>& p, int64_t r0, int64_t rows) {
  if (p.k == 1)
    return p.tanh ? r_rows_single_output<true>(p, r0, rows) : r_rows_single_output<false>(p, r0, rows);
  // Fields copied to locals: stores through the row pointers could otherwise alias them, forcing reloads.
  const int64_t m = p.m, k = p.k;
  const T os = p.os, *vb = p.vb, *a = p.a, *va = p.va;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    T *RZ = p.RZ + r * m, *RS = p.RS + r * m, *RdZ = p.RdZ + r * m, *RF = p.RF + r * k, *RG = p.RG + r * k;
    const T *S = p.S + r * m, *D1 = p.D1 + r * m, *dS_D2 = p.dS_D2 + r * m, *G = p.G + r * k;
#pragma omp simd
    for (int64_t q = 0; q < m; ++q) {
      if (vb) RZ[q] += vb[q];
      RS[q] = D1[q] * RZ[q];
    }
    for (int64_t j = 0; j < k; ++j) RF[j] = os * (simd::dot(m, RS, a + j * m) + simd::dot(m, S, va + j * m));
    loss_row_hessian(p.loss, p.F + r * k, p.Y + r * k, k, p.scale, RF, RG);
    simd::for_summed_columns<T>(
        k, m,
        [&](int64_t j, int64_t q, auto lanes) {
          using U = decltype(lanes);
          return RG[j] * load<U>(a + j * m + q) + G[j] * load<U>(va + j * m + q);
        },
        [&](int64_t q, auto RdS) {
          using U = decltype(RdS);
          store(RdZ + q, os * RdS * load<U>(D1 + q) + load<U>(dS_D2 + q) * load<U>(RZ + q));
        });
  }
}
PHYSAI_VECTOR_CLONES void r_rows(const RRows<float>& p, int64_t r0, int64_t rows) { r_rows_impl(p, r0, rows); }
PHYSAI_VECTOR_CLONES void r_rows(const RRows<double>& p, int64_t r0, int64_t rows) { r_rows_impl(p, r0, rows); }

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// HessianOperator
// ---------------------------------------------------------------------------------------------------------------

template <class T>
HessianOperator<T>::HessianOperator(const Net<T>& net, const Targets<T>& targets, bool compute_caches)
    : net_(net), targets_(targets) {
  validate(net);
  const int64_t E = net.E, n = net.n, m = net.m, k = net.k;
  for (auto* cache : {&S_, &dZ_}) cache->reset(new T[E * n * m]);
  if (slope_caches())
    for (auto* cache : {&D1_, &dS_D2_}) cache->reset(new T[E * n * m]);
  F_.reset(new T[E * n * k]);
  G_.reset(new T[E * n * k]);
  loss_.resize(E);
  if (compute_caches) refresh();
}

template <class T>
void HessianOperator<T>::refresh() {
  over_members(net_.E, work_of(net_), [&](int64_t e, bool parallel) { refresh_member(e, parallel); });
}

template <class T>
void HessianOperator<T>::refresh_member(int64_t e, bool parallel) {
  const int64_t n = net_.n, m = net_.m, k = net_.k;
  T *S = S_.get() + e * n * m, *F = F_.get() + e * n * k, *G = G_.get() + e * n * k, *dZ = dZ_.get() + e * n * m;
  T *D1 = D1_ ? D1_.get() + e * n * m : nullptr, *dS_D2 = dS_D2_ ? dS_D2_.get() + e * n * m : nullptr;
  hidden(net_, e, net_.X_of(e), n, S, D1, dS_D2, parallel);
  const auto row_loss = Scratch<T>(n);
  loss_[e] = loss_tile(net_, e, targets_.loss, static_cast<const T*>(S), targets_.Y_of(e, n, k), n,
                       loss_scale<T>(targets_.loss, n, k), F, G, row_loss.get(), parallel);
  over_row_tasks(n, parallel, [&](int64_t r0, int64_t count) {
    if (D1)
      backprop_rows(count, m, k, net_.output_scale, G + r0 * k, net_.a_of(e), D1 + r0 * m, dZ + r0 * m,
                    dS_D2 + r0 * m);
    else
      backprop_saved_rows(net_.activation, count, m, k, net_.output_scale, G + r0 * k, net_.a_of(e), m, S + r0 * m,
                          static_cast<const T*>(nullptr), m, dZ + r0 * m, m);
  });
}

template <class T>
void HessianOperator<T>::apply_rows(int64_t e, int64_t row_begin, int64_t row_end, const T* v, T* out,
                                    bool parallel) const {
  const Net<T>& net = net_;
  const int64_t n = net.n, m = net.m, k = net.k, d = net.d, tile = tile_rows<T>(row_end - row_begin, m);
  // Plain pointers, not structured bindings: C++17 lambdas below cannot capture those.
  const std::array<const T*, 3> v_parts = param_parts(net, v);
  const std::array<T*, 3> out_parts = param_parts(net, out);
  const T *vW = v_parts[0], *vb = v_parts[1], *va = v_parts[2];
  T *oW = out_parts[0], *ob = out_parts[1], *oa = out_parts[2];
  const T* S = S_.get() + e * n * m;
  const T *D1 = D1_ ? D1_.get() + e * n * m : nullptr, *dS_D2 = dS_D2_ ? dS_D2_.get() + e * n * m : nullptr;
  const T *F = F_.get() + e * n * k, *G = G_.get() + e * n * k;
  const T* Y = targets_.Y_of(e, n, k);
  const T* X = net.X_of(e);
  const T* a = net.a_of(e);
  const T scale = loss_scale<T>(targets_.loss, n, k), os = net.output_scale;
  const auto RZ = Scratch<T>(tile * m), RS = Scratch<T>(tile * m), RdZ = Scratch<T>(tile * m);
  const auto RF = Scratch<T>(tile * k), RG = Scratch<T>(tile * k);
  for (int64_t r0 = row_begin; r0 < row_end; r0 += tile) {
    const int64_t rows = std::min(tile, row_end - r0);
    const T beta = r0 == row_begin ? T(0) : T(1);
    const T *X_t = X + r0 * d, *S_t = S + r0 * m, *G_t = G + r0 * k;
    // R{Z} = input_scale X vW^T (+ vb in the row pass)
    gemm(parallel, Trans::No, Trans::Yes, rows, m, d, net.input_scale, X_t, d, vW, d, T(0), RZ.get(), m);
    const RRows<T> pass{targets_.loss, net.activation == Activation::Tanh, m, k, os, scale, vb, a,
                        va,           S_t,      D1 ? D1 + r0 * m : nullptr, dS_D2 ? dS_D2 + r0 * m : nullptr,
                        F + r0 * k,   Y + r0 * k, G_t,
                        RZ.get(),     RS.get(), RF.get(), RG.get(), RdZ.get()};
    over_row_tasks(rows, parallel, [&](int64_t q0, int64_t count) { r_rows(pass, q0, count); });
    // R{da} = os (R{G}^T S + G^T R{S})
    gemm(parallel, Trans::Yes, Trans::No, k, m, rows, os, RG.get(), k, S_t, m, beta, oa, m);
    gemm(parallel, Trans::Yes, Trans::No, k, m, rows, os, G_t, k, RS.get(), m, T(1), oa, m);
    // R{dW} = input_scale R{dZ}^T X ; R{db} = column sums of R{dZ}
    gemm(parallel, Trans::Yes, Trans::No, m, d, rows, net.input_scale, RdZ.get(), m, X_t, d, beta, oW, d);
    if (ob) {
      if (r0 == row_begin) std::fill(ob, ob + m, T(0));
      add_column_sums(RdZ.get(), rows, m, ob);
    }
  }
  if (row_end == row_begin) std::fill(out, out + net.params(), T(0));
}

template <class T>
void HessianOperator<T>::apply(const T* V, T* out) const {
  const int64_t P = net_.params();
  const int64_t n = net_.n;
  // Members whose row of V is zero (an eigensolver feeds those once a member has converged) get a zero product at
  // no cost, even where their caches are not finite; the others share the threads.
  std::vector<int64_t> busy;
  for (int64_t e = 0; e < net_.E; ++e) {
    if (std::all_of(V + e * P, V + (e + 1) * P, [](T x) { return x == T(0); }))
      std::fill(out + e * P, out + (e + 1) * P, T(0));
    else
      busy.push_back(e);
  }
  if (busy.empty()) return;
  if (use_row_blocks(net_.E, net_)) {
    sum_over_row_blocks(n, P, out, [&](int64_t r0, int64_t rows, T* partial) {
      apply_rows(0, r0, r0 + rows, V, partial, false);
    });
    return;
  }
  over_members(int64_t(busy.size()), work_of(net_), [&](int64_t i, bool parallel) {
    const int64_t e = busy[i];
    apply_rows(e, 0, n, V + e * P, out + e * P, parallel);
  });
}

template <class T>
void HessianOperator<T>::member_gradient(int64_t e, bool parallel, T* dW, T* db, T* da) const {
  const Net<T>& net = net_;
  const int64_t n = net.n, m = net.m, k = net.k, d = net.d;
  const T *S = S_.get() + e * n * m, *dZ = dZ_.get() + e * n * m, *G = G_.get() + e * n * k;
  gemm(parallel, Trans::Yes, Trans::No, k, m, n, net.output_scale, G, k, S, m, T(0), da, m);
  gemm(parallel, Trans::Yes, Trans::No, m, d, n, net.input_scale, dZ, m, net.X_of(e), d, T(0), dW, d);
  if (db) {
    std::fill(db, db + m, T(0));
    add_column_sums(dZ, n, m, db);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Eigenpairs
// ---------------------------------------------------------------------------------------------------------------

template <class T>
void hessian_eigs(const Net<T>& net, const Targets<T>& targets, const spectrum::Options& options, bool use_lanczos,
                  const T* v0, T* values, T* vectors, int64_t* matvecs, uint8_t* converged) {
  const HessianOperator<T> op(net, targets);
  for (int64_t e = 0; e < net.E; ++e)
    PHYSAI_REQUIRE(std::isfinite(double(op.loss(e))), "the loss of member ", e,
                   " is not finite (non-finite data or parameters), so its Hessian is undefined");
  const int64_t E = net.E, P = net.params(), k = options.k;
  if (E == 1) {  // the lone member keeps the whole operator (row blocks, split GEMMs) in every product
    eigensolve(use_lanczos, [&op](const T* V, T* out) { op.apply(V, out); }, 1, P, options, v0, values, vectors,
               matvecs, converged);
    return;
  }
  // Each member's solve is one task on one thread (the solvers treat members independently, so the values are
  // those of the batched solve): no barrier per product. The first exception, in member order, is rethrown.
  std::vector<std::exception_ptr> errors(E);
  parallel_tasks(E, [&](int64_t e) {
    try {
      const auto matvec = [&op, e, n = net.n](const T* V, T* out) { op.apply_rows(e, 0, n, V, out, false); };
      eigensolve(use_lanczos, matvec, 1, P, options, v0 ? v0 + e * P : nullptr, values + e * k, vectors + e * k * P,
                 matvecs + e, converged + e, e);
    } catch (...) {
      errors[e] = std::current_exception();
    }
  });
  for (auto& error : errors)
    if (error) std::rethrow_exception(error);
}

#define PHYSAI_TWOLAYER_HVP(T)                                                                                    \
  template class HessianOperator<T>;                                                                              \
  template void hessian_eigs<T>(const Net<T>&, const Targets<T>&, const spectrum::Options&, bool, const T*, T*, T*, \
                                int64_t*, uint8_t*);
PHYSAI_TWOLAYER_HVP(float)
PHYSAI_TWOLAYER_HVP(double)

}  // namespace physai::twolayer
