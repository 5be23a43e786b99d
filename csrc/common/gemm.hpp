// Deterministic GEMM for the kernels: C = alpha op(A) op(B) + beta C, row-major, cut into fixed blocks of rows (or
// columns) that may run in parallel. Blocks whose smallest dimension is tiny (the k outputs of a network) run the
// plain-loop small GEMM below, which beats a BLAS call there; small widths run the register-blocked micro-kernels
// (microkernel.hpp), which skip BLAS's packing; the others call BLAS, single-threaded (set once when the module
// loads): OpenBLAS's own threading changes the rounding of some shapes with the thread count. The cut depends only
// on the shapes, so the bits never depend on the thread count.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/blas.hpp"
#include "common/microkernel.hpp"
#include "common/threading.hpp"

namespace physai::gemm {

using blas::Trans;

// GEMMs with a dimension of at most kSmallDim are memory-bound outer products or dot products: plain loops beat BLAS.
constexpr int64_t kSmallDim = 8;
// Rows (or columns) of C per block of a split GEMM.
constexpr int64_t kBlock = 64;
// Blocks of a product whose operand read whole by every block (B for row blocks, A for column blocks) has at least
// kWideOperand elements are kWideBlock long: each block's BLAS call packs that operand again, which at 64 rows cost
// ~18% of the large two-layer loss + grad (n = 4096, d = m = 1024) in OpenBLAS's copy routines (perf, measured).
constexpr int64_t kWideBlock = 512;
constexpr int64_t kWideOperand = int64_t(1) << 18;

// ---------------------------------------------------------------------------------------------------------------
// Small GEMM: plain loops, cloned for AVX-512 and AVX2/FMA (gemm.cpp)
// ---------------------------------------------------------------------------------------------------------------

void small_gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void small_gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

// ---------------------------------------------------------------------------------------------------------------
// One block, then the blocked product
// ---------------------------------------------------------------------------------------------------------------

// One block. The plain loops take the products whose tiny dimension suits them: A B^T with a few columns (a dot
// product per element: the k outputs S a^T), the others with a tiny M or K (rows of C as combinations of a few rows
// of B: the output layer's G a, the k outputs' gradient G^T S, where the micro-kernels made the E = 256 ensemble's
// loss + grad 1.3x slower, measured). The micro-kernels take the small products they fit, whatever M, including
// A B^T with a short sum and A^T B or A B with a few columns (X W^T, dZ^T X and dZ W at d <= kSmallDim: as dot
// products of a few terms, and rows of a few lanes, the forward was 7-60x and the weight gradient 3-7x slower,
// measured at n = 1024, m = 256, d = 8 and 2). Their bits do not depend on M, so a row of a batch gets the same
// bits in a block of any height (a short last block of a split product agrees with the same rows computed whole, as
// the drop-in's forward computes them). BLAS takes the rest.
template <class T>
void block_gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
                int64_t ldb, T beta, T* C, int64_t ldc) {
  const bool ab_t = ta == Trans::No && tb == Trans::Yes;
  if (ab_t ? N <= kSmallDim : std::min(M, K) <= kSmallDim)
    small_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  else if (M > 0 && micro_fits(ta, tb, N, K) && micro_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc))
    return;
  else if (std::min(M, N) <= kSmallDim)
    small_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  else
    blas::gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// C = alpha op(A) op(B) + beta C in blocks of kBlock (or kWideBlock) rows of C, or columns when C is wide and short,
// run in parallel when `parallel`.
template <class T>
void gemm(bool parallel, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M >= N) {
    const int64_t size = K * N >= kWideOperand ? kWideBlock : kBlock;
    over_rows((M + size - 1) / size, parallel, [&](int64_t block) {
      const int64_t i0 = block * size, rows = std::min(size, M - i0);
      const T* A_block = ta == Trans::No ? A + i0 * lda : A + i0;
      block_gemm(ta, tb, rows, N, K, alpha, A_block, lda, B, ldb, beta, C + i0 * ldc, ldc);
    });
  } else {
    const int64_t size = M * K >= kWideOperand ? kWideBlock : kBlock;
    over_rows((N + size - 1) / size, parallel, [&](int64_t block) {
      const int64_t j0 = block * size, cols = std::min(size, N - j0);
      const T* B_block = tb == Trans::No ? B + j0 : B + j0 * ldb;
      block_gemm(ta, tb, M, cols, K, alpha, A, lda, B_block, ldb, beta, C + j0, ldc);
    });
  }
}

}  // namespace physai::gemm
