// The one description of an ensemble of two-layer networks and its targets that every backend takes (the CPU
// kernels in csrc/twolayer, the CUDA kernels in csrc/cuda): sizes, pointers to member 0 of each array, the
// multipliers and the activation; member e's slices come from the *_of accessors. For member e (row-major):
//   Z = input_scale * X W^T + b   [n, m]      S = sigma(Z)      F = output_scale * S a^T   [n, k]
// with W [E, m, d], b [E, m] (null: no bias), a [E, k, m], X [n, d] shared or [E, n, d], Y [n, k] or [E, n, k].
#pragma once
#include <cstdint>

#include "twolayer/math.hpp"

namespace physai::twolayer {

template <class T>
struct Net {
  int64_t E = 1, n = 0, d = 0, m = 0, k = 1;
  const T* X = nullptr;
  bool x_shared = true;
  const T* W = nullptr;
  const T* b = nullptr;  // null: no bias
  const T* a = nullptr;
  T input_scale = T(1), output_scale = T(1);
  Activation activation = Activation::Relu;

  PHYSAI_HD const T* X_of(int64_t e) const { return x_shared ? X : X + e * n * d; }
  PHYSAI_HD const T* W_of(int64_t e) const { return W + e * m * d; }
  PHYSAI_HD const T* b_of(int64_t e) const { return b ? b + e * m : nullptr; }
  PHYSAI_HD const T* a_of(int64_t e) const { return a + e * k * m; }
  // Parameters of one member, flattened as [W (m d), b (m, with bias), a (k m)].
  PHYSAI_HD int64_t params() const { return m * d + (b ? m : 0) + k * m; }
};

template <class T>
struct Targets {
  const T* Y = nullptr;
  bool shared = true;
  Loss loss = Loss::Mse;
  PHYSAI_HD const T* Y_of(int64_t e, int64_t n, int64_t k) const { return shared ? Y : Y + e * n * k; }
};

}  // namespace physai::twolayer
