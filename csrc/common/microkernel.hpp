// Register-blocked GEMM for the small products of the two-layer kernels (gemm.hpp's block_gemm routes them here):
// a block of C stays in vector registers while the sum over K streams A and B straight from memory, without the
// packing and call overhead that dominate a general BLAS at these sizes. Each element of C is one chain of
// multiply-adds over l = 0 .. K-1 in order, scaled once at the end, whatever its place in the register blocking or
// the tails: its bits depend on K and the CPU's instruction set only. AVX-512 CPUs use 512-bit vectors, AVX2/FMA
// CPUs 256-bit ones; older CPUs do not take this path. Which products come here depends on their shapes and on the
// CPU (micro_fits).
#pragma once
#include <cstdint>

#include "common/blas.hpp"

namespace physai::gemm {

using blas::Trans;

// A^T B with at most this many columns is computed as C^T = B^T A (microkernel.cpp), whose tiles run along M.
constexpr int64_t kNarrowColumns = 8;

// Whether this CPU runs the micro-kernels (AVX2 and FMA, or AVX-512).
bool micro_available();
// The width of the micro-kernels' vectors on this CPU, in bytes: 64 (AVX-512), 32 (AVX2/FMA) or 0 (none).
int micro_vector_bytes();

// Whether this CPU takes the larger float limits below: AVX-512 CPUs, and Zen and Zen+ (AMD family 17h before Zen 2,
// 256-bit vectors), where OpenBLAS's AVX2 sgemm ran the mid-sized products at 8-19 GFLOP/s on one core against the
// micro-kernels' 15-33 (an EPYC of the first generation, measured). Other AVX2 CPUs keep the smaller ones.
bool micro_large_float_limits();

// Float on a CPU of micro_large_float_limits: the case whose larger limits below were measured to pay.
template <class T>
bool micro_large_limits() {
  return sizeof(T) == 4 && micro_large_float_limits();
}

// A B^T (X W^T, the pre-activation) with a sum of at most 128 terms and at most this many values in B (N K, the
// weights) runs the micro-kernels, which first transpose B into scratch: more where micro_large_limits holds than
// elsewhere. Measured single-threaded on a Zen 5, 2048 rows of A in blocks of 64 (gemm.hpp's), micro / OpenBLAS
// speed at N K = 8192, 16384, 32768 (K = 128) and 32768 (K = 64): float with 512-bit vectors 1.3, 1.1, 1.1, 1.0
// against OpenBLAS's AVX-512 (SkylakeX) kernels (0.75 at 65536) and 1.4-2.0 against its AVX2 (Haswell) ones; float
// with 256-bit vectors (forced) 1.1, 0.9, 0.8, 0.6 against Haswell; double with 512-bit vectors 1.3, 0.9, 0.8, 0.6
// against SkylakeX. (On Sapphire Rapids, earlier: 1.2 to 1.7 up to 8192, 1.0 at 16384.) On a Zen (first-generation
// EPYC, 256-bit vectors, OpenBLAS's Haswell kernels), 64 rows, float: 1.8-2.7 at N K = 16384, 1.3-2.7 at 32768 (K = 64
// or 128); double 1.2-1.4 at 16384 but 0.9-1.0 at K = 200, so double stays with the smaller limit there too.
template <class T>
int64_t micro_transposed_values() {
  return micro_large_limits<T>() ? int64_t(1) << 15 : int64_t(1) << 13;
}

// A B^T at most this wide (N) with a sum of at most this many terms (K) runs the micro-kernels too, at any N K
// within (X W^T of up to 256 inputs into up to 256 hidden units, S a^T of up to 256 hidden units into more outputs
// than the loops take): what the width costs is B's transposed rows, N values each, streamed once per step of the
// sum. Float with 512-bit vectors, on the same Zen 5, 64 or 256 rows: 1.0-1.26x OpenBLAS's SkylakeX kernels and
// 1.7-2.2x its Haswell ones at N from 64 to 256 and K from 128 to 320 (N = 512: 0.87-0.94x SkylakeX at K = 128);
// float with 256-bit vectors (forced) 0.74-0.92x Haswell and double 0.83-1.05x SkylakeX at N = 256, K = 200 or 256,
// so they keep the limits above alone (0: none). On a Zen, float: 2.9-4.2x Haswell at N = 256, K = 200-256, and
// 1.2-2.4x at N = 512, K = 64-128 (0.7-0.8x at N = 1024, K = 100).
template <class T>
int64_t micro_transposed_side() {
  return micro_large_limits<T>() ? 256 : 0;
}

// A^T B and A B (the weight gradient dZ^T X over a step of rows, the input gradient dZ W) with at most 256 columns,
// a sum of at most 2048 terms and at most this many values in B (N K): beyond, a block's strip of A falls out of L2
// while B streams. Measured single-threaded on Sapphire Rapids against OpenBLAS, float and double: 0.9 to 1.4x as
// fast up to N K = 2^17. On a Zen 5 (1 MiB of L2), micro / OpenBLAS speed for float with 512-bit vectors at N K =
// 2^17 / 2^18 / 2^19, A^T B with 64 or 128 rows and A B with 256: 1.1-1.3 / 0.9-1.1 / 0.7-0.85 against OpenBLAS's
// AVX-512 (SkylakeX) kernels, 1.9-2.1 / 1.5-1.8 / 1.2-1.3 against its AVX2 (Haswell) ones; float with 256-bit
// vectors (forced) 0.95-0.97 / 0.71-0.77 against Haswell; double with 512-bit vectors 0.9-1.06 / 0.76-0.9 against
// SkylakeX. On a Zen, 256-bit vectors against Haswell: float 1.5-2.6 / 1.7-2.8 / 1.9-3.0, double 0.6-1.0 at 2^16 and
// 0.4-0.85 at 2^18 (double keeps the limit measured on the CPUs above).
template <class T>
int64_t micro_values() {
  return micro_large_limits<T>() ? int64_t(1) << 18 : int64_t(1) << 17;
}

// Whether the micro-kernels take C = alpha op(A) op(B) + beta C: from N and K only (gemm.hpp's path_of asks for a
// full block of a product, never for the block at hand). A B^T: up to micro_transposed_values or within
// micro_transposed_side; A^T B and A B: up to micro_values, where inside the two-layer kernels they also give each
// element a fixed order. A^T B with at most kNarrowColumns columns streams A along its rows once per tile of C^T's
// rows, whatever K, so any K fits.
template <class T>
bool micro_fits(Trans ta, Trans tb, int64_t N, int64_t K) {
  if (ta == Trans::Yes && tb == Trans::Yes) return false;
  if (tb == Trans::Yes) {
    const int64_t side = micro_transposed_side<T>();
    return (K <= 128 && N * K <= micro_transposed_values<T>()) || (N <= side && K <= side);
  }
  if (ta == Trans::Yes && N <= kNarrowColumns) return true;
  return K <= 2048 && N <= 256 && N * K <= micro_values<T>();
}

// C = alpha op(A) op(B) + beta C for the products gemm.hpp's path_of sends here (row-major, leading dimensions as
// in BLAS; C is not read when beta is 0). Returns false, leaving C alone, on CPUs without AVX2 and FMA.
bool micro_gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
bool micro_gemm(Trans ta, Trans tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

}  // namespace physai::gemm
