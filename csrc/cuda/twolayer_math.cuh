// The scalar math of the CUDA two-layer kernels, in the shape those kernels use (one activation value with its
// derivatives; one sample's loss with its gradient and output-Hessian product, unscaled: the 1/(n k) or 1/n of
// the mean is applied once by the final reduction). The math itself is the CPU's, csrc/twolayer/math.hpp
// (host/device), so both backends and the host emulator in physai._cuda evaluate the very same formulas.
#pragma once
#include "twolayer/math.hpp"

namespace physai::cuda {

using Activation = physai::twolayer::Activation;
using Loss = physai::twolayer::Loss;

template <class T>
struct ActValues {
  T s, d1, d2;  // sigma(x), sigma'(x), sigma''(x)
};

template <class T>
PHYSAI_HD ActValues<T> activation(Activation act, T x) {
  ActValues<T> v;
  twolayer::activate(act, x, v.s, v.d1, v.d2);
  return v;
}

// One sample's loss (a sum over its k outputs); writes dL/df into g.
template <class T>
PHYSAI_HD T loss_grad(Loss loss, const T* f, const T* y, T* g, int k) {
  return twolayer::loss_row(loss, f, y, int64_t(k), T(1), g);
}

// hu = (d^2 L / df^2) u for one sample.
template <class T>
PHYSAI_HD void loss_hvp(Loss loss, const T* f, const T* y, const T* u, T* hu, int k) {
  twolayer::loss_row_hessian(loss, f, y, int64_t(k), T(1), u, hu);
}

}  // namespace physai::cuda
