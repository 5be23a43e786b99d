#include "lego/generate.hpp"

#include "common/errors.hpp"
#include "common/threading.hpp"

namespace physai::lego {

void generate(const Spec& spec, uint64_t seed, uint64_t start, int64_t batch, int64_t* tokens, int64_t* labels,
              int64_t* positions, int64_t* depth) {
  PHYSAI_REQUIRE(spec.n_vars >= 1 && spec.n_vars <= kMaxVars, "n_vars: expected 1..", kMaxVars, ", got ", spec.n_vars);
  PHYSAI_REQUIRE(spec.n_elements >= 1, "group: expected at least one element, got ", spec.n_elements);
  PHYSAI_REQUIRE(spec.components >= 1 && spec.components <= spec.n_vars, "components: expected 1..n_vars (",
                 spec.n_vars, "), got ", spec.components);
  PHYSAI_REQUIRE(batch >= 0, "batch_size: expected >= 0, got ", batch);
  // Values index the table, so an entry outside the group would read out of bounds.
  bool closed = true;
  for (int64_t i = 0; i < int64_t(spec.n_elements) * spec.n_elements; ++i)
    closed &= spec.table[i] >= 0 && spec.table[i] < spec.n_elements;
  PHYSAI_REQUIRE(closed, "table: entries must be element indices 0..", spec.n_elements - 1);
  PHYSAI_REQUIRE(start + static_cast<uint64_t>(batch) >= start, "start: start + batch_size overflows 64 bits");
  const int64_t row = tokens_per_sentence(spec.n_vars), n = spec.n_vars;
  // Sentences whose values are resolved side by side (see resolve).
  constexpr int kGroup = 4;
  const int64_t chunks = (batch + kChunk - 1) / kChunk;
  // The random words of a chunk are made first, vectorised across samples, then consumed sample by sample.
  constexpr uint32_t kMaxBlocks = (kMaxTypicalDraws + 3) / 4;
  const uint32_t blocks = static_cast<uint32_t>((typical_draws(spec) + 3) / 4);
  PHYSAI_REQUIRE(blocks <= kMaxBlocks, "lego: internal error, ", blocks, " Philox blocks per sample exceed ", kMaxBlocks);
  parallel_for(chunks, [&](int64_t c) {
    uint32_t words[kChunk * 4 * kMaxBlocks];
    const int64_t first = c * kChunk, count = first + kChunk < batch ? kChunk : batch - first;
    philox_stream_blocks(seed, start + static_cast<uint64_t>(first), count, kLegoDomain, blocks, words);
    for (int64_t g0 = 0; g0 < count; g0 += kGroup) {
      const int64_t members = g0 + kGroup < count ? kGroup : count - g0;
      Draws draws[kGroup];
      int32_t value[kGroup][kMaxVars], level[kGroup][kMaxVars];
      for (int64_t g = 0; g < members; ++g) {
        const int64_t j = g0 + g;
        PrefetchedStream stream(words + j * 4 * blocks, blocks, seed, start + static_cast<uint64_t>(first + j), kLegoDomain);
        draw(spec, stream, draws[g]);
      }
      // A short last group repeats its first sentence in the unused places; their results are not written.
      for (int64_t g = members; g < kGroup; ++g) draws[g] = draws[0];
      resolve<kGroup>(spec, draws, value, level);
      for (int64_t g = 0; g < members; ++g) {
        const int64_t b = first + g0 + g;
        write(spec, draws[g], value[g], level[g], tokens + b * row, labels + b * n, positions + b * n, depth + b * n);
      }
    }
  });
}

}  // namespace physai::lego
