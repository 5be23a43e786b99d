// The small GEMM of gemm.hpp: rows of A against rows of B as dot products, or rows of C as combinations of the rows
// of B, with the fixed-order vector helpers of simd.hpp. Cloned for AVX-512 and AVX2/FMA CPUs.
#include "common/gemm.hpp"

#include "common/simd.hpp"

namespace physai::gemm {

namespace {

template <class T>
PHYSAI_INLINE void small_gemm_impl(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                                   int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (ta == Trans::No && tb == Trans::Yes) {  // rows of A against rows of B: dot products
      for (int64_t j = 0; j < N; ++j)
        c[j] = (beta == T(0) ? T(0) : beta * c[j]) + alpha * simd::dot(K, A + i * lda, B + j * ldb);
    } else if (tb == Trans::No) {  // a combination of the rows of B
      const auto coef = [&](int64_t l) { return ta == Trans::No ? A[i * lda + l] : A[l * lda + i]; };
      simd::accumulate_all_columns(N, K, alpha, coef, B, ldb, beta, c);
    } else {  // op(A)^T op(B)^T, which no kernel asks for at small sizes: plain loops
      for (int64_t j = 0; j < N; ++j) {
        T sum = T(0);
        for (int64_t l = 0; l < K; ++l) sum += A[l * lda + i] * B[j * ldb + l];
        c[j] = (beta == T(0) ? T(0) : beta * c[j]) + alpha * sum;
      }
    }
  }
}

}  // namespace

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

}  // namespace physai::gemm
