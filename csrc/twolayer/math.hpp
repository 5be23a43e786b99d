// Activations and losses of the two-layer kernels with their derivatives, as host/device scalar functions shared by
// the CPU kernels (csrc/twolayer) and the CUDA kernels. Their numpy twins live in physai/twolayer/reference.py.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/philox.hpp"  // PHYSAI_HD
#if defined(__CUDACC__)
#define PHYSAI_MATH PHYSAI_HD
#else
#include "common/fastmath.hpp"
// Forced inline on the host so the activation loops vectorise inside their AVX2/FMA clones.
#define PHYSAI_MATH inline __attribute__((always_inline))
#endif

namespace physai::twolayer {

enum class Activation : int32_t { Relu = 0, Tanh, Gelu, Erf, Quadratic, Linear, Softplus };
enum class Loss : int32_t { Mse = 0, Logistic, CrossEntropy };

template <class T>
PHYSAI_MATH T tanh_of(T x) {
#if defined(__CUDACC__)
  return tanh(x);
#else
  return fastmath::tanh(x);
#endif
}

// sigma(x), sigma'(x), sigma''(x). GELU is the tanh form 0.5 x (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi).
template <class T>
PHYSAI_MATH void activate(Activation act, T x, T& s, T& ds, T& dds) {
  switch (act) {
    case Activation::Relu:
      s = x < T(0) ? T(0) : x; ds = x > T(0) ? T(1) : T(0); dds = T(0);  // NaN stays NaN
      return;
    case Activation::Tanh: {
      const T t = tanh_of(x);
      s = t; ds = T(1) - t * t; dds = T(-2) * t * ds;
      return;
    }
    case Activation::Gelu: {
      const T c = T(0.7978845608028654), a = T(0.044715);
      const T u = c * (x + a * x * x * x), du = c * (T(1) + T(3) * a * x * x), ddu = c * T(6) * a * x;
      const T t = tanh_of(u), sech2 = T(1) - t * t, dt = sech2 * du;
      const T ddt = T(-2) * t * dt * du + sech2 * ddu;
      s = T(0.5) * x * (T(1) + t);
      ds = T(0.5) * (T(1) + t) + T(0.5) * x * dt;
      dds = dt + T(0.5) * x * ddt;
      return;
    }
    case Activation::Erf: {
      const T g = T(1.1283791670955126) * std::exp(-x * x);  // 2/sqrt(pi) e^{-x^2}
      s = std::erf(x); ds = g; dds = T(-2) * x * g;
      return;
    }
    case Activation::Quadratic:
      s = x * x; ds = T(2) * x; dds = T(2);
      return;
    case Activation::Linear:
      s = x; ds = T(1); dds = T(0);
      return;
    case Activation::Softplus: {
      const T e = std::exp(-std::fabs(x));
      s = (x > T(0) ? x : T(0)) + std::log1p(e);
      const T r = T(1) / (T(1) + e);
      ds = x >= T(0) ? r : e * r;  // sigmoid(x)
      dds = e * r * r;             // sigmoid_slope(x), sharing e with the value
      return;
    }
  }
}

template <class T>
PHYSAI_MATH T sigmoid(T x) {
  const T e = std::exp(-std::fabs(x));
  return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// sigmoid(x) sigmoid(-x) = e^{-|x|} / (1 + e^{-|x|})^2: full relative accuracy in the tails, where p (1 - p) is 0.
template <class T>
PHYSAI_MATH T sigmoid_slope(T x) {
  const T e = std::exp(-std::fabs(x)), r = T(1) / (T(1) + e);
  return e * r * r;
}

// softplus(x) = log(1 + e^x), stable for large |x|
template <class T>
PHYSAI_MATH T softplus(T x) {
  return (x > T(0) ? x : T(0)) + std::log1p(std::exp(-std::fabs(x)));
}

// One sample's loss term (already multiplied by `scale`, the 1/(n k) or 1/n of the mean) and its gradient g with
// respect to the k outputs f. mse: 0.5 (f - y)^2; logistic: log(1 + e^{-y f}) (labels +-1);
// cross-entropy: -sum_j y_j log softmax(f)_j.
template <class T>
PHYSAI_MATH T loss_row(Loss loss, const T* f, const T* y, int64_t k, T scale, T* g) {
  T total = T(0);
  switch (loss) {
    case Loss::Mse:
      for (int64_t j = 0; j < k; ++j) {
        const T r = f[j] - y[j];
        total += T(0.5) * r * r;
        g[j] = r * scale;
      }
      break;
    case Loss::Logistic:
      for (int64_t j = 0; j < k; ++j) {
        total += softplus(-y[j] * f[j]);
        g[j] = -y[j] * sigmoid(-y[j] * f[j]) * scale;
      }
      break;
    case Loss::CrossEntropy: {
      // -log softmax(f)_j = (top - f_j) + log(sum): two non-negative terms, so large logits do not cancel.
      T top = f[0], mass = T(0), sum = T(0);
      for (int64_t j = 1; j < k; ++j) top = f[j] > top ? f[j] : top;
      for (int64_t j = 0; j < k; ++j) sum += std::exp(f[j] - top);
      const T log_sum = std::log(sum);
      for (int64_t j = 0; j < k; ++j) {
        mass += y[j];
        total += y[j] * ((top - f[j]) + log_sum);
      }
      for (int64_t j = 0; j < k; ++j) g[j] = (mass * (std::exp(f[j] - top) / sum) - y[j]) * scale;
      break;
    }
  }
  return total * scale;
}

// Hessian of one sample's (scaled) loss with respect to its outputs, applied to v: out = H_f v.
template <class T>
PHYSAI_MATH void loss_row_hessian(Loss loss, const T* f, const T* y, int64_t k, T scale, const T* v, T* out) {
  switch (loss) {
    case Loss::Mse:
      for (int64_t j = 0; j < k; ++j) out[j] = v[j] * scale;
      return;
    case Loss::Logistic:
      for (int64_t j = 0; j < k; ++j) {
        out[j] = sigmoid_slope(y[j] * f[j]) * y[j] * y[j] * v[j] * scale;
      }
      return;
    case Loss::CrossEntropy: {
      T top = f[0], sum = T(0), mass = T(0), pv = T(0);
      for (int64_t j = 1; j < k; ++j) top = f[j] > top ? f[j] : top;
      for (int64_t j = 0; j < k; ++j) sum += std::exp(f[j] - top);
      for (int64_t j = 0; j < k; ++j) {
        mass += y[j];
        pv += std::exp(f[j] - top) / sum * v[j];
      }
      for (int64_t j = 0; j < k; ++j) out[j] = mass * std::exp(f[j] - top) / sum * (v[j] - pv) * scale;
      return;
    }
  }
}

}  // namespace physai::twolayer
