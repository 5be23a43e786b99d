#include "twolayer/kernels.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>

#include "common/blas.hpp"
#include "common/errors.hpp"
#include "common/scratch.hpp"
#include "common/threading.hpp"

namespace physai::twolayer {

using blas::Trans;

namespace {

// Hot loops are compiled for AVX-512 and AVX2/FMA CPUs as well as the baseline, picked at load time; the bits depend on
// the CPU (vector width), never on the thread count.
#define PHYSAI_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

// Rows per tile: Z, S and sigma' of a tile (3 m values per row) should stay within ~1 MiB of cache, but tiles shorter
// than 256 rows make the weight-gradient GEMMs thin and re-read dW too often.
template <class T>
int64_t tile_rows(int64_t n, int64_t m) {
  const int64_t fit = (int64_t(1) << 20) / (3 * std::max<int64_t>(m, 1) * int64_t(sizeof(T)));
  return std::min(n, std::max<int64_t>(fit, 256));
}

// BLAS always runs single-threaded (set once when the module loads): OpenBLAS's own threading changes the rounding
// of some shapes with the thread count. Several members run one per thread; a single member splits its GEMMs into
// fixed blocks (gemm below) and its elementwise loops into rows, so every value is computed the same way whatever
// the thread count. Members too small to repay a fork/join run on one thread.
template <class Body>
void over_members(int64_t E, int64_t work_per_member, Body&& body) {
  const int threads = num_threads();
  constexpr int64_t kParallelWork = int64_t(1) << 17;  // multiply-adds per member below which threads do not pay
  if (E > 1 && threads > 1) {
    parallel_for(E, [&](int64_t e) { body(e, false); });
  } else {
    for (int64_t e = 0; e < E; ++e) body(e, threads > 1 && work_per_member >= kParallelWork);
  }
}

template <class T>
int64_t work_of(const Net<T>& net) {
  return net.n * net.m * (net.d + net.k);
}

template <class Body>
void over_rows(int64_t rows, bool parallel, Body&& body) {
  if (parallel) {
    parallel_for(rows, body);
  } else {
    for (int64_t r = 0; r < rows; ++r) body(r);
  }
}

// body(first_row, count) over runs of rows within one GEMM-split member: each parallel task large enough to
// vectorise and amortise its dispatch.
template <class Body>
void over_row_tasks(int64_t rows, bool parallel, Body&& body) {
  constexpr int64_t kRowsPerTask = 16;
  over_rows((rows + kRowsPerTask - 1) / kRowsPerTask, parallel, [&](int64_t block) {
    const int64_t r0 = block * kRowsPerTask;
    body(r0, std::min(kRowsPerTask, rows - r0));
  });
}

// GEMMs with a dimension of at most kSmallDim (the k outputs of the network) are memory-bound outer products or
// dot products: plain loops beat a BLAS call. Each entry point is cloned for AVX-512 and AVX2/FMA; every sum has a
// fixed order, so the bits depend on the shapes and the CPU, never on the thread count.
constexpr int64_t kSmallDim = 8;

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
__attribute__((always_inline)) inline U load(const T* p) {
  U value;
  std::memcpy(&value, p, sizeof value);
  return value;
}
template <class T, class U>
__attribute__((always_inline)) inline void store(T* p, U value) {
  std::memcpy(p, &value, sizeof value);
}

// The sum of a vector's lanes by a fixed tree of shuffles.
__attribute__((always_inline)) inline float fold(Vec<float>::type v) {
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1);
  v += __builtin_shufflevector(v, v, 1, 0, 1, 0, 1, 0, 1, 0);
  return v[0];
}
__attribute__((always_inline)) inline double fold(Vec<double>::type v) {
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1);
  v += __builtin_shufflevector(v, v, 1, 0, 1, 0);
  return v[0];
}

