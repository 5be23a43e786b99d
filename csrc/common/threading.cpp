#include "common/threading.hpp"

#include <algorithm>
#include <atomic>

namespace physai {

namespace {
std::atomic<int> configured_threads{0};  // 0: OpenMP's own default
}

int num_threads() {
  const int n = configured_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : std::max(1, omp_get_max_threads());
}

void set_num_threads(int n) { configured_threads.store(std::max(0, n), std::memory_order_relaxed); }

int configured_num_threads() { return configured_threads.load(std::memory_order_relaxed); }

}  // namespace physai
