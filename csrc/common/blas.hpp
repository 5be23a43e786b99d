// Thin typed wrappers over the prefixed CBLAS of scipy-openblas32 (row-major throughout), so kernels are
// written once as templates over float/double.
#pragma once
#include <cblas.h>

#include <cstdint>

namespace physai::blas {

enum class Trans { No, Yes };

inline CBLAS_TRANSPOSE cblas_trans(Trans t) { return t == Trans::Yes ? CblasTrans : CblasNoTrans; }

// C[M,N] = alpha * op(A)[M,K] op(B)[K,N] + beta * C, row-major with leading dimensions.
inline void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                 const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, cblas_trans(ta), cblas_trans(tb), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
inline void gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                 const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  scipy_cblas_dgemm(CblasRowMajor, cblas_trans(ta), cblas_trans(tb), M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// `count` independent GEMMs whose operands are `stride*` elements apart (ensembles of networks).
inline void gemm_batch_strided(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                               int64_t lda, int64_t stride_a, const float* B, int64_t ldb, int64_t stride_b,
                               float beta, float* C, int64_t ldc, int64_t stride_c, int64_t count) {
  scipy_cblas_sgemm_batch_strided(CblasRowMajor, cblas_trans(ta), cblas_trans(tb), M, N, K, alpha, A, lda, stride_a,
                                  B, ldb, stride_b, beta, C, ldc, stride_c, count);
}
inline void gemm_batch_strided(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
                               int64_t lda, int64_t stride_a, const double* B, int64_t ldb, int64_t stride_b,
                               double beta, double* C, int64_t ldc, int64_t stride_c, int64_t count) {
  scipy_cblas_dgemm_batch_strided(CblasRowMajor, cblas_trans(ta), cblas_trans(tb), M, N, K, alpha, A, lda, stride_a,
                                  B, ldb, stride_b, beta, C, ldc, stride_c, count);
}

inline int num_threads() { return scipy_openblas_get_num_threads(); }
inline void set_num_threads(int n) { scipy_openblas_set_num_threads(n); }
inline const char* config() { return scipy_openblas_get_config(); }

// BLAS threads for a scope. Inside OpenMP-parallel loops BLAS must run single-threaded, or the two thread pools
// oversubscribe the cores; outside them it gets physai's thread count.
class ThreadsScope {
 public:
  explicit ThreadsScope(int threads) : previous_(num_threads()) { set_num_threads(threads); }
  ~ThreadsScope() { set_num_threads(previous_); }
  ThreadsScope(const ThreadsScope&) = delete;
  ThreadsScope& operator=(const ThreadsScope&) = delete;

 private:
  int previous_;
};

}  // namespace physai::blas