// A dot product over two vectors of partial sums (alternate blocks, so consecutive multiply-adds are independent),
// folded by a fixed tree: no serial chain of lane additions at the end, which is what an omp simd reduction
// compiles to.
template <class T>
__attribute__((always_inline)) inline T dot(int64_t K, const T* a, const T* b) {
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

// body(q, sum) for each column q < m with sum = sum_{j < k} term(j, q, U{}), where term returns a U loaded at
// column q: a Vec of columns at a time (an omp simd loop over q around a loop over j of unknown length does not
// vectorise), the rest one T at a time.
template <class T, class Term, class Body>
__attribute__((always_inline)) inline void for_summed_columns(int64_t k, int64_t m, Term&& term, Body&& body) {
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
__attribute__((always_inline)) inline void for_combined_columns(int64_t k, int64_t m, const T* c, const T* A,
                                                                Body&& body) {
  for_summed_columns<T>(
      k, m, [&](int64_t j, int64_t q, auto lanes) { return c[j] * load<decltype(lanes)>(A + j * m + q); }, body);
}

// c[j] = beta c[j] + alpha sum_l coef(l) B[l, j] for j in [j0, N), in blocks of U (a Vec, or one T for
// the last columns), `Width` of them held in registers across the whole sum over l (accumulating into c would chain
// every l through a store and a reload). Even and odd l go to separate sums, added at the end, so that consecutive
// multiply-adds do not wait on each other. Returns where the full blocks end.
template <class U, int Width, class T, class Coef>
__attribute__((always_inline)) inline int64_t accumulate_columns(int64_t j0, int64_t N, int64_t K, T alpha,
                                                                 Coef&& coef, const T* B, int64_t ldb, T beta, T* c) {
  constexpr int64_t lanes = sizeof(U) / sizeof(T), cols = lanes * Width;
  for (; j0 + cols <= N; j0 += cols) {
    U even[Width] = {}, odd[Width] = {};
    int64_t l = 0;
    for (; l + 2 <= K; l += 2) {
      const T s0 = coef(l), s1 = coef(l + 1);
      for (int w = 0; w < Width; ++w) {
        even[w] += s0 * load<U>(B + l * ldb + j0 + w * lanes);
        odd[w] += s1 * load<U>(B + (l + 1) * ldb + j0 + w * lanes);
      }
    }
    if (l < K)
      for (int w = 0; w < Width; ++w) even[w] += coef(l) * load<U>(B + l * ldb + j0 + w * lanes);
    for (int w = 0; w < Width; ++w) {
      T* out = c + j0 + w * lanes;
      const U sum = alpha * (even[w] + odd[w]);
      store(out, beta == T(0) ? sum : sum + beta * load<U>(out));
    }
  }
  return j0;
}

// All the columns of c: four, two, then one vector at a time, then one by one.
template <class T, class Coef>
__attribute__((always_inline)) inline void accumulate_all_columns(int64_t N, int64_t K, T alpha, Coef&& coef,
                                                                  const T* B, int64_t ldb, T beta, T* c) {
  using V = typename Vec<T>::type;
  int64_t j = accumulate_columns<V, 4>(0, N, K, alpha, coef, B, ldb, beta, c);
  j = accumulate_columns<V, 2>(j, N, K, alpha, coef, B, ldb, beta, c);
  j = accumulate_columns<V, 1>(j, N, K, alpha, coef, B, ldb, beta, c);
  accumulate_columns<T, 1>(j, N, K, alpha, coef, B, ldb, beta, c);
}

template <class T>
__attribute__((always_inline)) inline void small_gemm_impl(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K,
                                                           T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
                                                           T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (ta == Trans::No && tb == Trans::Yes) {  // rows of A against rows of B: dot products
      for (int64_t j = 0; j < N; ++j)
        c[j] = (beta == T(0) ? T(0) : beta * c[j]) + alpha * dot(K, A + i * lda, B + j * ldb);
    } else if (tb == Trans::No) {  // a combination of the rows of B
      const auto coef = [&](int64_t l) { return ta == Trans::No ? A[i * lda + l] : A[l * lda + i]; };
      accumulate_all_columns(N, K, alpha, coef, B, ldb, beta, c);
    } else {  // op(A)^T op(B)^T, which no kernel asks for at small sizes: plain loops
      for (int64_t j = 0; j < N; ++j) {
        T sum = T(0);
        for (int64_t l = 0; l < K; ++l) sum += A[l * lda + i] * B[j * ldb + l];
        c[j] = (beta == T(0) ? T(0) : beta * c[j]) + alpha * sum;
      }
    }
  }
}

PHYSAI_VECTOR_CLONES
void small_gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  small_gemm_impl(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

PHYSAI_VECTOR_CLONES
void small_gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  small_gemm_impl(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

template <class T>
void block_gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
                int64_t ldb, T beta, T* C, int64_t ldc) {
  if (std::min({M, N, K}) <= kSmallDim)
    small_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  else
    blas::gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// C = alpha op(A) op(B) + beta C, always cut into blocks of kGemmBlock rows of C (or columns, when C is wide and
// short) that run in parallel when `parallel`. The cut depends only on the shapes, so neither does any result.
constexpr int64_t kGemmBlock = 64;

template <class T>
void gemm(bool parallel, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M >= N) {
    over_rows((M + kGemmBlock - 1) / kGemmBlock, parallel, [&](int64_t block) {
      const int64_t i0 = block * kGemmBlock, rows = std::min(kGemmBlock, M - i0);
      const T* A_block = ta == Trans::No ? A + i0 * lda : A + i0;
      block_gemm(ta, tb, rows, N, K, alpha, A_block, lda, B, ldb, beta, C + i0 * ldc, ldc);
    });
  } else {
    over_rows((N + kGemmBlock - 1) / kGemmBlock, parallel, [&](int64_t block) {
      const int64_t j0 = block * kGemmBlock, cols = std::min(kGemmBlock, N - j0);
      const T* B_block = tb == Trans::No ? B + j0 : B + j0 * ldb;
      block_gemm(ta, tb, M, cols, K, alpha, A, lda, B_block, ldb, beta, C + j0, ldc);
    });
  }
}

// S = sigma(Z + b) in place, D1 = sigma'(...), D2 = sigma''(...) (when non-null) for one row. The activation is a
// template parameter, so the loop has no branches and vectorises; it is inlined into the non-template entry points
// below, which GCC clones for AVX2/FMA CPUs (target_clones does not apply to templates).
template <Activation A, class T>
__attribute__((always_inline)) inline void activate_row(int64_t m, T* z, const T* b, T* D1, T* D2) {
  // z, b, D1 and D2 never overlap, so the loops are safe to vectorise as written.
  if (D2) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) activate(A, z[j] + b[j], z[j], D1[j], D2[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      T dds;
      activate(A, z[j] + b[j], z[j], D1[j], dds);
    }
  }
}

template <class T>
__attribute__((always_inline)) inline void activate_row_any(Activation act, int64_t m, T* z, const T* b, T* D1,
                                                            T* D2) {
  switch (act) {
    case Activation::Relu: return activate_row<Activation::Relu>(m, z, b, D1, D2);
    case Activation::Tanh: return activate_row<Activation::Tanh>(m, z, b, D1, D2);
    case Activation::Gelu: return activate_row<Activation::Gelu>(m, z, b, D1, D2);
    case Activation::Erf: return activate_row<Activation::Erf>(m, z, b, D1, D2);
    case Activation::Quadratic: return activate_row<Activation::Quadratic>(m, z, b, D1, D2);
    case Activation::Linear: return activate_row<Activation::Linear>(m, z, b, D1, D2);
    case Activation::Softplus: return activate_row<Activation::Softplus>(m, z, b, D1, D2);
  }
}

PHYSAI_VECTOR_CLONES
void activate_rows(Activation act, int64_t rows, int64_t m, float* z, const float* b, float* D1, float* D2) {
  for (int64_t r = 0; r < rows; ++r) activate_row_any(act, m, z + r * m, b, D1 + r * m, D2 ? D2 + r * m : nullptr);
}

PHYSAI_VECTOR_CLONES
void activate_rows(Activation act, int64_t rows, int64_t m, double* z, const double* b, double* D1, double* D2) {
  for (int64_t r = 0; r < rows; ++r) activate_row_any(act, m, z + r * m, b, D1 + r * m, D2 ? D2 + r * m : nullptr);
}

// The output layer of `rows` rows, one row at a time while it is in cache: F_r = os a S_r (k dot products), then the
// loss row, which writes G_r (already scaled for the mean) and returns the row's loss into row_loss.
template <class T>
__attribute__((always_inline)) inline void output_rows_impl(Loss loss, int64_t rows, int64_t m, int64_t k, T os,
                                                            const T* S, const T* a, const T* Y, T scale, T* F, T* G,
                                                            T* row_loss) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < k; ++j) F[r * k + j] = os * dot(m, S + r * m, a + j * m);
    row_loss[r] = loss_row(loss, F + r * k, Y + r * k, k, scale, G + r * k);
  }
}
PHYSAI_VECTOR_CLONES void output_rows(Loss loss, int64_t rows, int64_t m, int64_t k, float os, const float* S,
                                      const float* a, const float* Y, float scale, float* F, float* G,
                                      float* row_loss) {
  output_rows_impl(loss, rows, m, k, os, S, a, Y, scale, F, G, row_loss);
}
PHYSAI_VECTOR_CLONES void output_rows(Loss loss, int64_t rows, int64_t m, int64_t k, double os, const double* S,
                                      const double* a, const double* Y, double scale, double* F, double* G,
                                      double* row_loss) {
  output_rows_impl(loss, rows, m, k, os, S, a, Y, scale, F, G, row_loss);
}

