// The tile passes that the gradient, the Hessian operator and the training loop share: the hidden layer of a tile,
// its output layer and loss, and one member's loss and gradient (whole, or in row blocks). Defined in gradient.cpp
// for float and double.
#pragma once
#include <cstdint>

#include "twolayer/kernels.hpp"

namespace physai::twolayer::detail {

// The loss is a mean over n k entries (or n rows for cross-entropy): each row's term is multiplied by this.
template <class T>
T loss_scale(Loss loss, int64_t rows, int64_t k) {
  return loss == Loss::CrossEntropy ? T(1) / T(rows) : T(1) / (T(rows) * T(k));
}

// Z = input_scale * X_t W^T + b, then S = sigma(Z) in place of Z; D1 = sigma'(Z) and D2 = sigma''(Z) where non-null
// (D2 only with D1).
template <class T>
void hidden(const Net<T>& net, int64_t e, const T* X_t, int64_t rows, T* S, T* D1, T* D2, bool parallel);

// Output layer and loss of a tile from S_t = sigma(Z_t): F_t and G_t [rows, k], and the tile's loss summed in row
// order.
template <class T>
T loss_tile(const Net<T>& net, int64_t e, Loss loss, const T* S_t, const T* Y_t, int64_t rows, T scale, T* F_t,
            T* G_t, T* row_loss, bool parallel);

// Forward + loss + backward of member e; returns its loss. The loss is a mean over `mean_rows` rows (net.n, unless
// net is a block of a larger batch).
template <class T>
T member_loss_and_grad(const Net<T>& net, const T* Y, Loss loss, int64_t e, T* dW, T* db, T* da, bool parallel,
                       int64_t mean_rows);

// The same for a lone member (net.E == 1) in parallel row blocks (schedule.hpp), summed in block order.
template <class T>
T blocked_loss_and_grad(const Net<T>& net, const T* Y, Loss loss, T* dW, T* db, T* da);

}  // namespace physai::twolayer::detail
