// LEGO batch generation on the CPU: samples start .. start+batch-1 of stream `seed`, in parallel over samples.
#pragma once
#include <cstdint>

#include "lego/sample.hpp"

namespace physai::lego {

// Samples per parallel task: chunks amortise the per-iteration scheduling cost; the output of a sample never depends
// on them.
constexpr int64_t kChunk = 128;

// Checks the spec (cheap re-check of what the Python layer validated) and fills the four outputs, each
// C-contiguous: tokens [batch, 5n+2], labels/positions/depth [batch, n].
void generate(const Spec& spec, uint64_t seed, uint64_t start, int64_t batch, int64_t* tokens, int64_t* labels,
              int64_t* positions, int64_t* depth);

}  // namespace physai::lego