// The chain rule through both layers, row by row: dS_r = os sum_j G_rj a_j, dZ_r = dS_r sigma'_r (dZ may be D1, to
// write in place) and, when D2 is given, D2_r *= dS_r (the curvature term dS sigma'' of the Hessian).
template <class T>
__attribute__((always_inline)) inline void backprop_rows_impl(int64_t rows, int64_t m, int64_t k, T os, const T* G,
                                                              const T* a, const T* D1, T* dZ, T* D2) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* d1 = D1 + r * m;
    T *dz = dZ + r * m, *d2 = D2 ? D2 + r * m : nullptr;
    for_combined_columns(k, m, G + r * k, a, [&](int64_t q, auto sum) {
      using U = decltype(sum);
      const U dS = os * sum;
      store(dz + q, load<U>(d1 + q) * dS);
      if (d2) store(d2 + q, load<U>(d2 + q) * dS);
    });
  }
}
PHYSAI_VECTOR_CLONES void backprop_rows(int64_t rows, int64_t m, int64_t k, float os, const float* G, const float* a,
                                        const float* D1, float* dZ, float* D2) {
  backprop_rows_impl(rows, m, k, os, G, a, D1, dZ, D2);
}
PHYSAI_VECTOR_CLONES void backprop_rows(int64_t rows, int64_t m, int64_t k, double os, const double* G,
                                        const double* a, const double* D1, double* dZ, double* D2) {
  backprop_rows_impl(rows, m, k, os, G, a, D1, dZ, D2);
}

