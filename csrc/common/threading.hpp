// Thread control shared by all kernels. Parallel loops split work into fixed pieces whose results are
// combined in a fixed order, so results do not depend on the thread count.
#pragma once
#include <algorithm>
#include <cstdint>
#include <omp.h>

namespace physai {

int num_threads();
void set_num_threads(int n);  // 0: back to OpenMP's default
int configured_num_threads();  // what set_num_threads last set (0: OpenMP's default)

// Threads for a parallel loop of n pieces: 1 (the calling thread, in order) for one piece or one thread.
inline int threads_for(int64_t n) { return n <= 1 ? 1 : static_cast<int>(std::min<int64_t>(n, num_threads())); }

// body(i) for i < n: in parallel when `parallel`, else in order on the calling thread.
template <class Body>
void over_rows(int64_t n, bool parallel, Body&& body);

// Static schedule: which thread runs an index may vary, what it computes may not.
template <class Body>
void parallel_for(int64_t n, Body&& body) {
  const int threads = threads_for(n);
  if (threads == 1) return over_rows(n, false, body);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) body(i);
}

// body(i) for i < n as independent tasks of uneven length (a whole training run of one member): a thread that is
// done, or that the OS ran more, takes the next task. Which thread runs a task may vary, what it computes may not.
template <class Body>
void parallel_tasks(int64_t n, Body&& body) {
  const int threads = threads_for(n);
  if (threads == 1) return over_rows(n, false, body);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) body(i);
}

template <class Body>
void over_rows(int64_t n, bool parallel, Body&& body) {
  if (parallel) {
    parallel_for(n, body);
  } else {
    for (int64_t i = 0; i < n; ++i) body(i);
  }
}

}  // namespace physai
