// Scalar math of the two-layer network kernels: activations with their first and second derivatives, and the
// per-sample losses with their gradient and Hessian-vector product with respect to the outputs f.
// Everything is __host__ __device__ (PHYSAI_HD) so the same code the GPU runs is compiled into the host test
// hook of physai._cuda and checked against numpy on machines without a GPU. Unlike the CPU sibling, which works
// on whole tiles, these functions take one scalar (activations) or one sample's k outputs (losses).
// Losses here are per-sample sums; the 1/(n k) or 1/n of the mean is applied once by the final reduction.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define PHYSAI_HD __host__ __device__
#else
#define PHYSAI_HD
#endif

namespace physai::cuda {

enum class Activation : int { relu = 0, tanh = 1, gelu = 2, erf = 3, quadratic = 4, linear = 5, softplus = 6 };
enum class Loss : int { mse = 0, logistic = 1, cross_entropy = 2 };

template <class T>
struct ActValues {
  T s, d1, d2;  // sigma(x), sigma'(x), sigma''(x)
};

// 1/(1+exp(-x)) without overflow for either sign of x.
template <class T>
PHYSAI_HD inline T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

// log(1+exp(x)) without overflow.
template <class T>
PHYSAI_HD inline T softplus(T x) {
  return (x > T(0) ? x : T(0)) + std::log1p(std::exp(-std::fabs(x)));
}

template <class T>
PHYSAI_HD inline ActValues<T> activation(Activation act, T x) {
  switch (act) {
    case Activation::relu:
      return {x > T(0) ? x : T(0), x > T(0) ? T(1) : T(0), T(0)};
    case Activation::tanh: {
      const T t = std::tanh(x), dt = T(1) - t * t;
      return {t, dt, T(-2) * t * dt};
    }
    case Activation::gelu: {
      // sigma = x/2 (1 + tanh u), u = c (x + 0.044715 x^3), c = sqrt(2/pi)
      const T c = T(0.7978845608028654), q = T(0.044715);
      const T u = c * (x + q * x * x * x), du = c * (T(1) + T(3) * q * x * x), ddu = c * T(6) * q * x;
      const T t = std::tanh(u), dt = T(1) - t * t;
      return {T(0.5) * x * (T(1) + t), T(0.5) * (T(1) + t) + T(0.5) * x * dt * du,
              dt * du + T(0.5) * x * dt * (ddu - T(2) * t * du * du)};
    }
    case Activation::erf: {
      const T d1 = T(1.1283791670955126) * std::exp(-x * x);  // 2/sqrt(pi) exp(-x^2)
      return {std::erf(x), d1, T(-2) * x * d1};
    }
    case Activation::quadratic:
      return {x * x, T(2) * x, T(2)};
    case Activation::linear:
      return {x, T(1), T(0)};
    case Activation::softplus: {
      const T p = sigmoid(x);
      return {softplus(x), p, p * (T(1) - p)};
    }
  }
  return {T(0), T(0), T(0)};
}

// One sample: f, y, g, u, hu hold k entries with stride 1. Returns the sample's loss; writes dL/df to g.
template <class T>
PHYSAI_HD inline T loss_grad(Loss loss, const T* f, const T* y, T* g, int k) {
  T value = T(0);
  switch (loss) {
    case Loss::mse:
      for (int j = 0; j < k; ++j) {
        const T r = f[j] - y[j];
        value += T(0.5) * r * r;
        g[j] = r;
      }
      break;
    case Loss::logistic:
      // log(1+exp(-y f)); derivative -y sigmoid(-y f)
      for (int j = 0; j < k; ++j) {
        const T z = y[j] * f[j];
        value += softplus(-z);
        g[j] = -y[j] * sigmoid(-z);
      }
      break;
    case Loss::cross_entropy: {
      // -sum_j y_j log softmax(f)_j = (sum y) lse(f) - sum_j y_j f_j
      T fmax = f[0];
      for (int j = 1; j < k; ++j) fmax = f[j] > fmax ? f[j] : fmax;
      T z = T(0), ysum = T(0), yf = T(0);
      for (int j = 0; j < k; ++j) {
        z += std::exp(f[j] - fmax);
        ysum += y[j];
        yf += y[j] * f[j];
      }
      const T lse = fmax + std::log(z);
      value = ysum * lse - yf;
      for (int j = 0; j < k; ++j) g[j] = ysum * std::exp(f[j] - lse) - y[j];
      break;
    }
  }
  return value;
}

// One sample: hu = (d^2 L / df^2) u.
template <class T>
PHYSAI_HD inline void loss_hvp(Loss loss, const T* f, const T* y, const T* u, T* hu, int k) {
  switch (loss) {
    case Loss::mse:
      for (int j = 0; j < k; ++j) hu[j] = u[j];
      break;
    case Loss::logistic:
      for (int j = 0; j < k; ++j) {
        const T p = sigmoid(y[j] * f[j]);
        hu[j] = y[j] * y[j] * p * (T(1) - p) * u[j];
      }
      break;
    case Loss::cross_entropy: {
      // (sum y) (diag(p) - p p^T) u
      T fmax = f[0];
      for (int j = 1; j < k; ++j) fmax = f[j] > fmax ? f[j] : fmax;
      T z = T(0), ysum = T(0);
      for (int j = 0; j < k; ++j) {
        z += std::exp(f[j] - fmax);
        ysum += y[j];
      }
      const T lse = fmax + std::log(z);
      T pu = T(0);
      for (int j = 0; j < k; ++j) pu += std::exp(f[j] - lse) * u[j];
      for (int j = 0; j < k; ++j) hu[j] = ysum * std::exp(f[j] - lse) * (u[j] - pu);
      break;
    }
  }
}

}  // namespace physai::cuda
