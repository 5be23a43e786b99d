// One LEGO sentence from its (seed, index) counter stream. Header-only and free of allocation, exceptions and
// std containers, so the CPU batch loop (generate.cpp) and a CUDA kernel call this very function and agree to
// the bit. Its pure-Python twin is physai/lego/reference.py::sample_one.
//
// Draws, in this order, from CounterStream(seed, index, kLegoDomain):
//   1. variable names: partial Fisher-Yates over the kVarVocab letters, one uniform_int per variable;
//   2. tree graphs only: parent of each non-root node i, uniform_int(i);
//   3. the group element of each clause: uniform_int(n_elements) each, or, for a group of order 2^b, b-bit fields
//      of whole draws (the lowest bits first, floor(32 / b) elements per draw);
//   4. when shuffling: clause order, Fisher-Yates from the last slot down, uniform_int(j + 1).
#pragma once
#include <cstdint>

#include "common/philox.hpp"

namespace physai::lego {

constexpr int kVarVocab = 26;
constexpr int kMaxVars = kVarVocab;
constexpr int kTokensPerClause = 5;
constexpr uint32_t kLegoDomain = 0x4C45474Fu;  // "LEGO"

enum class Graph : int32_t { Chain = 0, Tree = 1 };

struct Spec {
  int32_t n_vars;
  int32_t n_elements;
  int32_t components;   // disconnected chains / trees
  Graph graph;
  bool shuffle;
  const int32_t* table;  // [n_elements * n_elements], table[g * n_elements + v] = g·v
  // token ids
  int64_t tok_cls, tok_sep, tok_eq, tok_comma, tok_base, tok_element0, tok_var0;
};

PHYSAI_HD int64_t tokens_per_sentence(int32_t n_vars) { return int64_t(kTokensPerClause) * n_vars + 2; }

// log2 of a power-of-two group order (1 for Z2), or 0 when the order is not a power of two (or is 1).
PHYSAI_HD int32_t element_bits(int32_t n_elements) {
  if (n_elements < 2 || (n_elements & (n_elements - 1)) != 0) return 0;
  int32_t bits = 0;
  while ((1 << bits) < n_elements) ++bits;
  return bits;
}

// The random choices of one sentence: variable names, graph, clause elements and clause order.
struct Draws {
  uint8_t names[kVarVocab];
  int32_t parent[kMaxVars];   // -1 for a root
  int32_t element[kMaxVars];  // the group element of each clause
  int32_t slot[kMaxVars];     // clause slot of the i-th variable in graph order
};

// The draws of one sentence from `stream` (a CounterStream, or a PrefetchedStream serving the same words), in the
// order listed at the top of this file.
template <class Stream>
PHYSAI_HD void draw(const Spec& s, Stream& stream, Draws& out) {
  const int32_t n = s.n_vars;

  uint8_t* names = out.names;
  for (int32_t i = 0; i < kVarVocab; ++i) names[i] = static_cast<uint8_t>(i);
  for (int32_t i = 0; i < n; ++i) {
    const int32_t j = i + static_cast<int32_t>(stream.uniform_int(static_cast<uint32_t>(kVarVocab - i)));
    const uint8_t t = names[i]; names[i] = names[j]; names[j] = t;
  }

  int32_t* parent = out.parent;
  if (s.graph == Graph::Tree) {
    for (int32_t i = 0; i < n; ++i)
      parent[i] = i < s.components ? -1 : static_cast<int32_t>(stream.uniform_int(static_cast<uint32_t>(i)));
  } else {
    const int32_t base = n / s.components, extra = n % s.components;
    int32_t next_root = 0;
    for (int32_t c = 0, i = 0; i < n; ++i) {
      if (i == next_root) {
        parent[i] = -1;
        next_root += base + (c < extra ? 1 : 0);
        ++c;
      } else {
        parent[i] = i - 1;
      }
    }
  }

  // A group of order 2^b takes its elements as b-bit fields of whole draws (floor(32 / b) per draw): exactly
  // uniform, and far fewer draws than one uniform_int each.
  int32_t* element = out.element;
  const int32_t bits = element_bits(s.n_elements);
  if (bits > 0) {
    const int32_t per_draw = 32 / bits;
    const uint32_t mask = (uint32_t(1) << bits) - 1;
    for (int32_t i = 0; i < n; i += per_draw) {
      uint32_t word = stream.next_u32();
      for (int32_t j = i; j < n && j < i + per_draw; ++j, word >>= bits) element[j] = static_cast<int32_t>(word & mask);
    }
  } else {
    for (int32_t i = 0; i < n; ++i)
      element[i] = static_cast<int32_t>(stream.uniform_int(static_cast<uint32_t>(s.n_elements)));
  }

  int32_t* slot = out.slot;
  for (int32_t i = 0; i < n; ++i) slot[i] = i;
  if (s.shuffle) {
    for (int32_t j = n - 1; j > 0; --j) {
      const int32_t r = static_cast<int32_t>(stream.uniform_int(static_cast<uint32_t>(j + 1)));
      const int32_t t = slot[j]; slot[j] = slot[r]; slot[r] = t;
    }
  }
}

// Values and depths of `Group` sentences at once. Parents precede children in graph order, so one forward pass
// resolves each sentence; its table lookups form a chain of dependent loads, and stepping several sentences side
// by side lets those chains overlap (the batch generator resolves groups of sentences, a single sentence is Group 1).
template <int Group>
PHYSAI_HD void resolve(const Spec& s, const Draws* draws, int32_t (*value)[kMaxVars], int32_t (*level)[kMaxVars]) {
  const int32_t n_elements = s.n_elements;
  const int32_t* __restrict table = s.table;
  for (int32_t i = 0; i < s.n_vars; ++i) {
    for (int g = 0; g < Group; ++g) {
      const int32_t p = draws[g].parent[i], e = draws[g].element[i];
      value[g][i] = p < 0 ? e : table[e * n_elements + value[g][p]];
      level[g][i] = p < 0 ? 0 : level[g][p] + 1;
    }
  }
}

// Writes tokens [5n+2], labels/positions/depth [n] of one sentence. Token ids are copied to locals: the int64
// output stores could otherwise alias them and force reloads.
PHYSAI_HD void write(const Spec& s, const Draws& draws, const int32_t* value, const int32_t* level,
                     int64_t* __restrict tokens, int64_t* __restrict labels, int64_t* __restrict positions,
                     int64_t* __restrict depth) {
  const int32_t n = s.n_vars;
  const int64_t tok_eq = s.tok_eq, tok_comma = s.tok_comma, tok_base = s.tok_base, tok_element0 = s.tok_element0,
                tok_var0 = s.tok_var0;
  tokens[0] = s.tok_cls;
  for (int32_t i = 0; i < n; ++i) {
    const int32_t p = draws.parent[i];
    const int64_t at = 1 + int64_t(kTokensPerClause) * draws.slot[i];
    labels[i] = value[i];
    depth[i] = level[i];
    positions[i] = at;
    int64_t* __restrict clause = tokens + at;
    clause[0] = tok_var0 + draws.names[i];
    clause[1] = tok_eq;
    clause[2] = tok_element0 + draws.element[i];
    clause[3] = p < 0 ? tok_base : tok_var0 + draws.names[p];
    clause[4] = tok_comma;
  }
  tokens[1 + int64_t(kTokensPerClause) * n] = s.tok_sep;
}

// Number of draws a sample makes when no uniform_int rejects (rejections add draws, rarely).
PHYSAI_HD int32_t typical_draws(const Spec& s) {
  const int32_t bits = element_bits(s.n_elements);
  const int32_t element_draws = bits > 0 ? (s.n_vars + 32 / bits - 1) / (32 / bits) : s.n_vars;
  return s.n_vars + (s.graph == Graph::Tree ? s.n_vars - s.components : 0) + element_draws +
         (s.shuffle ? s.n_vars - 1 : 0);
}

// Bound on typical_draws over every spec: names, parents, elements and the shuffle take at most n_vars each.
constexpr int32_t kMaxTypicalDraws = 4 * kMaxVars;

// Writes tokens [5n+2], labels/positions/depth [n] of sample `index`. Variables are in graph order: chains
// component by component, each root first and then along the chain; trees all roots first, then the other nodes
// in creation order.
PHYSAI_HD void sample_one(const Spec& s, uint64_t seed, uint64_t index, int64_t* tokens, int64_t* labels,
                          int64_t* positions, int64_t* depth) {
  CounterStream stream(seed, index, kLegoDomain);
  Draws draws;
  draw(s, stream, draws);
  int32_t value[1][kMaxVars], level[1][kMaxVars];
  resolve<1>(s, &draws, value, level);
  write(s, draws, value[0], level[0], tokens, labels, positions, depth);
}

}  // namespace physai::lego