// What the R-operator pass over a tile's rows reads (row-major tiles; vb null without bias) and writes.
template <class T>
struct RRows {
  Loss loss;
  int64_t m, k;
  T os, scale;
  const T *vb, *a, *va;            // direction's bias part, output weights, direction's output part
  const T *S, *D1, *dS_D2, *F, *Y, *G;  // cached forward and backward of the tile (dS_D2 = dS sigma'')
  T *RZ, *RS, *RF, *RG, *RdZ;      // RZ holds input_scale X vW^T on entry
};

// r_rows for one output (regression, binary logistic): R{S} and both output dot products in one pass over the row,
// the backward in a second, where k dot products and a combination over k would take four passes and two folds.
// At small widths the per-row work, not the arithmetic, is what an HVP's row pass costs.
template <class T>
__attribute__((always_inline)) inline void r_rows_single_output(const RRows<T>& p, int64_t r0, int64_t rows) {
  using V = typename Vec<T>::type;
  constexpr int64_t lanes = Vec<T>::lanes;
  const int64_t m = p.m;
  const T os = p.os, *vb = p.vb, *a = p.a, *va = p.va;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    T *RZ = p.RZ + r * m, *RS = p.RS + r * m, *RdZ = p.RdZ + r * m;
    const T *S = p.S + r * m, *D1 = p.D1 + r * m, *dS_D2 = p.dS_D2 + r * m;
    // R{Z} += vb and R{S} = sigma' R{Z} at column q (a V of columns, or one T), returning its share of a R{S} + va S.
    // Inlined by force: a lambda is not cloned with its caller, and a call from the AVX clone into a baseline-ISA
    // lambda would pass the vector under another ABI.
    auto forward = [&](int64_t q, auto lanes_of) __attribute__((always_inline)) {
      using U = decltype(lanes_of);
      U z = load<U>(RZ + q);
      if (vb) z += load<U>(vb + q);
      const U s = load<U>(D1 + q) * z;
      store(RZ + q, z);
      store(RS + q, s);
      return s * load<U>(a + q) + load<U>(S + q) * load<U>(va + q);
    };
    V even = {}, odd = {};  // alternate vectors, so consecutive additions do not wait on each other
    int64_t q = 0;
    for (; q + 2 * lanes <= m; q += 2 * lanes) {
      even += forward(q, V{});
      odd += forward(q + lanes, V{});
    }
    if (q + lanes <= m) {
      even += forward(q, V{});
      q += lanes;
    }
    T tail = T(0);
    for (; q < m; ++q) tail += forward(q, T{});
    p.RF[r] = os * (fold(even + odd) + tail);
    loss_row_hessian(p.loss, p.F + r, p.Y + r, 1, p.scale, p.RF + r, p.RG + r);
    const T RG = p.RG[r], G = p.G[r];
    auto backward = [&](int64_t c, auto lanes_of) __attribute__((always_inline)) {
      using U = decltype(lanes_of);
      const U RdS = RG * load<U>(a + c) + G * load<U>(va + c);
      store(RdZ + c, os * RdS * load<U>(D1 + c) + load<U>(dS_D2 + c) * load<U>(RZ + c));
    };
    q = 0;
    for (; q + lanes <= m; q += lanes) backward(q, V{});
    for (; q < m; ++q) backward(q, T{});
  }
}

// One pass over the rows of an HVP: R{Z} += vb; R{S} = sigma' R{Z}; R{F} = os (a R{S} + va S) (k dot products);
// R{G} = H_f R{F}; R{dZ} = os (R{G} a + G va) sigma' + dS sigma'' R{Z}.
template <class T>
__attribute__((always_inline)) inline void r_rows_impl(const RRows<T>& p, int64_t r0, int64_t rows) {
  if (p.k == 1) return r_rows_single_output(p, r0, rows);
  // Fields copied to locals: stores through the row pointers could otherwise alias them, forcing reloads.
  const int64_t m = p.m, k = p.k;
  const T os = p.os, *vb = p.vb, *a = p.a, *va = p.va;
  for (int64_t r = r0; r < r0 + rows; ++r) {
    T *RZ = p.RZ + r * m, *RS = p.RS + r * m, *RdZ = p.RdZ + r * m, *RF = p.RF + r * k, *RG = p.RG + r * k;
    const T *S = p.S + r * m, *D1 = p.D1 + r * m, *dS_D2 = p.dS_D2 + r * m, *G = p.G + r * k;
#pragma omp simd
    for (int64_t q = 0; q < m; ++q) {
      if (vb) RZ[q] += vb[q];
      RS[q] = D1[q] * RZ[q];
    }
    for (int64_t j = 0; j < k; ++j) RF[j] = os * (dot(m, RS, a + j * m) + dot(m, S, va + j * m));
    loss_row_hessian(p.loss, p.F + r * k, p.Y + r * k, k, p.scale, RF, RG);
    for_summed_columns<T>(
        k, m,
        [&](int64_t j, int64_t q, auto lanes) {
          using U = decltype(lanes);
          return RG[j] * load<U>(a + j * m + q) + G[j] * load<U>(va + j * m + q);
        },
        [&](int64_t q, auto RdS) {
          using U = decltype(RdS);
          store(RdZ + q, os * RdS * load<U>(D1 + q) + load<U>(dS_D2 + q) * load<U>(RZ + q));
        });
  }
}
PHYSAI_VECTOR_CLONES void r_rows(const RRows<float>& p, int64_t r0, int64_t rows) { r_rows_impl(p, r0, rows); }
PHYSAI_VECTOR_CLONES void r_rows(const RRows<double>& p, int64_t r0, int64_t rows) { r_rows_impl(p, r0, rows); }

