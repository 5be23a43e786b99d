// Vector helpers for the hot loops: a vector type of one AVX2 register, unaligned loads and stores, a fixed-order
// dot product and column sums. Every helper is forced inline, so it is compiled with the instruction set of the
// function that calls it: the target_clones entry points below (PHYSAI_VECTOR_CLONES) get AVX-512 and AVX2/FMA code
// from the same source, picked at load time. Every sum runs in a fixed order, so results depend on the shapes and
// the CPU (vector width, FMA), never on the thread count.
#pragma once
#include <cstdint>
#include <cstring>

// Marks a non-template function to be compiled for AVX-512 and AVX2/FMA CPUs as well as the baseline. GCC does not
// clone templates or lambdas: entry points are plain overloads for float and double around an always-inline template.
#define PHYSAI_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define PHYSAI_INLINE __attribute__((always_inline)) inline
// The same for a lambda handed to such templates: one left out of line is compiled once, for the baseline
// instruction set (no fused multiply-adds), not for each clone, which changes its bits and its speed.
#define PHYSAI_INLINE_LAMBDA __attribute__((always_inline))

namespace physai::simd {

// ---------------------------------------------------------------------------------------------------------------
// Vector type, loads and stores
// ---------------------------------------------------------------------------------------------------------------

// One AVX2 register of T as a GCC vector (8 floats, 4 doubles). GCC lowers vectors wider than the target's registers
// through the stack, so this is the width every clone handles well; the AVX-512 clone loses little, since the CPUs
// that have it issue two such operations per cycle.
template <class T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(T);
};

// Unaligned loads and stores of U: a Vec or a single T.
template <class U, class T>
PHYSAI_INLINE U load(const T* p) {
  U value;
  std::memcpy(&value, p, sizeof value);
  return value;
}
template <class T, class U>
PHYSAI_INLINE void store(T* p, U value) {
  std::memcpy(p, &value, sizeof value);
}

// ---------------------------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------------------------

// The sum of a vector's lanes by a fixed tree of shuffles.
PHYSAI_INLINE float fold(Vec<float>::type v) {
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1);
  v += __builtin_shufflevector(v, v, 1, 0, 1, 0, 1, 0, 1, 0);
  return v[0];
}
PHYSAI_INLINE double fold(Vec<double>::type v) {
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1);
  v += __builtin_shufflevector(v, v, 1, 0, 1, 0);
  return v[0];
}

// A dot product over two vectors of partial sums (alternate blocks, so consecutive multiply-adds are independent),
// folded by a fixed tree: no serial chain of lane additions at the end, which is what an omp simd reduction
// compiles to.
template <class T>
PHYSAI_INLINE T dot(int64_t K, const T* a, const T* b) {
  using V = typename Vec<T>::type;
  constexpr int64_t lanes = Vec<T>::lanes;
  V even = {}, odd = {};
  int64_t l = 0;
  for (; l + 2 * lanes <= K; l += 2 * lanes) {
    even += load<V>(a + l) * load<V>(b + l);
    odd += load<V>(a + l + lanes) * load<V>(b + l + lanes);
  }
  if (l + lanes <= K) {
    even += load<V>(a + l) * load<V>(b + l);
    l += lanes;
  }
  for (int64_t q = 0; l + q < K; ++q) odd[q] += a[l + q] * b[l + q];
  return fold(even + odd);
}

// The sum of a[0..K) in the order of dot (the same two vectors of partial sums and fold).
template <class T>
PHYSAI_INLINE T sum(int64_t K, const T* a) {
  using V = typename Vec<T>::type;
  constexpr int64_t lanes = Vec<T>::lanes;
  V even = {}, odd = {};
  int64_t l = 0;
  for (; l + 2 * lanes <= K; l += 2 * lanes) {
    even += load<V>(a + l);
    odd += load<V>(a + l + lanes);
  }
  if (l + lanes <= K) {
    even += load<V>(a + l);
    l += lanes;
  }
  for (int64_t q = 0; l + q < K; ++q) odd[q] += a[l + q];
  return fold(even + odd);
}

// ---------------------------------------------------------------------------------------------------------------
// Combinations of rows (a short sum over rows for every column)
// ---------------------------------------------------------------------------------------------------------------

