#include "common/philox.hpp"

#include <immintrin.h>

namespace physai {

namespace {
constexpr int kLanes = 8;

void store_lanes(const uint32_t (&c)[4][kLanes], int lanes, uint32_t block, uint32_t blocks, uint32_t* out) {
  for (int j = 0; j < lanes; ++j) {
    uint32_t* words = out + static_cast<int64_t>(j) * 4 * blocks + 4 * block;
    for (int w = 0; w < 4; ++w) words[w] = c[w][j];
  }
}

void blocks_for_lanes_scalar(uint32_t k0, uint32_t k1, uint64_t first, int lanes, uint32_t domain, uint32_t blocks,
                             uint32_t* out) {
  for (uint32_t block = 0; block < blocks; ++block) {
    uint32_t c[4][kLanes];
    for (int j = 0; j < lanes; ++j) {
      uint32_t ctr[4] = {static_cast<uint32_t>(first + j), static_cast<uint32_t>((first + j) >> 32), block, domain};
      Philox4x32::apply(ctr, k0, k1);
      for (int w = 0; w < 4; ++w) c[w][j] = ctr[w];
    }
    store_lanes(c, lanes, block, blocks, out);
  }
}

// Eight samples per AVX2 register: _mm256_mul_epu32 multiplies the even lanes, a shifted copy the odd ones.
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i multiplier, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, multiplier);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), multiplier);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) void blocks_for_lanes_avx2(uint32_t k0, uint32_t k1, uint64_t first, int lanes,
                                                            uint32_t domain, uint32_t blocks, uint32_t* out) {
  alignas(32) uint32_t lo_words[kLanes], hi_words[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    lo_words[j] = static_cast<uint32_t>(first + j);
    hi_words[j] = static_cast<uint32_t>((first + j) >> 32);
  }
  const __m256i sample_lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo_words));
  const __m256i sample_hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi_words));
  const __m256i mul0 = _mm256_set1_epi32(static_cast<int>(Philox4x32::kMul0));
  const __m256i mul1 = _mm256_set1_epi32(static_cast<int>(Philox4x32::kMul1));
  for (uint32_t block = 0; block < blocks; ++block) {
    __m256i c0 = sample_lo, c1 = sample_hi, c2 = _mm256_set1_epi32(static_cast<int>(block));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(domain));
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0, mul0, hi0, lo0);
      mulhilo8(c2, mul1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(key0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(key1)));
      c1 = lo1;
      c3 = lo0;
      key0 += Philox4x32::kWeyl0;
      key1 += Philox4x32::kWeyl1;
    }
    alignas(32) uint32_t c[4][kLanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(c[0]), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(c[1]), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(c[2]), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(c[3]), c3);
    store_lanes(c, lanes, block, blocks, out);
  }
}

// Sixteen samples per AVX-512 register; the four counter words of each sample are gathered into one 128-bit store.
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i a, __m512i multiplier, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, multiplier);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), multiplier);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

__attribute__((target("avx512f"))) void blocks_for_16_lanes_avx512(uint32_t k0, uint32_t k1, uint64_t first,
                                                                    uint32_t domain, uint32_t blocks, uint32_t* out) {
  alignas(64) uint32_t lo_words[16], hi_words[16];
  for (int j = 0; j < 16; ++j) {
    lo_words[j] = static_cast<uint32_t>(first + j);
    hi_words[j] = static_cast<uint32_t>((first + j) >> 32);
  }
  const __m512i sample_lo = _mm512_load_si512(lo_words), sample_hi = _mm512_load_si512(hi_words);
  const __m512i mul0 = _mm512_set1_epi32(static_cast<int>(Philox4x32::kMul0));
  const __m512i mul1 = _mm512_set1_epi32(static_cast<int>(Philox4x32::kMul1));
  for (uint32_t block = 0; block < blocks; ++block) {
    __m512i c0 = sample_lo, c1 = sample_hi, c2 = _mm512_set1_epi32(static_cast<int>(block));
    __m512i c3 = _mm512_set1_epi32(static_cast<int>(domain));
    uint32_t key0 = k0, key1 = k1;
    for (int round = 0; round < 10; ++round) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0, mul0, hi0, lo0);
      mulhilo16(c2, mul1, hi1, lo1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(key0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(key1)));
      c1 = lo1;
      c3 = lo0;
      key0 += Philox4x32::kWeyl0;
      key1 += Philox4x32::kWeyl1;
    }
    // Within each 128-bit lane q, t0..t3 hold samples 4q, 4q+1, 4q+2, 4q+3 as (c0, c1, c2, c3).
    const __m512i a01 = _mm512_unpacklo_epi32(c0, c1), b01 = _mm512_unpackhi_epi32(c0, c1);
    const __m512i a23 = _mm512_unpacklo_epi32(c2, c3), b23 = _mm512_unpackhi_epi32(c2, c3);
    const __m512i t[4] = {_mm512_unpacklo_epi64(a01, a23), _mm512_unpackhi_epi64(a01, a23),
                          _mm512_unpacklo_epi64(b01, b23), _mm512_unpackhi_epi64(b01, b23)};
    alignas(64) uint32_t lanes[4][16];
    for (int r = 0; r < 4; ++r) _mm512_store_si512(lanes[r], t[r]);
    for (int q = 0; q < 4; ++q)
      for (int r = 0; r < 4; ++r)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + static_cast<int64_t>(4 * q + r) * 4 * blocks + 4 * block),
                         _mm_load_si128(reinterpret_cast<const __m128i*>(lanes[r] + 4 * q)));
  }
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2");
const bool kHasAvx512 = __builtin_cpu_supports("avx512f");
}  // namespace

void philox_stream_blocks(uint64_t seed, uint64_t first, int64_t count, uint32_t domain, uint32_t blocks,
                          uint32_t* out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  int64_t done = 0;
  if (kHasAvx512)
    for (; done + 16 <= count; done += 16)
      blocks_for_16_lanes_avx512(k0, k1, first + static_cast<uint64_t>(done), domain, blocks, out + done * 4 * blocks);
  for (; done < count; done += kLanes) {
    const int lanes = count - done < kLanes ? static_cast<int>(count - done) : kLanes;
    (kHasAvx2 ? blocks_for_lanes_avx2 : blocks_for_lanes_scalar)(k0, k1, first + static_cast<uint64_t>(done), lanes, domain, blocks, out + done * 4 * blocks);
  }
}

}  // namespace physai
