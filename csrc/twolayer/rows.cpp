// Row kernels of rows.hpp. The templates are forced inline into the cloned entry points (a template is not cloned
// with its caller), so each clone vectorises them for its own instruction set.
#include "twolayer/rows.hpp"

#include "common/microkernel.hpp"
#include "common/simd.hpp"

namespace physai::twolayer::detail {

using simd::load;
using simd::store;

// ---------------------------------------------------------------------------------------------------------------
// Activation
// ---------------------------------------------------------------------------------------------------------------

namespace {

template <Activation A, class T>
PHYSAI_INLINE void activate_row(int64_t m, T* z, const T* b, T* D1, T* D2) {
  // z, b, D1 and D2 never overlap, so the loops are safe to vectorise as written. The derivatives not asked for are
  // dead code, which the compiler drops.
  if (D2) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) activate(A, z[j] + b[j], z[j], D1[j], D2[j]);
  } else if (D1) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      T dds;
      activate(A, z[j] + b[j], z[j], D1[j], dds);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      T ds, dds;
      activate(A, z[j] + b[j], z[j], ds, dds);
    }
  }
}

template <class T>
PHYSAI_INLINE void activate_row_any(Activation act, int64_t m, T* z, const T* b, T* D1, T* D2) {
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

}  // namespace

PHYSAI_VECTOR_CLONES
void activate_rows(Activation act, int64_t rows, int64_t m, float* z, const float* b, float* D1, float* D2) {
  for (int64_t r = 0; r < rows; ++r) activate_row_any(act, m, z + r * m, b, D1 ? D1 + r * m : nullptr, D2 ? D2 + r * m : nullptr);
}

PHYSAI_VECTOR_CLONES
void activate_rows(Activation act, int64_t rows, int64_t m, double* z, const double* b, double* D1, double* D2) {
  for (int64_t r = 0; r < rows; ++r) activate_row_any(act, m, z + r * m, b, D1 ? D1 + r * m : nullptr, D2 ? D2 + r * m : nullptr);
}

// ---------------------------------------------------------------------------------------------------------------
// Output layer and loss
// ---------------------------------------------------------------------------------------------------------------

