// How the two-layer kernels share the threads, and the views that schedule uses. Three regimes, chosen from the
// shapes alone so that every value is computed the same way whatever the thread count:
//   - several members: one member per thread (BLAS single-threaded inside), over_members;
//   - a lone small member: fixed blocks of kBlockRows rows, each with its own gradient, summed in block order
//     (sum_over_row_blocks): one fork/join per call instead of one per GEMM;
//   - a lone large member (work_of above kBlockedWork): each GEMM split into fixed blocks (gemm.hpp) and the
//     elementwise work into runs of rows (over_row_tasks).
// Members too small to repay a fork/join run on one thread.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>

#include "common/scratch.hpp"
#include "common/threading.hpp"
#include "twolayer/kernels.hpp"

namespace physai::twolayer::detail {

// ---------------------------------------------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------------------------------------------

// Hidden values (rows x m) per tile of a wide layer, at most: 16 MiB a buffer in float.
constexpr int64_t kTileValues = int64_t(1) << 22;

// Rows per tile. Narrow layers: Z, S and sigma' of a tile (3 m values per row) stay within ~1 MiB of cache, in tiles
// of 256 rows at least (shorter ones make the weight-gradient GEMMs thin and re-read dW too often). Wide layers
// (where 256 rows already overflow that): the whole batch, up to kTileValues, since each tile's GEMMs pack W and
// accumulate into dW once more, and each tile is another fork/join per pass; at n = 4096, d = m = 1024 tiles of 4096
// rows instead of 256 cut loss + grad by 15% on a quiet machine and by more than half on a busy one (measured).
template <class T>
int64_t tile_rows(int64_t n, int64_t m) {
  m = std::max<int64_t>(m, 1);
  const int64_t fit = (int64_t(1) << 20) / (3 * m * int64_t(sizeof(T)));
  return std::min(n, fit >= 256 ? fit : std::max<int64_t>(kTileValues / m, 256));
}

// A wide layer's backward from a saved forward (gradient.cpp: wide_backward_saved) cuts the rows into
// min(kWideSavedBlocks, n / kWideSavedMinRows) blocks, each run in steps of at most kWideSavedRows rows; batches of
// fewer than 2 kWideSavedMinRows rows take the column blocks instead, which keep the threads busy.
constexpr int64_t kWideSavedBlocks = 4;
constexpr int64_t kWideSavedMinRows = 256;
constexpr int64_t kWideSavedRows = 1024;

// Multiply-adds of one member's forward pass.
template <class T>
int64_t work_of(const Net<T>& net) {
  return net.n * net.m * (net.d + net.k);
}

// Multiply-adds per member below which a lone member's GEMMs and rows do not repay splitting over threads.
constexpr int64_t kParallelWork = int64_t(1) << 17;
// A lone small member is cut into blocks of kBlockRows rows; above kBlockedWork it splits each GEMM instead, which
// needs no per-block gradient buffers.
constexpr int64_t kBlockRows = 128;
constexpr int64_t kBlockedWork = int64_t(1) << 26;
// Rows per task of a lone member's elementwise loops: enough to vectorise and amortise the dispatch.
constexpr int64_t kRowsPerTask = 16;

// ---------------------------------------------------------------------------------------------------------------
// Members
// ---------------------------------------------------------------------------------------------------------------

// body(e, inner_parallel) for each member: members in parallel when there are several, else one member with its
// own work split when it is large enough.
template <class Body>
void over_members(int64_t E, int64_t work_per_member, Body&& body) {
  const int threads = num_threads();
  if (E > 1 && threads > 1) {
    parallel_for(E, [&](int64_t e) { body(e, false); });
  } else {
    for (int64_t e = 0; e < E; ++e) body(e, threads > 1 && work_per_member >= kParallelWork);
  }
}

// body(first_row, count) over runs of rows within one GEMM-split member.
template <class Body>
void over_row_tasks(int64_t rows, bool parallel, Body&& body) {
  over_rows((rows + kRowsPerTask - 1) / kRowsPerTask, parallel, [&](int64_t block) {
    const int64_t r0 = block * kRowsPerTask;
    body(r0, std::min(kRowsPerTask, rows - r0));
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Row blocks of a lone member
// ---------------------------------------------------------------------------------------------------------------

inline int64_t row_blocks(int64_t n) { return (n + kBlockRows - 1) / kBlockRows; }

// members: how many members the call has (blocks are for a lone member); member: the one-member net (or view).
template <class T>
bool use_row_blocks(int64_t members, const Net<T>& member) {
  return members == 1 && member.n > kBlockRows && work_of(member) < kBlockedWork;
}

// Adds the P-vectors of blocks 1 .. blocks-1 of partial [blocks, P] into block 0, in block order: the one order in
// which per-block gradients are summed, whatever the thread count.
template <class T>
void add_blocks_into_first(int64_t blocks, int64_t P, T* partial) {
  for (int64_t block = 1; block < blocks; ++block) {
    const T* g = partial + block * P;
#pragma omp simd
    for (int64_t i = 0; i < P; ++i) partial[i] += g[i];
  }
}

// contribution(r0, rows, partial) writes the P-vector of rows r0 .. r0+rows (a block) into partial; out receives the
// blocks' vectors summed in block order.
template <class T, class Contribution>
void sum_over_row_blocks(int64_t n, int64_t P, T* out, Contribution&& contribution) {
  const int64_t blocks = row_blocks(n);
  const auto partial = Scratch<T>(blocks * P);
  parallel_for(blocks, [&](int64_t block) {
    const int64_t r0 = block * kBlockRows;
    contribution(r0, std::min(kBlockRows, n - r0), partial.get() + block * P);
  });
  add_blocks_into_first(blocks, P, partial.get());
  std::copy(partial.get(), partial.get() + P, out);
}

// ---------------------------------------------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------------------------------------------

// Where the W, b (null without bias) and a parts start in a member's flattened [W, b, a] vector.
template <class T, class U>
std::array<U*, 3> param_parts(const Net<T>& net, U* flat) {
  const int64_t md = net.m * net.d;
  return {flat, net.b ? flat + md : nullptr, flat + md + (net.b ? net.m : 0)};
}

// A member's flattened [W, b, a] vector into its three arrays.
template <class T>
void split_params(const Net<T>& net, const T* flat, T* W, T* b, T* a) {
  const auto [fW, fb, fa] = param_parts(net, flat);
  std::copy(fW, fW + net.m * net.d, W);
  if (b) std::copy(fb, fb + net.m, b);
  std::copy(fa, fa + net.k * net.m, a);
}

// Rows r0 .. r0+rows of member e, as a one-member net with a shared X.
template <class T>
Net<T> row_view(const Net<T>& net, int64_t e, int64_t r0, int64_t rows) {
  Net<T> view = net;
  view.E = 1;
  view.n = rows;
  view.x_shared = true;
  view.X = net.X_of(e) + r0 * net.d;
  view.W = net.W_of(e);
  view.b = net.b_of(e);
  view.a = net.a_of(e);
  return view;
}

}  // namespace physai::twolayer::detail
