// Branch-free, inlineable expm1 and tanh for float and double, so elementwise loops over activations vectorise
// (libm's scalar tanh costs ~10 ns an element and dominated the two-layer kernels). Accuracy: a few ulp
// (Taylor polynomials of degree 8 / 14 on the reduced range |r| <= ln2/2, then exact scaling by 2^n).
#pragma once
#include <cstdint>
#include <cstring>

namespace physai::fastmath {

template <class T>
struct Traits;

template <>
struct Traits<float> {
  using Bits = int32_t;
  static constexpr float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the mantissa
  static constexpr int mantissa_bits = 23, bias = 127, degree = 8;
  static constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187e-06f;
  static constexpr float lowest = -80.0f, highest = 80.0f;
};

template <>
struct Traits<double> {
  using Bits = int64_t;
  static constexpr double shifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int mantissa_bits = 52, bias = 1023, degree = 14;
  static constexpr double ln2_hi = 0.6931471803691238, ln2_lo = 1.9082149292705877e-10;
  static constexpr double lowest = -700.0, highest = 700.0;
};

template <class T>
inline typename Traits<T>::Bits bits_of(T x) {
  typename Traits<T>::Bits b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

template <class T>
inline T from_bits(typename Traits<T>::Bits b) {
  T x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// e^x - 1, accurate near 0 (no cancellation) and for |x| up to the clamp.
template <class T>
inline T expm1(T x) {
  using Tr = Traits<T>;
  x = x < Tr::lowest ? Tr::lowest : (x > Tr::highest ? Tr::highest : x);
  const T shifted = x * T(1.4426950408889634) + Tr::shifter;
  const T n = shifted - Tr::shifter;
  const T r = (x - n * Tr::ln2_hi) - n * Tr::ln2_lo;
  T p = T(0);
  T inverse_factorial[Tr::degree + 1];
  inverse_factorial[0] = T(1);
  for (int i = 1; i <= Tr::degree; ++i) inverse_factorial[i] = inverse_factorial[i - 1] / T(i);
  for (int i = Tr::degree; i >= 1; --i) p = (p + inverse_factorial[i]) * r;  // sum_{i>=1} r^i / i!
  const auto exponent = bits_of(shifted) - bits_of(Tr::shifter);  // n as an integer
  const T scale = from_bits<T>((exponent + Tr::bias) << Tr::mantissa_bits);
  return scale * p + (scale - T(1));
}

template <class T>
inline T exp(T x) {
  return expm1(x) + T(1);
}

template <class T>
inline T tanh(T x) {
  const T magnitude = x < T(0) ? -x : x;
  const T em = expm1(T(-2) * magnitude);
  const T t = -em / (T(2) + em);
  return x < T(0) ? -t : t;
}

}  // namespace physai::fastmath
