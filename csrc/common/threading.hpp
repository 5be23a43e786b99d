// Thread control shared by all kernels. Parallel loops split work into fixed pieces whose results are
// combined in a fixed order, so results do not depend on the thread count.
#pragma once
#include <cstdint>
#include <omp.h>

namespace physai {

int num_threads();
void set_num_threads(int n);  // 0: back to OpenMP's default
int configured_num_threads();  // what set_num_threads last set (0: OpenMP's default)

// Static schedule: which thread runs an index may vary, what it computes may not.
template <class Body>
void parallel_for(int64_t n, Body&& body) {
  if (n <= 0) return;
  if (n == 1 || num_threads() == 1) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t i = 0; i < n; ++i) body(i);
}

}  // namespace physai
