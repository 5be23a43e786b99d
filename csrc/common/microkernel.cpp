// The register-blocked GEMM of microkernel.hpp. Every product becomes C = alpha A B + beta C with B read by rows
// (K x N): A^T B and A B as they are, A B^T through a copy of B^T in scratch, and A^T B with a few columns as its
// transpose B^T A. C is cut into tiles of R rows by NV vectors, whose R * NV accumulators stay in registers for the
// whole sum over K; per step l a tile loads NV vectors of B's row l and broadcasts R elements of A, so the
// multiply-adds outnumber the loads and never wait on each other. Columns past the last whole vector run as a
// one-vector tile whose loads and stores are masked, so the same vector instructions compute every element. The
// kernel is one template over the vector width, flattened into an entry point per instruction set (the GCC vector
// types of simd.hpp, at 64 bytes in the AVX-512 entry point).
#include "common/microkernel.hpp"

#include <immintrin.h>

#include <utility>

#include "common/scratch.hpp"
#include "common/simd.hpp"

namespace physai::gemm {

namespace {

using simd::load;
using simd::store;

// A vector of Bytes bytes of T.
template <class T, int Bytes>
struct Lanes {
  typedef T type __attribute__((vector_size(Bytes)));
  static constexpr int64_t count = Bytes / int64_t(sizeof(T));
};

using f32x16 = Lanes<float, 64>::type;
using f64x8 = Lanes<double, 64>::type;
using f32x8 = Lanes<float, 32>::type;
using f64x4 = Lanes<double, 32>::type;

// The first n lanes (0 < n < lanes) of a vector at p, the others zero, and the store of those lanes alone: masked
// moves, which touch no memory past them. Not forced inline: a function for AVX-512 cannot be forced into the generic
// templates below; the entry points flatten it into themselves.
#define PHYSAI_AVX512 __attribute__((target("arch=x86-64-v4")))
#define PHYSAI_AVX2 __attribute__((target("arch=x86-64-v3")))
PHYSAI_AVX512 inline f32x16 load_first(const float* p, int64_t n, f32x16) {
  return f32x16(_mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p));
}
PHYSAI_AVX512 inline f64x8 load_first(const double* p, int64_t n, f64x8) {
  return f64x8(_mm512_maskz_loadu_pd(__mmask8((1u << n) - 1), p));
}
PHYSAI_AVX512 inline void store_first(float* p, int64_t n, f32x16 v) {
  _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), __m512(v));
}
PHYSAI_AVX512 inline void store_first(double* p, int64_t n, f64x8 v) {
  _mm512_mask_storeu_pd(p, __mmask8((1u << n) - 1), __m512d(v));
}
PHYSAI_AVX2 inline __m256i first_floats(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
PHYSAI_AVX2 inline __m256i first_doubles(int64_t n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
PHYSAI_AVX2 inline f32x8 load_first(const float* p, int64_t n, f32x8) {
  return f32x8(_mm256_maskload_ps(p, first_floats(n)));
}
PHYSAI_AVX2 inline f64x4 load_first(const double* p, int64_t n, f64x4) {
  return f64x4(_mm256_maskload_pd(p, first_doubles(n)));
}
PHYSAI_AVX2 inline void store_first(float* p, int64_t n, f32x8 v) {
  _mm256_maskstore_ps(p, first_floats(n), __m256(v));
}
PHYSAI_AVX2 inline void store_first(double* p, int64_t n, f64x4 v) {
  _mm256_maskstore_pd(p, first_doubles(n), __m256d(v));
}

// Accumulators per tile: the vector registers (32 of 512 bits, 16 of 256 bits) less room for B's row and A's
// broadcast.
template <int Bytes>
constexpr int kAccumulators = Bytes == 64 ? 24 : 12;

// Rows R by NV vectors of C at C, from rows of A (A(i, l) at A[i lda + l], or A[l lda + i] when ATrans) and rows of
// B (ldb apart); when Partial, only the first `last` lanes of the last vector are C's (and B's).
template <class T, int Bytes, int R, int NV, bool ATrans, bool Partial>
PHYSAI_INLINE void tile(int64_t K, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
                        int64_t ldc, int64_t last) {
  using V = typename Lanes<T, Bytes>::type;
  constexpr int64_t L = Lanes<T, Bytes>::count;
  const auto load_vector = [last](const T* p, bool whole) { return whole ? load<V>(p) : load_first(p, last, V{}); };
  V acc[R][NV] = {};
  // Unrolled: in the flattened entry points GCC keeps this loop's counter on the stack, and a load, add and store of
  // it every step held A^T B back (the weight gradient's product 6-48% faster unrolled by 4, alternating in one
  // process; A B^T unchanged). The chains' order, and so the bits, stay as they are.
#pragma GCC unroll 4
  for (int64_t l = 0; l < K; ++l) {
    V b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = load_vector(B + l * ldb + v * L, !Partial || v < NV - 1);
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const T a = ATrans ? A[l * lda + r] : A[r * lda + l];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      T* c = C + r * ldc + v * L;
      const bool whole = !Partial || v < NV - 1;
      // C = round(alpha acc) + beta C, one fused multiply-add on every instruction set: which of the two products
      // of alpha acc + beta C GCC would fuse differs between them, so alpha acc goes through simd::opaque.
      const V scaled = simd::opaque(alpha * acc[r][v]);
      const V out = beta == T(0) ? scaled : scaled + beta * load_vector(c, whole);
      if (whole)
        store(c, out);
      else
        store_first(c, last, out);
    }
  }
}

// The largest power of two below r (r >= 2).
constexpr int power_below(int r) { return r <= 2 ? 1 : 2 * power_below((r + 1) / 2); }

// Rows [i, M) of a column block of NV vectors: tiles of R rows while they fit, then one tile of each power of two
// below R that the rest needs (its binary digits), so that a tile short of R still has several independent
// accumulators (halving 24 to 12, 6, 3, 1 left one-row tiles, bound by the latency of a single chain).
template <class T, int Bytes, int R, int NV, bool ATrans, bool Partial, bool Repeat = true>
PHYSAI_INLINE void rows(int64_t i, int64_t M, int64_t K, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
                        T beta, T* C, int64_t ldc, int64_t last) {
  for (int64_t tiles = 0; i + R <= M && (Repeat || tiles == 0); i += R, ++tiles) {
    const T* A_i = ATrans ? A + i : A + i * lda;
    tile<T, Bytes, R, NV, ATrans, Partial>(K, alpha, A_i, lda, B, ldb, beta, C + i * ldc, ldc, last);
  }
  constexpr int below = R > 1 ? power_below(R) : 1;
  if constexpr (R > 1)
    rows<T, Bytes, below, NV, ATrans, Partial, false>(i, M, K, alpha, A, lda, B, ldb, beta, C, ldc, last);
}

template <class T, int Bytes, int NV, bool ATrans, bool Partial = false>
PHYSAI_INLINE void column_block(int64_t M, int64_t K, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb,
                                T beta, T* C, int64_t ldc, int64_t last = 0) {
  rows<T, Bytes, kAccumulators<Bytes> / NV, NV, ATrans, Partial>(0, M, K, alpha, A, lda, B, ldb, beta, C, ldc, last);
}

// Whole vectors per column block: four with AVX-512's 32 registers; two with AVX2's 16, which four would overflow
// (three rows of accumulators, four vectors of B and a broadcast: measured 20% slower than two).
template <int Bytes>
constexpr int kBlockVectors = Bytes == 64 ? 4 : 2;

// C = alpha A B + beta C with B [K, N] by rows, ldb apart: column blocks of kBlockVectors whole vectors, one of the
// whole vectors left, and one of the columns past them.
template <class T, int Bytes, bool ATrans>
PHYSAI_INLINE void multiply(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
                            int64_t ldb, T beta, T* C, int64_t ldc) {
  constexpr int64_t L = Lanes<T, Bytes>::count, W = kBlockVectors<Bytes>;
  int64_t j = 0;
  for (; j + W * L <= N; j += W * L)
    column_block<T, Bytes, W, ATrans>(M, K, alpha, A, lda, B + j, ldb, beta, C + j, ldc);
  const int64_t vectors = (N - j) / L;
  if constexpr (W > 3)
    if (vectors == 3) column_block<T, Bytes, 3, ATrans>(M, K, alpha, A, lda, B + j, ldb, beta, C + j, ldc);
  if constexpr (W > 2)
    if (vectors == 2) column_block<T, Bytes, 2, ATrans>(M, K, alpha, A, lda, B + j, ldb, beta, C + j, ldc);
  if (vectors == 1) column_block<T, Bytes, 1, ATrans>(M, K, alpha, A, lda, B + j, ldb, beta, C + j, ldc);
  j += vectors * L;
  if (j < N) column_block<T, Bytes, 1, ATrans, true>(M, K, alpha, A, lda, B + j, ldb, beta, C + j, ldc, N - j);
}

// One stage of an L x L transpose in registers: within every 2H x 2H block of rows[], swap the off-diagonal H x H
// blocks (rows r and r + H exchange their columns with bit H set against those with it clear). The stages for
// H = L/2, ..., 1 together transpose the whole block, L shuffles each.
template <int H, class V, size_t... Q>
PHYSAI_INLINE void swap_blocks(V* rows, std::index_sequence<Q...>) {
  constexpr int L = sizeof...(Q);
#pragma GCC unroll 16
  for (int r = 0; r < L; ++r) {
    if (r & H) continue;
    const V a = rows[r], b = rows[r + H];
    rows[r] = __builtin_shufflevector(a, b, ((Q & H) ? L + Q - H : Q)...);
    rows[r + H] = __builtin_shufflevector(a, b, ((Q & H) ? L + Q : Q + H)...);
  }
}
template <int H, class V, size_t... Q>
PHYSAI_INLINE void transpose_stages(V* rows, std::index_sequence<Q...> lanes) {
  swap_blocks<H>(rows, lanes);
  if constexpr (H > 1) transpose_stages<H / 2>(rows, lanes);
}

// Bt [K, N] = B^T for B [N, K] by rows ldb apart: whole L x L blocks through registers (a scalar copy costs as much
// as the product itself at these sizes), the edges one element at a time.
template <class T, int Bytes>
PHYSAI_INLINE void transpose(int64_t N, int64_t K, const T* B, int64_t ldb, T* Bt) {
  using V = typename Lanes<T, Bytes>::type;
  constexpr int64_t L = Lanes<T, Bytes>::count;
  const int64_t N_whole = N / L * L, K_whole = K / L * L;
  for (int64_t j = 0; j < N_whole; j += L)
    for (int64_t l = 0; l < K_whole; l += L) {
      V rows[L];
#pragma GCC unroll 16
      for (int64_t r = 0; r < L; ++r) rows[r] = load<V>(B + (j + r) * ldb + l);
      transpose_stages<L / 2>(rows, std::make_index_sequence<L>());
#pragma GCC unroll 16
      for (int64_t r = 0; r < L; ++r) store(Bt + (l + r) * N + j, rows[r]);
    }
  for (int64_t l = 0; l < K; ++l)
    for (int64_t j = l < K_whole ? N_whole : 0; j < N; ++j) Bt[l * N + j] = B[j * ldb + l];
}

template <class T, int Bytes>
PHYSAI_INLINE void micro_gemm_impl(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                                   int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (ta == Trans::Yes && N <= kNarrowColumns) {
    // A few columns would fill a sliver of each vector: C^T = B^T A runs its tiles along M instead (a full vector of
    // rows of C per load of A), into scratch, then back with beta C. Each element is still one chain over l in order.
    const Scratch<T> Ct(N * M);
    multiply<T, Bytes, true>(N, M, K, alpha, B, ldb, A, lda, T(0), Ct.get(), M);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        const T scaled = Ct[j * M + i];
        C[i * ldc + j] = beta == T(0) ? scaled : scaled + beta * C[i * ldc + j];
      }
  } else if (ta == Trans::Yes) {
    multiply<T, Bytes, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else if (tb == Trans::No) {
    multiply<T, Bytes, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    const Scratch<T> Bt(K * N);
    transpose<T, Bytes>(N, K, B, ldb, Bt.get());
    multiply<T, Bytes, false>(M, N, K, alpha, A, lda, Bt.get(), N, beta, C, ldc);
  }
}

// flatten: the masked moves, which cannot be forced into the generic templates, are inlined here.
#define PHYSAI_MICRO_ENTRY(T, ISA, BYTES)                                                                    \
  __attribute__((target("arch=" ISA), flatten)) void micro_gemm_##BYTES(                                    \
      Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,   \
      int64_t ldb, T beta, T* C, int64_t ldc) {                                                              \
    micro_gemm_impl<T, BYTES>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);                       \
  }
