"""Pure-Python twin of csrc/common/philox.hpp: Philox4x32-10 and the physai stream convention.

Key = the 64-bit seed; counter = (sample lo, sample hi, block, domain); draw j of a sample is lane j % 4
of block j // 4. ``domain`` separates independent uses of one (seed, sample).
"""
from __future__ import annotations

_MASK = 0xFFFFFFFF
_MUL0, _MUL1 = 0xD2511F53, 0xCD9E8D57
_WEYL0, _WEYL1 = 0x9E3779B9, 0xBB67AE85


def philox4x32_10(counter, key) -> tuple[int, int, int, int]:
    """Ten Philox rounds of the 4-word ``counter`` under the 2-word ``key``."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0 = _MUL0 * c0
        p1 = _MUL1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _MASK, p1 & _MASK, ((p0 >> 32) ^ c3 ^ k1) & _MASK, p0 & _MASK
        k0 = (k0 + _WEYL0) & _MASK
        k1 = (k1 + _WEYL1) & _MASK
    return c0, c1, c2, c3


class CounterStream:
    """Sequential draws of one (seed, sample, domain) stream, identical to the native ``CounterStream``."""

    def __init__(self, seed: int, sample: int, domain: int):
        self._key = (seed & _MASK, (seed >> 32) & _MASK)
        self._sample = (sample & _MASK, (sample >> 32) & _MASK)
        self._domain = domain
        self._block = 0
        self._words: tuple[int, ...] = ()
        self._lane = 4

    def next_u32(self) -> int:
        if self._lane == 4:
            self._words = philox4x32_10((*self._sample, self._block, self._domain), self._key)
            self._block += 1
            self._lane = 0
        word = self._words[self._lane]
        self._lane += 1
        return word

    def uniform_int(self, n: int) -> int:
        """Exactly uniform integer in [0, n): multiply-shift with rejection of the biased band."""
        m = self.next_u32() * n
        low = m & _MASK
        if low < n:
            threshold = (2**32 - n) % n
            while low < threshold:
                m = self.next_u32() * n
                low = m & _MASK
        return m >> 32

    def uniform_double(self) -> float:
        hi = self.next_u32() >> 5
        lo = self.next_u32() >> 6
        return ((hi << 26) | lo) / 9007199254740992.0
