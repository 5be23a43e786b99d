// Deterministic GEMM for the kernels: C = alpha op(A) op(B) + beta C, row-major, cut into fixed blocks of rows (or
// columns) that may run in parallel. Products with a tiny dimension (the k outputs of a network) run the plain-loop
// small GEMM below, which beats a BLAS call there; small widths run the register-blocked micro-kernels
// (microkernel.hpp), which skip BLAS's packing; the others call BLAS, single-threaded (set once when the module
// loads): OpenBLAS's own threading changes the rounding of some shapes with the thread count. The cut depends only
// on the shapes, and the path on the shapes and the CPU (its vectors and, for float, micro_large_float_limits), so
// the bits never depend on the thread count.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/blas.hpp"
#include "common/microkernel.hpp"
#include "common/threading.hpp"

namespace physai::gemm {

using blas::Trans;

// Dimensions of at most kSmallDim are tiny: a product along one is a memory-bound outer product, or dot products,
// where plain loops or the micro-kernels beat BLAS (path_of).
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

// The path every block of a product takes: the plain loops, the micro-kernels or BLAS, each of which sums in its own
// order. It is chosen from the shape of a full block (gemm below), never from the block at hand, so that an element
// of C gets the same bits whichever block it falls in: a row of a batch alone or in a longer batch, a hidden unit in
// a short last block of columns. (The forward of a tile shorter than the layer is wide, cut into blocks of columns,
// and the drop-in's forward, whole rows, still part where a block of columns fits the micro-kernels and the whole
// width does not: for X W^T in blocks of 64 columns, m > micro_transposed_side and either 8 < d <= 128 with
// m d > micro_transposed_values or 128 < d <= micro_transposed_side; S a^T likewise, with k outputs for m and m for
// d; and BLAS may sum a row by its place in a block.)
enum class Path { Plain, Micro, Blas };

// The plain loops take the tiny dimensions that suit them: A B^T with a few columns (a dot product per element),
// the others with a short sum (rows of C as combinations of a few rows of B) and A^T B with a few rows (the k
// outputs' gradient G^T S, where the micro-kernels made the E = 256 ensemble's loss + grad 1.3x slower, measured).
// Not A B with a few rows: its rows are a batch's, which the kernels cut into tiles of any height. The micro-kernels
// take the small products they fit, A B^T with a short sum at any N (beyond micro_fits), and A^T B or A B with a
// few columns (X W^T, dZ^T X and dZ W at d <= kSmallDim: as dot products of a few terms, and rows of a
// few lanes, the forward was 7-60x and the weight gradient 3-7x slower, measured at n = 1024, m = 256, d = 8 and 2).
// BLAS takes the rest.
template <class T>
Path path_of(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K) {
  const bool micro = micro_available();
  if (ta == Trans::No && tb == Trans::Yes) {
    if (K <= kSmallDim) return micro ? Path::Micro : Path::Plain;
    if (N <= kSmallDim) return Path::Plain;
    return micro && micro_fits<T>(ta, tb, N, K) ? Path::Micro : Path::Blas;
  }
  if (K <= kSmallDim || (ta == Trans::Yes && M <= kSmallDim)) return Path::Plain;
  if (micro && micro_fits<T>(ta, tb, N, K)) return Path::Micro;
  return N <= kSmallDim ? Path::Plain : Path::Blas;
}

// One block of a product, on the path that path_of gave a full block of it.
template <class T>
void block_gemm(Path path, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
                const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (path == Path::Plain)
    small_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  else if (path == Path::Micro)
    micro_gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  else
    blas::gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// C = alpha op(A) op(B) + beta C in blocks of kBlock (or kWideBlock) rows of C, or columns when C is wide and short,
// run in parallel when `parallel`.
template <class T>
void gemm(bool parallel, Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  // Every block on the path of a full block (the last may be shorter): the whole product's, or for blocks of
  // columns, whose width bounds what a block streams, a product of one block's width.
  if (M >= N) {
    const int64_t size = K * N >= kWideOperand ? kWideBlock : kBlock;
    const Path path = path_of<T>(ta, tb, M, N, K);
    over_rows((M + size - 1) / size, parallel, [&](int64_t block) {
      const int64_t i0 = block * size, rows = std::min(size, M - i0);
      const T* A_block = ta == Trans::No ? A + i0 * lda : A + i0;
      block_gemm(path, ta, tb, rows, N, K, alpha, A_block, lda, B, ldb, beta, C + i0 * ldc, ldc);
    });
  } else {
    const int64_t size = M * K >= kWideOperand ? kWideBlock : kBlock;
    const Path path = path_of<T>(ta, tb, M, std::min(N, size), K);
    over_rows((N + size - 1) / size, parallel, [&](int64_t block) {
      const int64_t j0 = block * size, cols = std::min(size, N - j0);
      const T* B_block = tb == Trans::No ? B + j0 : B + j0 * ldb;
      block_gemm(path, ta, tb, M, cols, K, alpha, A, lda, B_block, ldb, beta, C + j0, ldc);
    });
  }
}

}  // namespace physai::gemm