// body(q, sum) for each column q < m with sum = sum_{j < k} term(j, q, U{}), where term returns a U loaded at
// column q: a Vec of columns at a time (an omp simd loop over q around a loop over j of unknown length does not
// vectorise), the rest one T at a time.
template <class T, class Term, class Body>
PHYSAI_INLINE void for_summed_columns(int64_t k, int64_t m, Term&& term, Body&& body) {
  using V = typename Vec<T>::type;
  int64_t q = 0;
  for (; q + Vec<T>::lanes <= m; q += Vec<T>::lanes) {
    V sum = {};
    for (int64_t j = 0; j < k; ++j) sum += term(j, q, V{});
    body(q, sum);
  }
  for (; q < m; ++q) {
    T sum = T(0);
    for (int64_t j = 0; j < k; ++j) sum += term(j, q, T{});
    body(q, sum);
  }
}

// body(q, sum) with sum = sum_j c[j] A[j, q] for the k x m row-major A.
template <class T, class Body>
PHYSAI_INLINE void for_combined_columns(int64_t k, int64_t m, const T* c, const T* A, Body&& body) {
  for_summed_columns<T>(
      k, m, [&](int64_t j, int64_t q, auto lanes) { return c[j] * load<decltype(lanes)>(A + j * m + q); }, body);
}

// v, which GCC can no longer see through: it cannot fuse the operation that made v into a later one, nor vectorise a
// loop that holds the asm (a vectoriser that turns a loop's scalar sums into an in-order reduction multiplies in a
// vector and adds lane by lane, unfused, which changes the bits of a multiply-add chain).
template <class V>
PHYSAI_INLINE V opaque(V v) {
  asm("" : "+v"(v));
  return v;
}

// v rounded on its own: GCC may not fuse the product that made it into a multiply-add with what it is added to next,
// as it did in some blocks and not others (a column's bits then depended on its block). A memory operand, not
// opaque's register: the baseline clone has no register for a 32-byte vector.
template <class V>
PHYSAI_INLINE V unfused(V v) {
  asm("" : "+m"(v));
  return v;
}

// c[j] = beta c[j] + alpha sum_l coef(l) B[l, j] for j in [j0, N), in blocks of U (a Vec, or one T for
// the last columns), `Width` of them held in registers across the whole sum over l (accumulating into c would chain
// every l through a store and a reload). Even and odd l go to separate sums, added at the end, so that consecutive
// multiply-adds do not wait on each other. Returns where the full blocks end.
template <class U, int Width, class T, class Coef>
PHYSAI_INLINE int64_t accumulate_columns(int64_t j0, int64_t N, int64_t K, T alpha, Coef&& coef, const T* B,
                                         int64_t ldb, T beta, T* c) {
  constexpr int64_t lanes = sizeof(U) / sizeof(T), cols = lanes * Width;
  for (; j0 + cols <= N; j0 += cols) {
    U even[Width] = {}, odd[Width] = {};
    int64_t l = 0;
    for (; l + 2 <= K; l += 2) {
      const T s0 = coef(l), s1 = coef(l + 1);
      for (int w = 0; w < Width; ++w) {
        even[w] += s0 * load<U>(B + l * ldb + j0 + w * lanes);
        odd[w] += s1 * load<U>(B + (l + 1) * ldb + j0 + w * lanes);
        if constexpr (lanes == 1) even[w] = opaque(even[w]), odd[w] = opaque(odd[w]);  // stays a fused chain
      }
    }
    if (l < K)
      for (int w = 0; w < Width; ++w) even[w] += coef(l) * load<U>(B + l * ldb + j0 + w * lanes);
    for (int w = 0; w < Width; ++w) {
      T* out = c + j0 + w * lanes;
      const U sum = unfused(alpha * (even[w] + odd[w]));
      store(out, beta == T(0) ? sum : sum + beta * load<U>(out));
    }
  }
  return j0;
}

// All the columns of c: four, two, then one vector at a time, then one by one.
template <class T, class Coef>
PHYSAI_INLINE void accumulate_all_columns(int64_t N, int64_t K, T alpha, Coef&& coef, const T* B, int64_t ldb, T beta,
                                          T* c) {
  using V = typename Vec<T>::type;
  int64_t j = accumulate_columns<V, 4>(0, N, K, alpha, coef, B, ldb, beta, c);
  j = accumulate_columns<V, 2>(j, N, K, alpha, coef, B, ldb, beta, c);
  j = accumulate_columns<V, 1>(j, N, K, alpha, coef, B, ldb, beta, c);
  accumulate_columns<T, 1>(j, N, K, alpha, coef, B, ldb, beta, c);
}

}  // namespace physai::simd
