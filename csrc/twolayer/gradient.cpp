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
    activate_rows(net.activation, count, m, S + r0 * m, b, D1 ? D1 + r0 * m : nullptr, D2 ? D2 + r0 * m : nullptr);
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

// One member's gradients of an empty sum (no rows).
template <class T>
void zero_gradients(const Net<T>& net, T* dW, T* db, T* da) {
  std::fill(dW, dW + net.m * net.d, T(0));
  if (db) std::fill(db, db + net.m, T(0));
  std::fill(da, da + net.k * net.m, T(0));
}

// Whether a tile's backward takes the single pass of backprop_single_output_sums (one output, one thread).
template <class T>
bool single_output_pass(const Net<T>& net, bool parallel) {
  return net.k == 1 && !parallel;
}

// Backward of one tile given its output gradients G_t [rows, k]: accumulates da, dW, db (beta = 0 on the first tile)
// and writes dX_t. S holds sigma(Z) of the tile and D1 sigma'(Z), or D1 is null where the single pass takes sigma'
// from S; dZ (which may be D1, to write in place) receives dZ.
template <class T>
void backward_tile(const Net<T>& net, int64_t e, const T* X_t, int64_t rows, const T* S, const T* D1, T* dZ,
                   const T* G_t, bool first, T* dW, T* db, T* da, T* dX_t, bool parallel) {
  const int64_t m = net.m, d = net.d, k = net.k;
  const T beta = first ? T(0) : T(1);
  if (db && first) std::fill(db, db + m, T(0));
  if (single_output_pass(net, parallel)) {  // the three passes below in one, with the same bits
    backprop_single_output_sums(net.activation, rows, m, net.output_scale, G_t, net.a_of(e), S, D1, dZ, beta, da,
                                db);
  } else {
    gemm(parallel, Trans::Yes, Trans::No, k, m, rows, net.output_scale, G_t, k, S, m, beta, da, m);
    over_row_tasks(rows, parallel, [&](int64_t r0, int64_t count) {
      backprop_rows(count, m, k, net.output_scale, G_t + r0 * k, net.a_of(e), D1 + r0 * m, dZ + r0 * m,
                    static_cast<T*>(nullptr));
    });
    if (db) add_column_sums(dZ, rows, m, db);
  }
  gemm(parallel, Trans::Yes, Trans::No, m, d, rows, net.input_scale, dZ, m, X_t, d, beta, dW, d);
  if (dX_t) gemm(parallel, Trans::No, Trans::No, rows, d, m, net.input_scale, dZ, m, net.W_of(e), d, T(0), dX_t, d);
}

// Forward and backward of one member over rows [0, n) of net (a view, possibly of a mini-batch), tile by tile.
// output_grad(r0, rows, S_t, G_scratch) returns the tile's output gradients [rows, k] (computing them from a loss
// into G_scratch, or pointing into given ones) and adds to the loss it tracks; dX may be null.
template <class T, class OutputGrad>
void member_backward(const Net<T>& net, int64_t e, T* dW, T* db, T* da, T* dX, bool parallel,
                     OutputGrad&& output_grad) {
  const int64_t m = net.m, k = net.k, d = net.d, n = net.n, tile = tile_rows<T>(n, m);
  const auto S = Scratch<T>(tile * m), dZ = Scratch<T>(tile * m), G = Scratch<T>(tile * k);
  // sigma' in dZ's buffer, where the backward overwrites it; none where the single pass reads it off S
  T* D1 = single_output_pass(net, parallel) && slope_from_value(net.activation) ? nullptr : dZ.get();
  const T* X = net.X_of(e);
  for (int64_t r0 = 0; r0 < n; r0 += tile) {
    const int64_t rows = std::min(tile, n - r0);
    hidden(net, e, X + r0 * d, rows, S.get(), D1, static_cast<T*>(nullptr), parallel);
    const T* G_t = output_grad(r0, rows, static_cast<const T*>(S.get()), G.get());
    backward_tile(net, e, X + r0 * d, rows, S.get(), D1, dZ.get(), G_t, r0 == 0, dW, db, da,
                  dX ? dX + r0 * d : static_cast<T*>(nullptr), parallel);
  }
  if (n == 0) zero_gradients(net, dW, db, da);  // no tile ran
}

