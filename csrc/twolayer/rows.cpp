// Row kernels of rows.hpp. The templates are forced inline into the cloned entry points (a template is not cloned
// with its caller), so each clone vectorises them for its own instruction set.
#include "twolayer/rows.hpp"

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
  for (int64_t r = 0; r < rows; ++r) activate_row_any(act, m, z + r * m, b, D1 + r * m, D2 ? D2 + r * m : nullptr);
}

PHYSAI_VECTOR_CLONES
void activate_rows(Activation act, int64_t rows, int64_t m, double* z, const double* b, double* D1, double* D2) {
  for (int64_t r = 0; r < rows; ++r) activate_row_any(act, m, z + r * m, b, D1 + r * m, D2 ? D2 + r * m : nullptr);
}

// ---------------------------------------------------------------------------------------------------------------
// Output layer and loss
// ---------------------------------------------------------------------------------------------------------------

namespace {

template <class T>
PHYSAI_INLINE void output_rows_impl(Loss loss, int64_t rows, int64_t m, int64_t k, T os, const T* S, const T* a,
                                    const T* Y, T scale, T* F, T* G, T* row_loss) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < k; ++j) F[r * k + j] = os * simd::dot(m, S + r * m, a + j * m);
    row_loss[r] = loss_row(loss, F + r * k, Y + r * k, k, scale, G + r * k);
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

template <class T>
PHYSAI_INLINE void backprop_rows_impl(int64_t rows, int64_t m, int64_t k, T os, const T* G, const T* a, const T* D1,
                                      T* dZ, T* D2) {
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

PHYSAI_VECTOR_CLONES void add_column_sums(const float* A, int64_t rows, int64_t m, float* out) {
  simd::accumulate_all_columns(m, rows, 1.0f, [](int64_t) { return 1.0f; }, A, m, 1.0f, out);
}
PHYSAI_VECTOR_CLONES void add_column_sums(const double* A, int64_t rows, int64_t m, double* out) {
  simd::accumulate_all_columns(m, rows, 1.0, [](int64_t) { return 1.0; }, A, m, 1.0, out);
}

}  // namespace physai::twolayer::detail