PHYSAI_MICRO_ENTRY(float, "x86-64-v4", 64)
PHYSAI_MICRO_ENTRY(double, "x86-64-v4", 64)
PHYSAI_MICRO_ENTRY(float, "x86-64-v3", 32)
PHYSAI_MICRO_ENTRY(double, "x86-64-v3", 32)
#undef PHYSAI_MICRO_ENTRY

// The vector width of this CPU's entry point: 64 bytes (AVX-512), 32 (AVX2/FMA), or 0 (none).
const int kVectorBytes = __builtin_cpu_supports("x86-64-v4") ? 64 : __builtin_cpu_supports("x86-64-v3") ? 32 : 0;

template <class T>
bool dispatch(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
              int64_t ldb, T beta, T* C, int64_t ldc) {
  if (kVectorBytes == 64)
    micro_gemm_64(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  else if (kVectorBytes == 32)
    micro_gemm_32(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  return kVectorBytes != 0;
}

// Zen or Zen+ (gcc's znver1: AMD family 17h before Zen 2), whose float products take the larger limits.
const bool kZen1 = kVectorBytes == 32 && __builtin_cpu_is("znver1");

}  // namespace

bool micro_available() { return kVectorBytes != 0; }
bool micro_large_float_limits() { return kVectorBytes == 64 || kZen1; }
int micro_vector_bytes() { return kVectorBytes; }

bool micro_gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  return dispatch(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
bool micro_gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  return dispatch(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace physai::gemm