// Z = input_scale * X_t W^T + b, then S = sigma(Z) in place of Z; D1 = sigma'(Z) and D2 = sigma''(Z) (if non-null).
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

// Column sums of rows x m, added to out (in a fixed order, so bitwise reproducible).
PHYSAI_VECTOR_CLONES void add_column_sums(const float* A, int64_t rows, int64_t m, float* out) {
  accumulate_all_columns(m, rows, 1.0f, [](int64_t) { return 1.0f; }, A, m, 1.0f, out);
}
PHYSAI_VECTOR_CLONES void add_column_sums(const double* A, int64_t rows, int64_t m, double* out) {
  accumulate_all_columns(m, rows, 1.0, [](int64_t) { return 1.0; }, A, m, 1.0, out);
}

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

template <class T>
T loss_scale(Loss loss, int64_t rows, int64_t k) {
  return loss == Loss::CrossEntropy ? T(1) / T(rows) : T(1) / (T(rows) * T(k));
}

// Output layer and loss of a tile from S_t = sigma(Z_t): F_t and G_t [rows, k], and the tile's loss summed in row
// order.
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

// Forward + loss + backward of one member; returns its loss. The loss is a mean over `mean_rows` rows (net.n, unless
// net is a block of a larger batch).
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

// Where the W, b (null without bias) and a parts start in a member's flattened [W, b, a] vector.
template <class T, class U>
std::array<U*, 3> param_parts(const Net<T>& net, U* flat) {
  const int64_t md = net.m * net.d;
  return {flat, net.b ? flat + md : nullptr, flat + md + (net.b ? net.m : 0)};
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

// A lone small member is cut into fixed blocks of rows that run in parallel, each computing its whole forward and
// backward pass into a gradient of its own; the blocks' gradients are then summed in block order. One fork/join per
// call instead of one per GEMM, and the cut depends only on the shapes, so the bits do not depend on the thread count.
// Larger members (work_of above kBlockedWork) split each GEMM instead (over_members), which needs no per-block
// gradient buffers.
constexpr int64_t kBlockRows = 128;
constexpr int64_t kBlockedWork = int64_t(1) << 26;

inline int64_t row_blocks(int64_t n) { return (n + kBlockRows - 1) / kBlockRows; }

// members: how many members the call has (blocks are for a lone member); member: the one-member net (or view).
template <class T>
bool use_row_blocks(int64_t members, const Net<T>& member) {
  return members == 1 && member.n > kBlockRows && work_of(member) < kBlockedWork;
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
  std::copy(partial.get(), partial.get() + P, out);
  for (int64_t block = 1; block < blocks; ++block) {
    const T* g = partial.get() + block * P;
#pragma omp simd
    for (int64_t i = 0; i < P; ++i) out[i] += g[i];
  }
}

// A member's flattened [W, b, a] vector into its three arrays.
template <class T>
void split_params(const Net<T>& net, const T* flat, T* W, T* b, T* a) {
  const auto [fW, fb, fa] = param_parts(net, flat);
  std::copy(fW, fW + net.m * net.d, W);
  if (b) std::copy(fb, fb + net.m, b);
  std::copy(fa, fa + net.k * net.m, a);
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

}  // namespace

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

template <class T>
HessianOperator<T>::HessianOperator(const Net<T>& net, const Targets<T>& targets) : net_(net), targets_(targets) {
  validate(net);
  const int64_t E = net.E, n = net.n, m = net.m, k = net.k;
  for (auto* cache : {&S_, &D1_, &dS_D2_, &dZ_}) cache->reset(new T[E * n * m]);
  F_.reset(new T[E * n * k]);
  G_.reset(new T[E * n * k]);
  loss_.resize(E);
  refresh();
}

template <class T>
void HessianOperator<T>::refresh() {
  over_members(net_.E, work_of(net_), [&](int64_t e, bool parallel) { refresh_member(e, parallel); });
}

template <class T>
void HessianOperator<T>::refresh_member(int64_t e, bool parallel) {
  const int64_t n = net_.n, m = net_.m, k = net_.k;
  T *S = S_.get() + e * n * m, *D1 = D1_.get() + e * n * m, *dS_D2 = dS_D2_.get() + e * n * m;
  T *F = F_.get() + e * n * k, *G = G_.get() + e * n * k, *dZ = dZ_.get() + e * n * m;
  hidden(net_, e, net_.X_of(e), n, S, D1, dS_D2, parallel);
  const auto row_loss = Scratch<T>(n);
  loss_[e] = loss_tile(net_, e, targets_.loss, static_cast<const T*>(S), targets_.Y_of(e, n, k), n,
                       loss_scale<T>(targets_.loss, n, k), F, G, row_loss.get(), parallel);
  over_row_tasks(n, parallel, [&](int64_t r0, int64_t count) {
    backprop_rows(count, m, k, net_.output_scale, G + r0 * k, net_.a_of(e), D1 + r0 * m, dZ + r0 * m,
                  dS_D2 + r0 * m);
  });
}

template <class T>
void HessianOperator<T>::apply_rows(int64_t e, int64_t row_begin, int64_t row_end, const T* v, T* out,
                                    bool parallel) const {
  const Net<T>& net = net_;
  const int64_t n = net.n, m = net.m, k = net.k, d = net.d, tile = tile_rows<T>(row_end - row_begin, m);
  // Plain pointers, not structured bindings: C++17 lambdas below cannot capture those.
  const std::array<const T*, 3> v_parts = param_parts(net, v);
  const std::array<T*, 3> out_parts = param_parts(net, out);
  const T *vW = v_parts[0], *vb = v_parts[1], *va = v_parts[2];
  T *oW = out_parts[0], *ob = out_parts[1], *oa = out_parts[2];
  const T *S = S_.get() + e * n * m, *D1 = D1_.get() + e * n * m, *dS_D2 = dS_D2_.get() + e * n * m;
  const T *F = F_.get() + e * n * k, *G = G_.get() + e * n * k;
  const T* Y = targets_.Y_of(e, n, k);
  const T* X = net.X_of(e);
  const T* a = net.a_of(e);
  const T scale = loss_scale<T>(targets_.loss, n, k), os = net.output_scale;
  const auto RZ = Scratch<T>(tile * m), RS = Scratch<T>(tile * m), RdZ = Scratch<T>(tile * m);
  const auto RF = Scratch<T>(tile * k), RG = Scratch<T>(tile * k);
  for (int64_t r0 = row_begin; r0 < row_end; r0 += tile) {
    const int64_t rows = std::min(tile, row_end - r0);
    const T beta = r0 == row_begin ? T(0) : T(1);
    const T *X_t = X + r0 * d, *S_t = S + r0 * m, *G_t = G + r0 * k;
    // R{Z} = input_scale X vW^T (+ vb in the row pass)
    gemm(parallel, Trans::No, Trans::Yes, rows, m, d, net.input_scale, X_t, d, vW, d, T(0), RZ.get(), m);
    const RRows<T> pass{targets_.loss, m,        k,        os,       scale,    vb,       a,
                        va,           S_t,      D1 + r0 * m, dS_D2 + r0 * m, F + r0 * k, Y + r0 * k, G_t,
                        RZ.get(),     RS.get(), RF.get(), RG.get(), RdZ.get()};
    over_row_tasks(rows, parallel, [&](int64_t q0, int64_t count) { r_rows(pass, q0, count); });
    // R{da} = os (R{G}^T S + G^T R{S})
    gemm(parallel, Trans::Yes, Trans::No, k, m, rows, os, RG.get(), k, S_t, m, beta, oa, m);
    gemm(parallel, Trans::Yes, Trans::No, k, m, rows, os, G_t, k, RS.get(), m, T(1), oa, m);
    // R{dW} = input_scale R{dZ}^T X ; R{db} = column sums of R{dZ}
    gemm(parallel, Trans::Yes, Trans::No, m, d, rows, net.input_scale, RdZ.get(), m, X_t, d, beta, oW, d);
    if (ob) {
      if (r0 == row_begin) std::fill(ob, ob + m, T(0));
      add_column_sums(RdZ.get(), rows, m, ob);
    }
  }
  if (row_end == row_begin) std::fill(out, out + net.params(), T(0));
}

template <class T>
void HessianOperator<T>::apply(const T* V, T* out) const {
  const int64_t P = net_.params();
  const int64_t n = net_.n;
  // Members whose row of V is zero (an eigensolver feeds those once a member has converged) get a zero product at
  // no cost, even where their caches are not finite; the others share the threads.
  std::vector<int64_t> busy;
  for (int64_t e = 0; e < net_.E; ++e) {
    if (std::all_of(V + e * P, V + (e + 1) * P, [](T x) { return x == T(0); }))
      std::fill(out + e * P, out + (e + 1) * P, T(0));
    else
      busy.push_back(e);
  }
  if (busy.empty()) return;
  if (use_row_blocks(net_.E, net_)) {
    sum_over_row_blocks(n, P, out, [&](int64_t r0, int64_t rows, T* partial) {
      apply_rows(0, r0, r0 + rows, V, partial, false);
    });
    return;
  }
  over_members(int64_t(busy.size()), work_of(net_), [&](int64_t i, bool parallel) {
    const int64_t e = busy[i];
    apply_rows(e, 0, n, V + e * P, out + e * P, parallel);
  });
}

template <class T>
void HessianOperator<T>::member_gradient(int64_t e, bool parallel, T* dW, T* db, T* da) const {
  const Net<T>& net = net_;
  const int64_t n = net.n, m = net.m, k = net.k, d = net.d;
  const T *S = S_.get() + e * n * m, *dZ = dZ_.get() + e * n * m, *G = G_.get() + e * n * k;
  gemm(parallel, Trans::Yes, Trans::No, k, m, n, net.output_scale, G, k, S, m, T(0), da, m);
  gemm(parallel, Trans::Yes, Trans::No, m, d, n, net.input_scale, dZ, m, net.X_of(e), d, T(0), dW, d);
  if (db) {
    std::fill(db, db + m, T(0));
    add_column_sums(dZ, n, m, db);
  }
}

// Lanczos (k pairs) or power iteration (the dominant pair) from csrc/spectrum on a batched matvec.
template <class T, class MatVec>
void eigensolve(bool use_lanczos, MatVec&& matvec, int64_t E, int64_t P, const spectrum::Options& options, const T* v0,
                T* values, T* vectors, int64_t* matvecs, uint8_t* converged, int64_t first_member = 0) {
  if (use_lanczos)
    spectrum::lanczos<T>(matvec, E, P, options, v0, values, vectors, matvecs, converged, first_member);
  else
    spectrum::power_iteration<T>(matvec, E, P, options, v0, values, vectors, matvecs, converged, first_member);
}

template <class T>
void hessian_eigs(const Net<T>& net, const Targets<T>& targets, const spectrum::Options& options, bool use_lanczos,
                  const T* v0, T* values, T* vectors, int64_t* matvecs, uint8_t* converged) {
  const HessianOperator<T> op(net, targets);
  for (int64_t e = 0; e < net.E; ++e)
    PHYSAI_REQUIRE(std::isfinite(double(op.loss(e))), "the loss of member ", e,
                   " is not finite (non-finite data or parameters), so its Hessian is undefined");
  eigensolve(use_lanczos, [&op](const T* V, T* out) { op.apply(V, out); }, net.E, net.params(), options, v0, values,
             vectors, matvecs, converged);
}

template <class T>
void train(const Net<T>& net, T* W, T* b, T* a, const Targets<T>& targets, const Schedule<T>& schedule, T* losses,
           const Tracking<T>& tracking) {
  validate(net);
  PHYSAI_REQUIRE(schedule.steps >= 0, "steps: expected >= 0, got ", schedule.steps);
  PHYSAI_REQUIRE(schedule.batch_size >= 0, "batch_size: expected >= 0, got ", schedule.batch_size);
  PHYSAI_REQUIRE(tracking.every >= 0, "track_sharpness_every: expected >= 0, got ", tracking.every);
  PHYSAI_REQUIRE(tracking.every == 0 || tracking.options.k == 1, "tracking: k must be 1");
  const int64_t E = net.E, n = net.n, m = net.m, k = net.k, d = net.d, P = net.params();
  const int64_t batch = schedule.batch_size > 0 ? std::min(schedule.batch_size, n) : n;
  const int64_t blocks = batch > 0 ? (n + batch - 1) / batch : 1;
  std::vector<T> dW(E * m * d), db(b ? E * m : 0), da(E * k * m);
  std::vector<T> eigenvector(tracking.every > 0 ? E * P : 0);
  std::vector<uint8_t> has_vector(E, 0);  // a member diverged at first has none until it recovers
  std::unique_ptr<HessianOperator<T>> tracked_operator;

  auto update = [&](int64_t e) {
    const T lr = schedule.lr[e];
    T *W_e = W + e * m * d, *a_e = a + e * k * m;
    const T *gW = dW.data() + e * m * d, *ga = da.data() + e * k * m;
    for (int64_t i = 0; i < m * d; ++i) W_e[i] -= lr * schedule.lr_W * gW[i];
    if (b)
      for (int64_t i = 0; i < m; ++i) b[e * m + i] -= lr * schedule.lr_b * db[e * m + i];
    for (int64_t i = 0; i < k * m; ++i) a_e[i] -= lr * schedule.lr_a * ga[i];
  };

  // Member e's loss and gradient on rows r0 .. r0 + rows, then its update. With full-batch training a tracked step's
  // gradient comes from the tracked operator's caches, so tracking costs only the HVPs.
  auto step_member = [&](int64_t step, int64_t e, bool parallel, int64_t r0, int64_t rows,
                         const HessianOperator<T>* tracked) {
    T *gW = dW.data() + e * m * d, *gb = b ? db.data() + e * m : nullptr, *ga = da.data() + e * k * m;
    if (tracked && rows == n) {
      losses[step * E + e] = tracked->loss(e);
      tracked->member_gradient(e, parallel, gW, gb, ga);
    } else {
      const Net<T> view = row_view(net, e, r0, rows);  // the member's mini-batch
      const T* Y = targets.Y_of(e, n, k) + r0 * k;
      losses[step * E + e] = use_row_blocks(E, view)
                                 ? blocked_loss_and_grad(view, Y, targets.loss, gW, gb, ga)
                                 : member_loss_and_grad(view, Y, targets.loss, 0, gW, gb, ga, parallel, rows);
    }
    update(e);
  };

  // Member e's top Hessian eigenpair, warm-started from its previous one (ones where that is not finite; the
  // solver's random start for member e until it has one). A member whose loss is no longer finite (diverged) gets
  // NaN and costs nothing.
  auto track_member = [&](int64_t row, int64_t e, bool parallel, const HessianOperator<T>& op) {
    tracking.sharpness[row * E + e] = std::numeric_limits<T>::quiet_NaN();
    tracking.matvecs[row * E + e] = 0;
    if (!std::isfinite(double(op.loss(e)))) return;
    T* vector = eigenvector.data() + e * P;
    std::vector<T> ones;
    const T* start = nullptr;
    if (has_vector[e]) {
      start = vector;  // the solver copies its start before it writes the new vector
      if (!std::all_of(vector, vector + P, [](T x) { return std::isfinite(double(x)); })) {
        ones.assign(P, T(1));
        start = ones.data();
      }
    }
    // A lone member keeps the whole operator (row blocks, split GEMMs); in an ensemble each member runs alone.
    auto matvec = [&](const T* V, T* out) {
      if (E == 1)
        op.apply(V, out);
      else
        op.apply_rows(e, 0, n, V, out, parallel);
    };
    T top;
    uint8_t converged;
    eigensolve(tracking.use_lanczos, matvec, 1, P, tracking.options, start, &top, vector,
               tracking.matvecs + row * E + e, &converged, e);
    tracking.sharpness[row * E + e] = top;
    has_vector[e] = 1;
  };

  for (int64_t step = 0; step < schedule.steps; ++step) {
    const int64_t r0 = (step % blocks) * batch, rows = std::min(batch, n - r0);
    if (tracking.every > 0 && step % tracking.every == 0) {
      const bool fresh = !tracked_operator;
      if (fresh) tracked_operator = std::make_unique<HessianOperator<T>>(net, targets);
      HessianOperator<T>& op = *tracked_operator;
      const int64_t row = step / tracking.every;
      // Each member's whole step (caches, eigensolve, gradient, update) in one parallel region: members are
      // independent, so a tracked step forks and joins once, like an untracked one. An exception must not leave
      // the region; the first, in member order, is rethrown after it.
      std::vector<std::exception_ptr> errors(E);
      over_members(E, work_of(net), [&](int64_t e, bool parallel) {
        try {
          if (!fresh) op.refresh_member(e, parallel);
          track_member(row, e, parallel, op);
          step_member(step, e, parallel, r0, rows, &op);
        } catch (...) {
          errors[e] = std::current_exception();
        }
      });
      for (auto& error : errors)
        if (error) std::rethrow_exception(error);
      continue;
    }
    over_members(E, work_of(net), [&](int64_t e, bool parallel) { step_member(step, e, parallel, r0, rows, nullptr); });
  }
}

#define PHYSAI_TWOLAYER_INSTANTIATE(T)                                                                      \
  template void validate<T>(const Net<T>&);                                                                 \
  template void forward<T>(const Net<T>&, T*);                                                              \
  template void backward<T>(const Net<T>&, const T*, T*, T*, T*, T*);                                       \
  template void loss_and_grad<T>(const Net<T>&, const Targets<T>&, T*, T*, T*, T*);                         \
  template class HessianOperator<T>;                                                                        \
  template void hessian_eigs<T>(const Net<T>&, const Targets<T>&, const spectrum::Options&, bool, const T*, T*, T*, \
                                int64_t*, uint8_t*);                                                        \
  template void train<T>(const Net<T>&, T*, T*, T*, const Targets<T>&, const Schedule<T>&, T*, const Tracking<T>&);

PHYSAI_TWOLAYER_INSTANTIATE(float)
PHYSAI_TWOLAYER_INSTANTIATE(double)

}  // namespace physai::twolayer
