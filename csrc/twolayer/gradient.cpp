// Forward, backward and loss + gradient of the two-layer network (kernels.hpp), tile by tile: for each tile of rows
// the pre-activation GEMM, the activation, the output layer and loss, and the backward GEMMs run back to back, and
// the weight gradients accumulate over the tiles in a fixed order. numpy twin: physai/twolayer/reference.py.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/errors.hpp"
#include "common/gemm.hpp"
#include "common/scratch.hpp"
#include "twolayer/kernels.hpp"
#include "twolayer/passes.hpp"
#include "twolayer/rows.hpp"
#include "twolayer/schedule.hpp"

namespace physai::twolayer {

using gemm::gemm;
using gemm::Trans;

namespace detail {

// ---------------------------------------------------------------------------------------------------------------
// Tile passes
// ---------------------------------------------------------------------------------------------------------------

template <class T>
void hidden(const Net<T>& net, int64_t e, const T* X_t, int64_t rows, T* S, T* D1, T* D2, bool parallel) {
  const int64_t m = net.m, d = net.d;
  gemm(parallel, Trans::No, Trans::Yes, rows, m, d, net.input_scale, X_t, d, net.W_of(e), d, T(0), S, m);
  const std::vector<T> zeros(net.b ? 0 : m, T(0));
  const T* b = net.b ? net.b_of(e) : zeros.data();
  over_row_tasks(rows, parallel, [&](int64_t r0, int64_t count) {
    activate_rows(net.activation, count, m, S + r0 * m, b, D1 + r0 * m, D2 ? D2 + r0 * m : nullptr);
  });
}

template <class T>
T loss_tile(const Net<T>& net, int64_t e, Loss loss, const T* S_t, const T* Y_t, int64_t rows, T scale, T* F_t,
            T* G_t, T* row_loss, bool parallel) {
  const int64_t m = net.m, k = net.k;
  over_row_tasks(rows, parallel, [&](int64_t r0, int64_t count) {
    output_rows(loss, count, m, k, net.output_scale, S_t + r0 * m, net.a_of(e), Y_t + r0 * k, scale, F_t + r0 * k,
                G_t + r0 * k, row_loss + r0);
  });
  T total = T(0);
  for (int64_t r = 0; r < rows; ++r) total += row_loss[r];
  return total;
}

namespace {

// Backward of one tile given its output gradients G_t [rows, k]: accumulates da, dW, db (beta = 0 on the first tile)
// and writes dX_t. S holds sigma(Z) and D1 sigma'(Z) of the tile; D1 is overwritten with dZ.
template <class T>
void backward_tile(const Net<T>& net, int64_t e, const T* X_t, int64_t rows, const T* S, T* D1, const T* G_t,
                   bool first, T* dW, T* db, T* da, T* dX_t, bool parallel) {
  const int64_t m = net.m, d = net.d, k = net.k;
  const T beta = first ? T(0) : T(1);
  gemm(parallel, Trans::Yes, Trans::No, k, m, rows, net.output_scale, G_t, k, S, m, beta, da, m);
  over_row_tasks(rows, parallel, [&](int64_t r0, int64_t count) {
    backprop_rows(count, m, k, net.output_scale, G_t + r0 * k, net.a_of(e), D1 + r0 * m, D1 + r0 * m,
                  static_cast<T*>(nullptr));
  });
  gemm(parallel, Trans::Yes, Trans::No, m, d, rows, net.input_scale, D1, m, X_t, d, beta, dW, d);
  if (db) {
    if (first) std::fill(db, db + m, T(0));
    add_column_sums(D1, rows, m, db);
  }
  if (dX_t) gemm(parallel, Trans::No, Trans::No, rows, d, m, net.input_scale, D1, m, net.W_of(e), d, T(0), dX_t, d);
}

// Forward and backward of one member over rows [0, n) of net (a view, possibly of a mini-batch), tile by tile.
// output_grad(r0, rows, S_t, G_scratch) returns the tile's output gradients [rows, k] (computing them from a loss
// into G_scratch, or pointing into given ones) and adds to the loss it tracks; dX may be null.
template <class T, class OutputGrad>
void member_backward(const Net<T>& net, int64_t e, T* dW, T* db, T* da, T* dX, bool parallel,
                     OutputGrad&& output_grad) {
  const int64_t m = net.m, k = net.k, d = net.d, n = net.n, tile = tile_rows<T>(n, m);
  const auto S = Scratch<T>(tile * m), D1 = Scratch<T>(tile * m), G = Scratch<T>(tile * k);
  const T* X = net.X_of(e);
  for (int64_t r0 = 0; r0 < n; r0 += tile) {
    const int64_t rows = std::min(tile, n - r0);
    hidden(net, e, X + r0 * d, rows, S.get(), D1.get(), static_cast<T*>(nullptr), parallel);
    const T* G_t = output_grad(r0, rows, static_cast<const T*>(S.get()), G.get());
    backward_tile(net, e, X + r0 * d, rows, S.get(), D1.get(), G_t, r0 == 0, dW, db, da,
                  dX ? dX + r0 * d : static_cast<T*>(nullptr), parallel);
  }
  if (n == 0) {  // no tile ran: the gradients of an empty sum
    std::fill(dW, dW + m * d, T(0));
    if (db) std::fill(db, db + m, T(0));
    std::fill(da, da + k * m, T(0));
  }
}

// Outputs [n, k] of one member (or a view of some of its rows).
template <class T>
void member_forward(const Net<T>& net, int64_t e, T* F, bool parallel) {
  const int64_t m = net.m, k = net.k, d = net.d, n = net.n, tile = tile_rows<T>(n, m);
  const auto S = Scratch<T>(tile * m), D1 = Scratch<T>(tile * m);
  for (int64_t r0 = 0; r0 < n; r0 += tile) {
    const int64_t rows = std::min(tile, n - r0);
    hidden(net, e, net.X_of(e) + r0 * d, rows, S.get(), D1.get(), static_cast<T*>(nullptr), parallel);
    gemm(parallel, Trans::No, Trans::Yes, rows, k, m, net.output_scale, S.get(), m, net.a_of(e), m, T(0),
         F + r0 * k, k);
  }
}

}  // namespace

template <class T>
T member_loss_and_grad(const Net<T>& net, const T* Y, Loss loss, int64_t e, T* dW, T* db, T* da, bool parallel,
                       int64_t mean_rows) {
  const int64_t m = net.m, k = net.k, tile = tile_rows<T>(net.n, m);
  const auto F = Scratch<T>(tile * k), row_loss = Scratch<T>(tile);
  const T scale = loss_scale<T>(loss, mean_rows, k);
  T total = T(0);
  member_backward(net, e, dW, db, da, static_cast<T*>(nullptr), parallel,
                  [&](int64_t r0, int64_t rows, const T* S_t, T* G_t) {
                    total += loss_tile(net, e, loss, S_t, Y + r0 * k, rows, scale, F.get(), G_t, row_loss.get(),
                                       parallel);
                    return static_cast<const T*>(G_t);
                  });
  return total;
}

template <class T>
T blocked_loss_and_grad(const Net<T>& net, const T* Y, Loss loss, T* dW, T* db, T* da) {
  const int64_t n = net.n;
  const auto grad = Scratch<T>(net.params()), block_loss = Scratch<T>(row_blocks(n));
  sum_over_row_blocks(n, net.params(), grad.get(), [&](int64_t r0, int64_t rows, T* g) {
    const auto [gW, gb, ga] = param_parts(net, g);
    block_loss[r0 / kBlockRows] =
        member_loss_and_grad(row_view(net, 0, r0, rows), Y + r0 * net.k, loss, 0, gW, gb, ga, false, n);
  });
  T total = T(0);
  for (int64_t block = 0; block < row_blocks(n); ++block) total += block_loss[block];
  split_params(net, grad.get(), dW, db, da);
  return total;
}

#define PHYSAI_TWOLAYER_PASSES(T)                                                                              \
  template void hidden<T>(const Net<T>&, int64_t, const T*, int64_t, T*, T*, T*, bool);                        \
  template T loss_tile<T>(const Net<T>&, int64_t, Loss, const T*, const T*, int64_t, T, T*, T*, T*, bool);     \
  template T member_loss_and_grad<T>(const Net<T>&, const T*, Loss, int64_t, T*, T*, T*, bool, int64_t);       \
  template T blocked_loss_and_grad<T>(const Net<T>&, const T*, Loss, T*, T*, T*);
PHYSAI_TWOLAYER_PASSES(float)
PHYSAI_TWOLAYER_PASSES(double)

}  // namespace detail

// ---------------------------------------------------------------------------------------------------------------
// Public entry points
// ---------------------------------------------------------------------------------------------------------------

using namespace detail;

template <class T>
void validate(const Net<T>& net) {
  PHYSAI_REQUIRE(net.E >= 1, "ensemble: expected >= 1 member, got ", net.E);
  PHYSAI_REQUIRE(net.n >= 0, "X: expected >= 0 rows, got ", net.n);
  PHYSAI_REQUIRE(net.d >= 1, "d: expected >= 1, got ", net.d);
  PHYSAI_REQUIRE(net.m >= 1, "m: expected width >= 1, got ", net.m);
  PHYSAI_REQUIRE(net.k >= 1, "k: expected >= 1 outputs, got ", net.k);
  PHYSAI_REQUIRE(std::isfinite(double(net.input_scale)) && std::isfinite(double(net.output_scale)),
                 "scales: expected finite input_scale and output_scale");
  PHYSAI_REQUIRE(int32_t(net.activation) >= 0 && int32_t(net.activation) <= int32_t(Activation::Softplus),
                 "activation: unknown code ", int32_t(net.activation));
}

template <class T>
void forward(const Net<T>& net, T* F) {
  validate(net);
  const int64_t n = net.n, k = net.k;
  if (use_row_blocks(net.E, net)) {  // rows are independent: the blocks need no reduction
    parallel_for(row_blocks(n), [&](int64_t block) {
      const int64_t r0 = block * kBlockRows;
      member_forward(row_view(net, 0, r0, std::min(kBlockRows, n - r0)), 0, F + r0 * k, false);
    });
    return;
  }
  over_members(net.E, work_of(net), [&](int64_t e, bool parallel) { member_forward(net, e, F + e * n * k, parallel); });
}

template <class T>
void backward(const Net<T>& net, const T* G, T* dW, T* db, T* da, T* dX) {
  validate(net);
  if (use_row_blocks(net.E, net)) {
    const auto grad = Scratch<T>(net.params());
    sum_over_row_blocks(net.n, net.params(), grad.get(), [&](int64_t r0, int64_t rows, T* g) {
      const auto [gW, gb, ga] = param_parts(net, g);
      member_backward(row_view(net, 0, r0, rows), 0, gW, gb, ga, dX ? dX + r0 * net.d : static_cast<T*>(nullptr),
                      false, [&](int64_t t0, int64_t, const T*, T*) { return G + (r0 + t0) * net.k; });
    });
    split_params(net, grad.get(), dW, db, da);
    return;
  }
  over_members(net.E, work_of(net), [&](int64_t e, bool parallel) {
    const int64_t m = net.m, k = net.k, d = net.d, n = net.n;
    member_backward(net, e, dW + e * m * d, net.b ? db + e * m : nullptr, da + e * k * m,
                    dX ? dX + e * n * d : static_cast<T*>(nullptr), parallel,
                    [&](int64_t r0, int64_t, const T*, T*) { return G + (e * n + r0) * k; });
  });
}

template <class T>
void loss_and_grad(const Net<T>& net, const Targets<T>& targets, T* loss, T* dW, T* db, T* da) {
  validate(net);
  if (use_row_blocks(net.E, net)) {
    loss[0] = blocked_loss_and_grad(net, targets.Y_of(0, net.n, net.k), targets.loss, dW, db, da);
    return;
  }
  over_members(net.E, work_of(net), [&](int64_t e, bool parallel) {
    const int64_t m = net.m, k = net.k, d = net.d;
    loss[e] = member_loss_and_grad(net, targets.Y_of(e, net.n, k), targets.loss, e, dW + e * m * d,
                                   net.b ? db + e * m : nullptr, da + e * k * m, parallel, net.n);
  });
}

#define PHYSAI_TWOLAYER_GRADIENT(T)                                                                     \
  template void validate<T>(const Net<T>&);                                                             \
  template void forward<T>(const Net<T>&, T*);                                                          \
  template void backward<T>(const Net<T>&, const T*, T*, T*, T*, T*);                                   \
  template void loss_and_grad<T>(const Net<T>&, const Targets<T>&, T*, T*, T*, T*);
PHYSAI_TWOLAYER_GRADIENT(float)
PHYSAI_TWOLAYER_GRADIENT(double)

}  // namespace physai::twolayer