namespace {

// The sum of a vector's lanes by neighbouring pairs, then pairs of those: ((v0+v1)+(v2+v3))+((v4+v5)+(v6+v7)) for
// 8 lanes, (v0+v1)+(v2+v3) for 4. fold_each computes it for `lanes` vectors at once (one result per lane) in the same
// order, so a sum gives the same bits whichever of the two folds it.
template <class V>
PHYSAI_INLINE auto fold_pairs(V v) {
  if constexpr (sizeof(v[0]) == 4) return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  else return (v[0] + v[1]) + (v[2] + v[3]);
}

// [a0+a1, a2+a3, b0+b1, b2+b3 | the same of lanes 4-7] (vhaddps).
PHYSAI_INLINE simd::Vec<float>::type add_pairs(simd::Vec<float>::type a, simd::Vec<float>::type b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
// [a0+a1, b0+b1, a2+a3, b2+b3] (vhaddpd).
PHYSAI_INLINE simd::Vec<double>::type add_pairs(simd::Vec<double>::type a, simd::Vec<double>::type b) {
  return __builtin_shufflevector(a, b, 0, 4, 2, 6) + __builtin_shufflevector(a, b, 1, 5, 3, 7);
}

PHYSAI_INLINE simd::Vec<float>::type fold_each(const simd::Vec<float>::type* v) {
  const auto low = add_pairs(add_pairs(v[0], v[1]), add_pairs(v[2], v[3]));
  const auto high = add_pairs(add_pairs(v[4], v[5]), add_pairs(v[6], v[7]));
  return __builtin_shufflevector(low, high, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(low, high, 4, 5, 6, 7, 12, 13, 14, 15);
}
PHYSAI_INLINE simd::Vec<double>::type fold_each(const simd::Vec<double>::type* v) {
  const auto h01 = add_pairs(v[0], v[1]), h23 = add_pairs(v[2], v[3]);
  return __builtin_shufflevector(h01, h23, 0, 1, 4, 5) + __builtin_shufflevector(h01, h23, 2, 3, 6, 7);
}

// F[r, j] = os S_r . a_j for R rows and J outputs: R x J vector sums, folded (a whole vector of them at a time, the
// rest one by one) and finished by the columns left over, in the same order for any R and J.
template <int R, int J, class T>
PHYSAI_INLINE void output_layer_block(int64_t m, int64_t k, T os, const T* S, const T* a, T* F) {
  using V = typename simd::Vec<T>::type;
  constexpr int64_t lanes = simd::Vec<T>::lanes;
  V sum[R * J] = {};
  int64_t q = 0;
  for (; q + lanes <= m; q += lanes) {
    V s[R];
    for (int r = 0; r < R; ++r) s[r] = load<V>(S + r * m + q);
    for (int j = 0; j < J; ++j) {
      const V w = load<V>(a + j * m + q);
      for (int r = 0; r < R; ++r) sum[r * J + j] += s[r] * w;
    }
  }
  if constexpr (R * J == lanes)
    if (q == m && J == k) {  // no columns left over, and the block's outputs are contiguous in F
      store(F, os * fold_each(sum));
      return;
    }
  T total[R * J];
  int i = 0;
  for (; i + lanes <= R * J; i += lanes) store(total + i, fold_each(sum + i));
  for (; i < R * J; ++i) total[i] = fold_pairs(sum[i]);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) {
      T t = total[r * J + j];
      // opaque: in some blocks GCC vectorised this loop into an in-order reduction (vmulpd, then vaddsd lane by
      // lane), unfused, and a row's output differed by the block it fell in (found at float64, m = 70, k = 1)
      for (int64_t p = q; p < m; ++p) t = simd::opaque(t + S[r * m + p] * a[j * m + p]);
      F[r * k + j] = os * t;
    }
}

// All the outputs of R rows: J at a time (J = 4 or 2), then two, then one.
template <int R, int J, class T>
PHYSAI_INLINE void output_layer_block_rows(int64_t m, int64_t k, T os, const T* S, const T* a, T* F) {
  int64_t j = 0;
  for (; j + J <= k; j += J) output_layer_block<R, J>(m, k, os, S, a + j * m, F + j);
  if constexpr (J > 2)
    for (; j + 2 <= k; j += 2) output_layer_block<R, 2>(m, k, os, S, a + j * m, F + j);
  if (j < k) output_layer_block<R, 1>(m, k, os, S, a + j * m, F + j);
}

// Blocks by shape (every output is summed in the same order whatever its block): one output, eight rows a block, so
// the sums fill whole vectors to fold; long rows (m >= 128) and four outputs or more, 3 rows x 4 outputs (7 loads for
// 12 multiply-adds); otherwise 4 rows x 2 outputs, whose 8 sums fold as one vector (short rows: the folds count).
template <class T>
PHYSAI_INLINE void output_layer_rows_impl(int64_t rows, int64_t m, int64_t k, T os, const T* S, const T* a, T* F) {
  int64_t r = 0;
  if (k == 1)
    for (; r + 8 <= rows; r += 8) output_layer_block<8, 1>(m, k, os, S + r * m, a, F + r * k);
  if (k >= 4 && m >= 128)
    for (; r + 3 <= rows; r += 3) output_layer_block_rows<3, 4>(m, k, os, S + r * m, a, F + r * k);
  for (; r + 4 <= rows; r += 4) output_layer_block_rows<4, 2>(m, k, os, S + r * m, a, F + r * k);
  for (; r < rows; ++r) output_layer_block_rows<1, 2>(m, k, os, S + r * m, a, F + r * k);
}

}  // namespace

PHYSAI_VECTOR_CLONES void output_layer_rows(int64_t rows, int64_t m, int64_t k, float os, const float* S,
                                            const float* a, float* F) {
  output_layer_rows_impl(rows, m, k, os, S, a, F);
}
PHYSAI_VECTOR_CLONES void output_layer_rows(int64_t rows, int64_t m, int64_t k, double os, const double* S,
                                            const double* a, double* F) {
  output_layer_rows_impl(rows, m, k, os, S, a, F);
}

namespace {

// The loss of every row, its switch decided once for all of them.
template <Loss L, class T>
PHYSAI_INLINE void loss_rows(int64_t rows, int64_t k, const T* F, const T* Y, T scale, T* G, T* row_loss) {
  if (k == 1) {  // the same expressions with k known, which vectorise across rows (those without calls)
#pragma omp simd
    for (int64_t r = 0; r < rows; ++r) row_loss[r] = loss_row(L, F + r, Y + r, 1, scale, G + r);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) row_loss[r] = loss_row(L, F + r * k, Y + r * k, k, scale, G + r * k);
}

// F as output_layer_rows computes it (so every path that computes an output gives the same bits), then the losses.
template <class T>
PHYSAI_INLINE void output_rows_impl(Loss loss, int64_t rows, int64_t m, int64_t k, T os, const T* S, const T* a,
                                    const T* Y, T scale, T* F, T* G, T* row_loss) {
  output_layer_rows_impl(rows, m, k, os, S, a, F);
  switch (loss) {
    case Loss::Mse: return loss_rows<Loss::Mse>(rows, k, F, Y, scale, G, row_loss);
    case Loss::Logistic: return loss_rows<Loss::Logistic>(rows, k, F, Y, scale, G, row_loss);
    case Loss::CrossEntropy: return loss_rows<Loss::CrossEntropy>(rows, k, F, Y, scale, G, row_loss);
  }
}

}  // namespace

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

// ---------------------------------------------------------------------------------------------------------------
// Backward into the hidden layer
// ---------------------------------------------------------------------------------------------------------------

namespace {

// sigma' from sigma's value s (U: a Vec or one T), the same expressions as activate() applies to its own value.
template <Activation A, class U>
PHYSAI_INLINE U slope_of_value(U s) {
  const U zero = U{}, one = zero + 1;
  if constexpr (A == Activation::Relu) return s > zero ? one : zero;
  else if constexpr (A == Activation::Tanh) return one - s * s;
  else return one;
}

// body(source, slope), where slope(v) gives sigma' from v, the value at the same place of source: D1 itself, or
// with D1 null sigma' from S (relu, tanh and linear only: slope_from_value in kernels.hpp). Its lambdas and the
// bodies given to it are PHYSAI_INLINE_LAMBDA.
template <class T, class Body>
PHYSAI_INLINE void with_slope(Activation act, const T* S, const T* D1, Body&& body) {
  if (D1) return body(D1, [](auto d1) PHYSAI_INLINE_LAMBDA { return d1; });
  switch (act) {
    case Activation::Relu:
      return body(S, [](auto s) PHYSAI_INLINE_LAMBDA { return slope_of_value<Activation::Relu>(s); });
    case Activation::Tanh:
      return body(S, [](auto s) PHYSAI_INLINE_LAMBDA { return slope_of_value<Activation::Tanh>(s); });
    default:
      return body(S, [](auto s) PHYSAI_INLINE_LAMBDA { return slope_of_value<Activation::Linear>(s); });
  }
}

template <class T>
PHYSAI_INLINE void backprop_rows_impl(int64_t rows, int64_t m, int64_t k, T os, const T* G, const T* a, const T* D1,
                                      T* dZ, T* D2) {
  if (k == 1) {
    // dS_r = os (G_r a): a product, not a sum, so a row is one vectorised loop; the sum's per-row setup is what the
    // general path costs on rows of 32-64 values. dZ may be D1: each element is read before it is written.
    for (int64_t r = 0; r < rows; ++r) {
      const T g = G[r];
      const T* d1 = D1 + r * m;
      T* dz = dZ + r * m;
      if (D2) {
        T* d2 = D2 + r * m;
#pragma omp simd
        for (int64_t q = 0; q < m; ++q) {
          const T dS = os * (g * a[q]);
          dz[q] = d1[q] * dS;
          d2[q] *= dS;
        }
      } else {
#pragma omp simd
        for (int64_t q = 0; q < m; ++q) dz[q] = d1[q] * (os * (g * a[q]));
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* d1 = D1 + r * m;
    T *dz = dZ + r * m, *d2 = D2 ? D2 + r * m : nullptr;
    simd::for_combined_columns(k, m, G + r * k, a, [&](int64_t q, auto sum) {
      using U = decltype(sum);
      const U dS = os * sum;
      store(dz + q, load<U>(d1 + q) * dS);
      if (d2) store(d2 + q, load<U>(d2 + q) * dS);
    });
  }
}

}  // namespace

PHYSAI_VECTOR_CLONES void backprop_rows(int64_t rows, int64_t m, int64_t k, float os, const float* G, const float* a,
                                        const float* D1, float* dZ, float* D2) {
  backprop_rows_impl(rows, m, k, os, G, a, D1, dZ, D2);
}
PHYSAI_VECTOR_CLONES void backprop_rows(int64_t rows, int64_t m, int64_t k, double os, const double* G,
                                        const double* a, const double* D1, double* dZ, double* D2) {
  backprop_rows_impl(rows, m, k, os, G, a, D1, dZ, D2);
}

namespace {

// backprop_single_output_sums for the columns [j0, m) in blocks of Width vectors U (a Vec, or one T for the last
// columns), the sums of each block held in registers across all the rows: each value of dZ and each sum the same
// expressions, in the same order, as backprop_rows (k = 1) and simd::accumulate_columns (the column sums of
// small_gemm's G^T S and of add_column_sums: even and odd rows apart, added at the end). sigma' is slope(v) of the
// value v at the same place of source (with_slope). Returns where the full blocks end.
template <class U, int Width, class T, class Slope>
PHYSAI_INLINE int64_t backprop_sums_columns(int64_t j0, int64_t rows, int64_t m, T os, const T* G, const T* a,
                                            const T* S, const T* source, Slope& slope, T* dZ, T beta, T* da,
                                            T* db) {
  constexpr int64_t lanes = sizeof(U) / sizeof(T), cols = lanes * Width;
  for (; j0 + cols <= m; j0 += cols) {
    U av[Width], da_even[Width] = {}, da_odd[Width] = {}, db_even[Width] = {}, db_odd[Width] = {};
    for (int w = 0; w < Width; ++w) av[w] = load<U>(a + j0 + w * lanes);
    const auto row = [&](int64_t l, U* da_sum, U* db_sum) PHYSAI_INLINE_LAMBDA {
      const T g = G[l];
      for (int w = 0; w < Width; ++w) {
        const int64_t at = l * m + j0 + w * lanes;
        const U dz = slope(load<U>(source + at)) * (os * (g * av[w]));
        store(dZ + at, dz);
        da_sum[w] += g * load<U>(S + at);
        db_sum[w] += dz;
        if constexpr (lanes == 1) da_sum[w] = simd::opaque(da_sum[w]), db_sum[w] = simd::opaque(db_sum[w]);
      }
    };
    int64_t l = 0;
    for (; l + 2 <= rows; l += 2) {
      row(l, da_even, db_even);
      row(l + 1, da_odd, db_odd);
    }
    if (l < rows) row(l, da_even, db_even);
    for (int w = 0; w < Width; ++w) {
      T* out = da + j0 + w * lanes;
      const U sum = simd::unfused(os * (da_even[w] + da_odd[w]));
      store(out, beta == T(0) ? sum : sum + beta * load<U>(out));
      if (db) {
        T* bias = db + j0 + w * lanes;
        store(bias, (db_even[w] + db_odd[w]) + load<U>(bias));
      }
    }
  }
  return j0;
}

template <class T>
PHYSAI_INLINE void backprop_single_output_sums_impl(Activation act, int64_t rows, int64_t m, T os, const T* G,
                                                    const T* a, const T* S, const T* D1, T* dZ, T beta, T* da,
                                                    T* db) {
  using V = typename simd::Vec<T>::type;
  // Blocks of four vectors (of one AVX2 register each) where AVX-512's 32 vector registers hold their 20 (a, and the
  // even and odd sums) and the tile's S and dZ overflow 32 KiB of L1: each row's cache lines are visited half as
  // often. Measured on an Intel Xeon with 48 KiB of L1 (AVX-512), float: 20% faster at rows x m = 256 x 64, 16-25% at
  // 128 x 64 and 256 x 32, 10% in double; 10% slower at 128 x 32, in L1; AVX2's clone on the same CPU, 16 registers,
  // was 35% slower with four. The blocks do not change the bits: every column is summed on its own, in the same
  // expressions (the row lambda inline, the sum unfused, whatever the block).
  const bool four = gemm::micro_vector_bytes() == 64 && 2 * rows * m * int64_t(sizeof(T)) > (int64_t(32) << 10);
  with_slope(act, S, D1, [&](const T* source, auto slope) PHYSAI_INLINE_LAMBDA {
    int64_t j = four ? backprop_sums_columns<V, 4>(0, rows, m, os, G, a, S, source, slope, dZ, beta, da, db) : 0;
    j = backprop_sums_columns<V, 2>(j, rows, m, os, G, a, S, source, slope, dZ, beta, da, db);
    j = backprop_sums_columns<V, 1>(j, rows, m, os, G, a, S, source, slope, dZ, beta, da, db);
    backprop_sums_columns<T, 1>(j, rows, m, os, G, a, S, source, slope, dZ, beta, da, db);
  });
}

}  // namespace

PHYSAI_VECTOR_CLONES void backprop_single_output_sums(Activation act, int64_t rows, int64_t m, float os,
                                                      const float* G, const float* a, const float* S,
                                                      const float* D1, float* dZ, float beta, float* da, float* db) {
  backprop_single_output_sums_impl(act, rows, m, os, G, a, S, D1, dZ, beta, da, db);
}
PHYSAI_VECTOR_CLONES void backprop_single_output_sums(Activation act, int64_t rows, int64_t m, double os,
                                                      const double* G, const double* a, const double* S,
                                                      const double* D1, double* dZ, double beta, double* da,
                                                      double* db) {
  backprop_single_output_sums_impl(act, rows, m, os, G, a, S, D1, dZ, beta, da, db);
}

// ---------------------------------------------------------------------------------------------------------------
// Backward from a saved forward
// ---------------------------------------------------------------------------------------------------------------

namespace {

// dZ_r = os (sum_j G_rj a_j) slope(source_r) for R rows at columns [q, q + W vectors of U) (U: a Vec, or one T):
// R x W sums held in registers across the sum over the k outputs, so that each vector of a, loaded once per output,
// serves all R rows. Every element is summed over j in order, the same whatever its block.
template <int R, int W, class U, class T, class Slope>
PHYSAI_INLINE void backprop_saved_block(int64_t k, T os, const T* G, const T* a, int64_t lda, const T* source,
                                        int64_t ld, T* dZ, int64_t ldz, int64_t q, Slope& slope) {
  constexpr int64_t lanes = sizeof(U) / sizeof(T);
  U sum[R][W] = {};
  for (int64_t j = 0; j < k; ++j) {
    U w[W];
    for (int v = 0; v < W; ++v) w[v] = load<U>(a + j * lda + q + v * lanes);
    for (int r = 0; r < R; ++r) {
      const T g = G[r * k + j];
      for (int v = 0; v < W; ++v) {
        sum[r][v] += g * w[v];
        // opaque: GCC packed the scalar sums of a four-row block into one vector, multiplied there and added lane
        // by lane, unfused; a row alone got a fused chain, so a row's dZ depended on its block
        if constexpr (lanes == 1) sum[r][v] = simd::opaque(sum[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < W; ++v) {
      const int64_t at = q + v * lanes;
      store(dZ + r * ldz + at, (os * sum[r][v]) * slope(load<U>(source + r * ld + at)));
    }
}

// All the columns of R rows: two vectors at a time, then one, then one T at a time.
template <int R, class T, class Slope>
PHYSAI_INLINE void backprop_saved_row_block(int64_t cols, int64_t k, T os, const T* G, const T* a, int64_t lda,
                                            const T* source, int64_t ld, T* dZ, int64_t ldz, Slope& slope) {
  using V = typename simd::Vec<T>::type;
  constexpr int64_t lanes = simd::Vec<T>::lanes;
  int64_t q = 0;
  for (; q + 2 * lanes <= cols; q += 2 * lanes)
    backprop_saved_block<R, 2, V>(k, os, G, a, lda, source, ld, dZ, ldz, q, slope);
  if (q + lanes <= cols) {
    backprop_saved_block<R, 1, V>(k, os, G, a, lda, source, ld, dZ, ldz, q, slope);
    q += lanes;
  }
  for (; q < cols; ++q) backprop_saved_block<R, 1, T>(k, os, G, a, lda, source, ld, dZ, ldz, q, slope);
}

// Rows ahead of the current ones whose part of S (or D1) is prefetched: a backward column block reads a short run
// of each row, one row a page apart from the next, which the hardware prefetchers do not follow.
constexpr int64_t kPrefetchRows = 8;

// Outputs up to which the backward runs row by row: with one or two outputs the sum over them is a multiply-add or
// two per element, and blocking rows only adds work around it (measured slower at k = 1).
constexpr int64_t kRowwiseOutputs = 2;

// slope(v) gives sigma' from v, the value at the same place of `source` (S or D1, row stride ld). Few outputs: one
// row at a time; more: four rows at a time (backprop_saved_block), then one.
template <class T, class Slope>
PHYSAI_INLINE void backprop_saved_impl(int64_t rows, int64_t cols, int64_t k, T os, const T* G, const T* a,
                                       int64_t lda, const T* source, int64_t ld, T* dZ, int64_t ldz, Slope&& slope) {
  constexpr int64_t line = 64 / sizeof(T);
  const auto prefetch = [&](int64_t r) {
    if (r < rows)
      for (int64_t q = 0; q < cols; q += line) __builtin_prefetch(source + r * ld + q);
  };
  int64_t r = 0;
  if (k <= kRowwiseOutputs) {
    // dS_r from the column sums of simd.hpp (several vectors of columns in registers across the sum over the
    // outputs), then the slope, applied while the row is in L1.
    using V = typename simd::Vec<T>::type;
    for (; r < rows; ++r) {
      prefetch(r + kPrefetchRows);
      const T *g = G + r * k, *src = source + r * ld;
      T* dz = dZ + r * ldz;
      simd::accumulate_all_columns(cols, k, os, [&](int64_t j) { return g[j]; }, a, lda, T(0), dz);
      int64_t q = 0;
      for (; q + simd::Vec<T>::lanes <= cols; q += simd::Vec<T>::lanes)
        store(dz + q, load<V>(dz + q) * slope(load<V>(src + q)));
      for (; q < cols; ++q) dz[q] *= slope(src[q]);
    }
    return;
  }
  for (; r + 4 <= rows; r += 4) {
    for (int64_t p = 0; p < 4; ++p) prefetch(r + kPrefetchRows + p);
    backprop_saved_row_block<4>(cols, k, os, G + r * k, a, lda, source + r * ld, ld, dZ + r * ldz, ldz, slope);
  }
  for (; r < rows; ++r)
    backprop_saved_row_block<1>(cols, k, os, G + r * k, a, lda, source + r * ld, ld, dZ + r * ldz, ldz, slope);
}

template <class T>
PHYSAI_INLINE void backprop_saved_any(Activation act, int64_t rows, int64_t cols, int64_t k, T os, const T* G,
                                      const T* a, int64_t lda, const T* S, const T* D1, int64_t ld, T* dZ,
                                      int64_t ldz) {
  with_slope(act, S, D1, [&](const T* source, auto slope) PHYSAI_INLINE_LAMBDA {
    backprop_saved_impl(rows, cols, k, os, G, a, lda, source, ld, dZ, ldz, slope);
  });
}

}  // namespace

PHYSAI_VECTOR_CLONES void backprop_saved_rows(Activation act, int64_t rows, int64_t cols, int64_t k, float os,
                                              const float* G, const float* a, int64_t lda, const float* S,
                                              const float* D1, int64_t ld, float* dZ, int64_t ldz) {
  backprop_saved_any(act, rows, cols, k, os, G, a, lda, S, D1, ld, dZ, ldz);
}
PHYSAI_VECTOR_CLONES void backprop_saved_rows(Activation act, int64_t rows, int64_t cols, int64_t k, double os,
                                              const double* G, const double* a, int64_t lda, const double* S,
                                              const double* D1, int64_t ld, double* dZ, int64_t ldz) {
  backprop_saved_any(act, rows, cols, k, os, G, a, lda, S, D1, ld, dZ, ldz);
}

PHYSAI_VECTOR_CLONES void add_column_sums(const float* A, int64_t rows, int64_t m, float* out, int64_t ld) {
  simd::accumulate_all_columns(m, rows, 1.0f, [](int64_t) { return 1.0f; }, A, ld < 0 ? m : ld, 1.0f, out);
}
PHYSAI_VECTOR_CLONES void add_column_sums(const double* A, int64_t rows, int64_t m, double* out, int64_t ld) {
  simd::accumulate_all_columns(m, rows, 1.0, [](int64_t) { return 1.0; }, A, ld < 0 ? m : ld, 1.0, out);
}

}  // namespace physai::twolayer::detail