// Outputs up to which the output layer runs output_layer_rows (rows.hpp) rather than BLAS: that kernel streams a once
// per 4 rows, which only stays in cache for few outputs. loss_tile's outputs are summed the same way at any k.
constexpr int64_t kLoopOutputs = 32;

// Outputs [n, k] of one member (or a view of some of its rows).
template <class T>
void member_forward(const Net<T>& net, int64_t e, T* F, bool parallel) {
  const int64_t m = net.m, k = net.k, d = net.d, n = net.n, tile = tile_rows<T>(n, m);
  const auto S = Scratch<T>(tile * m);
  for (int64_t r0 = 0; r0 < n; r0 += tile) {
    const int64_t rows = std::min(tile, n - r0);
    hidden(net, e, net.X_of(e) + r0 * d, rows, S.get(), static_cast<T*>(nullptr), static_cast<T*>(nullptr), parallel);
    if (k <= kLoopOutputs)
      over_row_tasks(rows, parallel, [&](int64_t q0, int64_t count) {
        output_layer_rows(count, m, k, net.output_scale, S.get() + q0 * m, net.a_of(e), F + (r0 + q0) * k);
      });
    else
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

// ---------------------------------------------------------------------------------------------------------------
// The forward that saves the hidden layer, and the backward from it
// ---------------------------------------------------------------------------------------------------------------
// The forward cuts a member's rows into tiles, which are independent; the backward cuts its hidden units into column
// blocks, each of which runs over all the rows in order (its dW, db and da are sums over rows that one thread
// computes), or for a wide layer its rows into blocks whose gradients are summed in block order. All the cuts
// follow the shapes alone.

namespace {

// Rows per forward tile: S of a tile (written in place of Z) in L2, in tiles tall enough (128 rows at least) that
// one BLAS call per tile amortises the packing of W, and short enough (256 rows at most) that a batch of a
// thousand rows makes several tiles for the threads. A wide layer (m d >= gemm::kWideOperand) overflows L2 at any
// height; there tiles of 512 rows pack W half as often (3-5% off a drop-in step at n = 4096, d = m = 1024).
template <class T>
int64_t saving_tile_rows(int64_t n, int64_t d, int64_t m) {
  const int64_t fit = (int64_t(1) << 20) / (std::max<int64_t>(m, 1) * int64_t(sizeof(T)));
  const int64_t rows = m * d >= gemm::kWideOperand ? 512 : std::clamp<int64_t>(fit, 128, 256);
  return std::max<int64_t>(1, std::min(n, rows));
}

// Hidden units per backward column block: at most 8 blocks (each block's weight-gradient GEMM reads all of X once),
// each at least 64 wide (a narrower one makes that GEMM thin).
inline int64_t saved_block_cols(int64_t m) { return std::max<int64_t>(64, ((m + 7) / 8 + 15) / 16 * 16); }

// Rows per step of a column block: the step's dZ in L2 between the elementwise pass and the GEMM that reads it.
template <class T>
int64_t saved_step_rows(int64_t n, int64_t cols) {
  return std::max<int64_t>(1, std::min(n, std::max<int64_t>((int64_t(1) << 19) / (cols * int64_t(sizeof(T))), 256)));
}

template <class T>
void member_forward_saving(const Net<T>& net, int64_t e, T* F, T* S, T* D1, bool parallel) {
  const int64_t n = net.n, m = net.m, d = net.d, k = net.k, tile = saving_tile_rows<T>(n, d, m);
  const auto zeros = Scratch<T>(net.b ? 0 : m);
  if (!net.b) std::fill(zeros.get(), zeros.get() + m, T(0));
  const T* b = net.b ? net.b_of(e) : zeros.get();
  over_rows((n + tile - 1) / tile, parallel, [&](int64_t t) {
    const int64_t r0 = t * tile, rows = std::min(tile, n - r0);
    T* S_t = S + r0 * m;
    gemm::block_gemm(gemm::path_of<T>(Trans::No, Trans::Yes, n, m, d), Trans::No, Trans::Yes, rows, m, d,
                     net.input_scale, net.X_of(e) + r0 * d, d, net.W_of(e), d, T(0), S_t, m);
    activate_rows(net.activation, rows, m, S_t, b, D1 ? D1 + r0 * m : nullptr, static_cast<T*>(nullptr));
    if (k <= kLoopOutputs)
      output_layer_rows(rows, m, k, net.output_scale, S_t, net.a_of(e), F + r0 * k);
    else
      gemm::block_gemm(gemm::path_of<T>(Trans::No, Trans::Yes, n, k, m), Trans::No, Trans::Yes, rows, k, m,
                       net.output_scale, S_t, m, net.a_of(e), m, T(0), F + r0 * k, k);
  });
}

// The backward of a wide layer (m d >= gemm::kWideOperand, n >= 2 kWideSavedMinRows): blocks of rows
// (schedule.hpp), each with its own dW, db, da (summed in block order after) and its rows of dX, each run in steps
// of at most kWideSavedRows rows. A column block's weight-gradient GEMM would pack the step's rows of X once for
// every block of hidden units, 8 times over at m = 1024; a row block packs its own rows once.
template <class T>
void wide_backward_saved(const Net<T>& net, int64_t e, const T* G, const T* S, const T* D1, T* dW, T* db, T* da,
                         T* dX, bool parallel) {
  const int64_t n = net.n, m = net.m, d = net.d, k = net.k, P = net.params();
  const int64_t blocks = std::min(kWideSavedBlocks, n / kWideSavedMinRows), block_rows = (n + blocks - 1) / blocks;
  const T *X = net.X_of(e), *a = net.a_of(e);
  const auto partial = Scratch<T>(blocks * P);
  over_rows(blocks, parallel, [&](int64_t block) {
    const auto [gW, gb, ga] = param_parts(net, partial.get() + block * P);
    const int64_t begin = block * block_rows, end = std::min(n, begin + block_rows);
    const auto dZ = Scratch<T>(std::min(kWideSavedRows, block_rows) * m);
    if (gb) std::fill(gb, gb + m, T(0));
    for (int64_t r0 = begin; r0 < end; r0 += kWideSavedRows) {
      const int64_t rows = std::min(kWideSavedRows, end - r0);
      const T beta = r0 == begin ? T(0) : T(1);
      backprop_saved_rows(net.activation, rows, m, k, net.output_scale, G + r0 * k, a, m, S + r0 * m,
                          D1 ? D1 + r0 * m : nullptr, m, dZ.get(), m);
      gemm::block_gemm(gemm::path_of<T>(Trans::Yes, Trans::No, k, m, rows), Trans::Yes, Trans::No, k, m, rows,
                       net.output_scale, G + r0 * k, k, S + r0 * m, m, beta, ga, m);
      gemm::block_gemm(gemm::path_of<T>(Trans::Yes, Trans::No, m, d, rows), Trans::Yes, Trans::No, m, d, rows,
                       net.input_scale, dZ.get(), m, X + r0 * d, d, beta, gW, d);
      if (gb) add_column_sums(dZ.get(), rows, m, gb, m);
      if (dX)
        gemm::block_gemm(gemm::path_of<T>(Trans::No, Trans::No, n, d, m), Trans::No, Trans::No, rows, d, m,
                         net.input_scale, dZ.get(), m, net.W_of(e), d, T(0), dX + r0 * d, d);
    }
  });
  add_blocks_into_first(blocks, P, partial.get());
  split_params(net, partial.get(), dW, db, da);
}

// G, S, D1 and the outputs are member e's. With dX, every block writes its dZ into one [n, m] buffer, which a last
// GEMM (over row tiles) turns into dX; without, a block's dZ lives for one step.
template <class T>
void member_backward_saved(const Net<T>& net, int64_t e, const T* G, const T* S, const T* D1, T* dW, T* db, T* da,
                           T* dX, bool parallel) {
  const int64_t n = net.n, m = net.m, d = net.d, k = net.k;
  if (m * d >= gemm::kWideOperand && n >= 2 * kWideSavedMinRows)
    return wide_backward_saved(net, e, G, S, D1, dW, db, da, dX, parallel);
  const int64_t cols = saved_block_cols(m), step = saved_step_rows<T>(n, cols);
  const T *X = net.X_of(e), *a = net.a_of(e);
  const auto dZ_all = Scratch<T>(dX ? n * m : 0);
  over_rows((m + cols - 1) / cols, parallel, [&](int64_t block) {
    const int64_t q0 = block * cols, c = std::min(cols, m - q0), ldz = dX ? m : c;
    const auto dZ_step = Scratch<T>(dX ? 0 : step * c);
    for (int64_t r0 = 0; r0 < n; r0 += step) {
      const int64_t rows = std::min(step, n - r0);
      const T beta = r0 == 0 ? T(0) : T(1);
      T* dZ = dX ? dZ_all.get() + r0 * m + q0 : dZ_step.get();
      backprop_saved_rows(net.activation, rows, c, k, net.output_scale, G + r0 * k, a + q0, m, S + r0 * m + q0,
                          D1 ? D1 + r0 * m + q0 : nullptr, m, dZ, ldz);
      // every block of hidden units on the path of a full one (cols wide), so the last, narrower one sums alike
      gemm::block_gemm(gemm::path_of<T>(Trans::Yes, Trans::No, k, cols, rows), Trans::Yes, Trans::No, k, c, rows,
                       net.output_scale, G + r0 * k, k, S + r0 * m + q0, m, beta, da + q0, m);
      gemm::block_gemm(gemm::path_of<T>(Trans::Yes, Trans::No, m, d, rows), Trans::Yes, Trans::No, c, d, rows,
                       net.input_scale, dZ, ldz, X + r0 * d, d, beta, dW + q0 * d, d);
      if (db) {
        if (r0 == 0) std::fill(db + q0, db + q0 + c, T(0));
        add_column_sums(dZ, rows, c, db + q0, ldz);
      }
    }
  });
  if (dX) {
    const int64_t tile = saving_tile_rows<T>(n, d, m);
    over_rows((n + tile - 1) / tile, parallel, [&](int64_t t) {
      const int64_t r0 = t * tile, rows = std::min(tile, n - r0);
      gemm::block_gemm(gemm::path_of<T>(Trans::No, Trans::No, n, d, m), Trans::No, Trans::No, rows, d, m,
                       net.input_scale, dZ_all.get() + r0 * m, m, net.W_of(e), d, T(0), dX + r0 * d, d);
    });
  }
  if (n == 0) zero_gradients(net, dW, db, da);  // no step ran
}

}  // namespace

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

bool slope_from_value(Activation act) {
  return act == Activation::Relu || act == Activation::Tanh || act == Activation::Linear;
}

template <class T>
void forward_saving(const Net<T>& net, T* F, T* S, T* D1) {
  validate(net);
  PHYSAI_REQUIRE(D1 || slope_from_value(net.activation), "D1: required for activation code ",
                 int32_t(net.activation));
  const int64_t n = net.n, m = net.m, k = net.k;
  over_members(net.E, work_of(net), [&](int64_t e, bool parallel) {
    member_forward_saving(net, e, F + e * n * k, S + e * n * m, D1 ? D1 + e * n * m : nullptr, parallel);
  });
}

template <class T>
void backward_saved(const Net<T>& net, const T* G, const T* S, const T* D1, T* dW, T* db, T* da, T* dX) {
  validate(net);
  PHYSAI_REQUIRE(D1 || slope_from_value(net.activation), "D1: required for activation code ",
                 int32_t(net.activation));
  over_members(net.E, work_of(net), [&](int64_t e, bool parallel) {
    const int64_t n = net.n, m = net.m, k = net.k, d = net.d;
    member_backward_saved(net, e, G + e * n * k, S + e * n * m, D1 ? D1 + e * n * m : nullptr, dW + e * m * d,
                          db ? db + e * m : nullptr, da + e * k * m, dX ? dX + e * n * d : nullptr, parallel);
  });
}

#define PHYSAI_TWOLAYER_GRADIENT(T)                                                                     \
  template void validate<T>(const Net<T>&);                                                             \
  template void forward<T>(const Net<T>&, T*);                                                          \
  template void backward<T>(const Net<T>&, const T*, T*, T*, T*, T*);                                   \
  template void loss_and_grad<T>(const Net<T>&, const Targets<T>&, T*, T*, T*, T*);                     \
  template void forward_saving<T>(const Net<T>&, T*, T*, T*);                                           \
  template void backward_saved<T>(const Net<T>&, const T*, const T*, const T*, T*, T*, T*, T*);
PHYSAI_TWOLAYER_GRADIENT(float)
PHYSAI_TWOLAYER_GRADIENT(double)

}  // namespace physai::twolayer
