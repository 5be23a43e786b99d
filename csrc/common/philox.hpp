// Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11), and the stream convention every
// physai kernel uses, so that sample i of a stream is the same whatever the batch split, thread count or
// backend. The pure-Python twin is physai/_rng.py; both are checked against the Random123 known answers.
//
// Convention: key = the 64-bit seed; counter = (sample lo, sample hi, block, domain). Draw j of a sample is
// lane j % 4 of block j / 4. `domain` separates independent uses of the same (seed, sample).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PHYSAI_HD __host__ __device__ __forceinline__
#else
#define PHYSAI_HD inline
#endif

namespace physai {

struct Philox4x32 {
  static constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  static constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;

  PHYSAI_HD static void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
    const uint64_t p = static_cast<uint64_t>(a) * b;
    hi = static_cast<uint32_t>(p >> 32);
    lo = static_cast<uint32_t>(p);
  }

  // Ten rounds of Philox4x32 on `ctr` (in place) under key (k0, k1).
  PHYSAI_HD static void apply(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; ++round) {
      uint32_t hi0, lo0, hi1, lo1;
      mulhilo(kMul0, ctr[0], hi0, lo0);
      mulhilo(kMul1, ctr[2], hi1, lo1);
      const uint32_t c0 = hi1 ^ ctr[1] ^ k0, c1 = lo1, c2 = hi0 ^ ctr[3] ^ k1, c3 = lo0;
      ctr[0] = c0; ctr[1] = c1; ctr[2] = c2; ctr[3] = c3;
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
  }
};

// Exactly uniform integer in [0, n), n >= 1, from a source of u32 draws: Lemire's multiply-shift with
// rejection of the biased band (taken with probability < n / 2^32).
template <class Stream>
PHYSAI_HD uint32_t uniform_int_from(Stream& stream, uint32_t n) {
  uint64_t m = static_cast<uint64_t>(stream.next_u32()) * n;
  uint32_t low = static_cast<uint32_t>(m);
  if (low < n) {
    const uint32_t threshold = (0u - n) % n;
    while (low < threshold) {
      m = static_cast<uint64_t>(stream.next_u32()) * n;
      low = static_cast<uint32_t>(m);
    }
  }
  return static_cast<uint32_t>(m >> 32);
}

// Sequential reader of the draws of one (seed, sample, domain) stream.
class CounterStream {
 public:
  PHYSAI_HD CounterStream(uint64_t seed, uint64_t sample, uint32_t domain)
      : k0_(static_cast<uint32_t>(seed)), k1_(static_cast<uint32_t>(seed >> 32)),
        s0_(static_cast<uint32_t>(sample)), s1_(static_cast<uint32_t>(sample >> 32)), domain_(domain) {}

  // Continue the stream from draw 4 * block (used after draws served from a precomputed block buffer).
  PHYSAI_HD void seek_block(uint32_t block) {
    block_ = block;
    lane_ = 4;
  }

  PHYSAI_HD uint32_t next_u32() {
    if (lane_ == 4) {
      block_words_[0] = s0_; block_words_[1] = s1_; block_words_[2] = block_; block_words_[3] = domain_;
      Philox4x32::apply(block_words_, k0_, k1_);
      ++block_;
      lane_ = 0;
    }
    return block_words_[lane_++];
  }

  PHYSAI_HD uint32_t uniform_int(uint32_t n) { return uniform_int_from(*this, n); }

  // Uniform in [0, 1) with 53 random bits (two draws).
  PHYSAI_HD double uniform_double() {
    const uint64_t hi = next_u32() >> 5, lo = next_u32() >> 6;  // 27 + 26 bits
    return static_cast<double>((hi << 26) | lo) * (1.0 / 9007199254740992.0);
  }

 private:
  uint32_t k0_, k1_, s0_, s1_, domain_;
  uint32_t block_ = 0;
  uint32_t lane_ = 4;
  uint32_t block_words_[4] = {0, 0, 0, 0};
};

// The first `blocks` blocks (4 * blocks draws) of the streams of samples first .. first+count-1, written
// sample-major into out[count][4 * blocks]. Vectorised across samples; equal to CounterStream's draws.
void philox_stream_blocks(uint64_t seed, uint64_t first, int64_t count, uint32_t domain, uint32_t blocks,
                          uint32_t* out);

// Draws served from a philox_stream_blocks buffer, continuing with the scalar generator past its end, so the
// sequence is exactly CounterStream's.
class PrefetchedStream {
 public:
  PrefetchedStream(const uint32_t* words, uint32_t blocks, uint64_t seed, uint64_t sample, uint32_t domain)
      : words_(words), available_(4 * blocks), blocks_(blocks), tail_(seed, sample, domain) {}

  uint32_t next_u32() {
    if (used_ < available_) return words_[used_++];
    if (used_++ == available_) tail_.seek_block(blocks_);
    return tail_.next_u32();
  }

  uint32_t uniform_int(uint32_t n) { return uniform_int_from(*this, n); }

 private:
  const uint32_t* words_;
  uint32_t available_, blocks_, used_ = 0;
  CounterStream tail_;
};

}  // namespace physai
