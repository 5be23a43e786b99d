// The elementwise row kernels of the two-layer passes: the activation with its derivatives, the output layer with
// the loss, and the chain rule back into the hidden layer, for a run of rows that is still in cache. Each is a
// plain overload for float and double cloned for AVX-512 and AVX2/FMA (rows.cpp), around an always-inline template
// in which the activation is a template parameter, so the loops have no branches and vectorise.
#pragma once
#include <cstdint>

#include "twolayer/math.hpp"

namespace physai::twolayer::detail {

// S = sigma(Z + b) in place of Z, D1 = sigma'(...) and D2 = sigma''(...) (each when non-null; D2 only with D1), for
// rows x m values.
void activate_rows(Activation act, int64_t rows, int64_t m, float* z, const float* b, float* D1, float* D2);
void activate_rows(Activation act, int64_t rows, int64_t m, double* z, const double* b, double* D1, double* D2);

// The output layer and the loss: F = os S a^T, summed as output_layer_rows sums it (so the outputs have the same bits
// on every path), then each row's loss term, which writes G_r (already scaled for the mean) into row_loss[r].
void output_rows(Loss loss, int64_t rows, int64_t m, int64_t k, float os, const float* S, const float* a,
                 const float* Y, float scale, float* F, float* G, float* row_loss);
void output_rows(Loss loss, int64_t rows, int64_t m, int64_t k, double os, const double* S, const double* a,
                 const double* Y, double scale, double* F, double* G, double* row_loss);

// The output layer alone, F = os S a^T for rows x k outputs (rows of S and a of length m), in blocks of rows x
// outputs held in registers across the sum over m (8 x 1 for one output, 3 x 4 for m >= 128 and k >= 4, else 4 x 2),
// whose sums fold a vector of them at once: a small k makes that product too thin for BLAS's kernels, and one dot
// product at a time waits on its own sum. Every output is summed the same way whatever its block.
void output_layer_rows(int64_t rows, int64_t m, int64_t k, float os, const float* S, const float* a, float* F);
void output_layer_rows(int64_t rows, int64_t m, int64_t k, double os, const double* S, const double* a, double* F);

// The chain rule through both layers, row by row: dS_r = os sum_j G_rj a_j, dZ_r = dS_r sigma'_r (dZ may be D1, to
// write in place) and, when D2 is given, D2_r *= dS_r (the curvature term dS sigma'' of the Hessian).
void backprop_rows(int64_t rows, int64_t m, int64_t k, float os, const float* G, const float* a, const float* D1,
                   float* dZ, float* D2);
void backprop_rows(int64_t rows, int64_t m, int64_t k, double os, const double* G, const double* a, const double* D1,
                   double* dZ, double* D2);

// One output (k = 1), a tile's backward in one pass over it: dZ = sigma' times os G_r a (backprop_rows), da = os G^T S
// + beta da and, with db, db += the column sums of dZ, each value with the bits of backprop_rows, small_gemm and
// add_column_sums, which take three passes (and their loop and call overheads). sigma' is read from D1 (dZ may be
// D1, to write in place), or with D1 null from S (relu, tanh and linear only: slope_from_value in kernels.hpp; the
// activation pass then need not write D1, and this pass reads S alone).
void backprop_single_output_sums(Activation act, int64_t rows, int64_t m, float os, const float* G, const float* a,
                                 const float* S, const float* D1, float* dZ, float beta, float* da, float* db);
void backprop_single_output_sums(Activation act, int64_t rows, int64_t m, double os, const double* G,
                                 const double* a, const double* S, const double* D1, double* dZ, double beta,
                                 double* da, double* db);

// The chain rule into the hidden layer that a forward saved (backward_saved), for `cols` hidden units (a block of
// columns) of each row: dZ_r = os (sum_j G_rj a_j) sigma'_r. G is [rows, k]; a, S, D1 and dZ point at the block's
// first column, with row strides lda, ld (S and D1) and ldz. D1 null: sigma' from S (relu, tanh and linear only:
// slope_from_value in kernels.hpp). k > 2: four rows at a time, each vector of a loaded once for the four.
void backprop_saved_rows(Activation act, int64_t rows, int64_t cols, int64_t k, float os, const float* G,
                         const float* a, int64_t lda, const float* S, const float* D1, int64_t ld, float* dZ,
                         int64_t ldz);
void backprop_saved_rows(Activation act, int64_t rows, int64_t cols, int64_t k, double os, const double* G,
                         const double* a, int64_t lda, const double* S, const double* D1, int64_t ld,
                         double* dZ, int64_t ldz);

// Column sums of rows x m (row stride ld, m when omitted), added to out (in a fixed order, so bitwise reproducible):
// the bias gradient.
void add_column_sums(const float* A, int64_t rows, int64_t m, float* out, int64_t ld = -1);
void add_column_sums(const double* A, int64_t rows, int64_t m, double* out, int64_t ld = -1);

}  // namespace physai::twolayer::detail
