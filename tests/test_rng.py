"""The counter-based generator: native vs pure Python, and both vs the Random123 known answers."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from physai import _core
from physai._rng import CounterStream, philox4x32_10

# Known-answer vectors published with Random123 (kat_vectors, philox4x32_10).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_known_answers(counter, key, expected):
    assert philox4x32_10(counter, key) == expected
    assert tuple(_core.rng.philox4x32_10(list(counter), list(key))) == expected


u64 = st.integers(0, 2**64 - 1)


@given(seed=u64, sample=u64, domain=st.integers(0, 2**32 - 1))
def test_stream_native_matches_python(seed, sample, domain):
    stream = CounterStream(seed, sample, domain)
    expected = [stream.next_u32() for _ in range(11)]
    assert _core.rng.stream_u32(seed, sample, domain, 11).tolist() == expected


@given(seed=u64, first=st.sampled_from([0, 5, 2**32 - 20, 2**64 - 40]), count=st.integers(0, 37),
       blocks=st.integers(1, 3))
def test_vectorised_blocks_match_python(seed, first, count, blocks):
    # The batch generators' prefetch: 16-, 8- and 1-sample code paths, samples crossing a 32-bit boundary.
    got = _core.rng.stream_blocks(seed, first, count, 9, blocks)
    for j in range(count):
        stream = CounterStream(seed, first + j, 9)
        assert got[j].tolist() == [stream.next_u32() for _ in range(4 * blocks)]


@given(seed=u64, sample=st.integers(0, 2**40), n=st.integers(1, 2**32 - 1))
def test_uniform_int_native_matches_python(seed, sample, n):
    stream = CounterStream(seed, sample, 3)
    expected = [stream.uniform_int(n) for _ in range(9)]
    got = _core.rng.stream_uniform_int(seed, sample, 3, n, 9).tolist()
    assert got == expected
    assert all(0 <= v < n for v in got)


def test_uniform_int_is_uniform():
    # chi-square over 26 bins with 52,000 draws: the 1e-4 critical value at 25 dof is about 61
    draws = np.concatenate([_core.rng.stream_uniform_int(7, s, 0, 26, 100) for s in range(520)])
    counts = np.bincount(draws, minlength=26)
    expected = len(draws) / 26
    assert ((counts - expected) ** 2 / expected).sum() < 61


@given(seed=u64, sample=st.integers(0, 2**40), n=st.sampled_from([2**31 + 1, 3 * 2**30]))
def test_uniform_int_rejection_matches_python(seed, sample, n):
    # These n reject about a half and a quarter of all draws, so the retry loop runs, often several times over.
    stream = CounterStream(seed, sample, 3)
    expected = [stream.uniform_int(n) for _ in range(64)]
    assert _core.rng.stream_uniform_int(seed, sample, 3, n, 64).tolist() == expected
    # Rejections shift the stream: the values are not the multiply-shift of the first 64 draws.
    words = _core.rng.stream_u32(seed, sample, 3, 64).astype(np.uint64)
    assert ((words * np.uint64(n)) >> np.uint64(32)).tolist() != expected


def test_uniform_int_rejection_removes_the_bias():
    # n = 3 * 2^30: the multiply-shift of a draw u is floor(3u / 4), which without the rejection gives the multiples
    # of 3 half the mass instead of a third; u % n would instead put 3/4 of it below 2^31 instead of 2/3. Both
    # fractions must hold within 5 sigma; the same draws without the rejection miss the first by 88 sigma.
    n = 3 * 2**30
    draws = np.concatenate([_core.rng.stream_uniform_int(11, s, 0, n, 100) for s in range(600)]).astype(np.int64)
    for fraction, p in [(np.mean(draws % 3 == 0), 1 / 3), (np.mean(draws < 2**31), 2 / 3)]:
        assert abs(fraction - p) < 5 * np.sqrt(p * (1 - p) / draws.size)
    words = np.concatenate([_core.rng.stream_u32(11, s, 0, 100) for s in range(600)]).astype(np.uint64)
    unrejected = (words * np.uint64(n)) >> np.uint64(32)
    assert abs(np.mean(unrejected % 3 == 0) - 1 / 2) < 0.01


def test_stream_hooks_reject_bad_arguments():
    with pytest.raises(ValueError, match="n: expected a range"):
        _core.rng.stream_uniform_int(0, 0, 0, 0, 3)
    with pytest.raises(ValueError, match="count"):
        _core.rng.stream_u32(0, 0, 0, -1)
