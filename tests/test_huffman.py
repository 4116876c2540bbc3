import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepzip import DeepzipError
from deepzip.huffman import MAX_CODE_LENGTH, HuffmanCode, code_lengths, decode, encode


def test_textbook_code_lengths():
    # counts 45,13,12,16,9,5 -> the CLRS example: lengths 1,3,3,3,4,4
    assert code_lengths(np.array([45, 13, 12, 16, 9, 5])).tolist() == [1, 3, 3, 3, 4, 4]


def test_uniform_alphabet_gives_log2_lengths():
    assert set(code_lengths(np.full(32, 100)).tolist()) == {5}


def test_single_and_unused_symbols():
    assert code_lengths(np.array([0, 7, 0])).tolist() == [0, 1, 0]
    assert code_lengths(np.array([0, 0])).tolist() == [0, 0]


def test_length_limit_holds_for_fibonacci_counts():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    lengths = code_lengths(np.array(fib))
    assert lengths.max() <= MAX_CODE_LENGTH
    assert sum(2.0 ** -lengths) <= 1 + 1e-12


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=3000), st.integers(41, 300))
def test_roundtrip(symbols, alphabet):
    syms = np.array(symbols)
    code = HuffmanCode.from_symbols(syms, alphabet)
    data, nbits = encode(syms, code)
    assert nbits == code.bits(syms) and len(data) == (nbits + 7) // 8
    assert np.array_equal(decode(data, nbits, len(syms), code), syms)


def test_huffman_is_optimal_against_entropy():
    rng = np.random.default_rng(0)
    syms = np.minimum(rng.geometric(0.3, 50000) - 1, 31)
    code = HuffmanCode.from_symbols(syms, 32)
    p = np.bincount(syms, minlength=32) / len(syms)
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    assert entropy <= code.average_length(syms) < entropy + 1


def test_corrupt_streams_are_errors():
    syms = np.array([0, 1, 2, 3, 3, 3, 3, 3])
    code = HuffmanCode.from_symbols(syms, 4)
    data, nbits = encode(syms, code)
    with pytest.raises(DeepzipError):
        decode(data, nbits - 1, len(syms), code)  # short
    with pytest.raises(DeepzipError):
        decode(data, nbits, len(syms) - 1, code)  # bits left over
    with pytest.raises(DeepzipError):
        decode(data, 8 * len(data) + 1, len(syms), code)  # more bits than bytes
    with pytest.raises(DeepzipError):
        decode(data, nbits, 10 ** 12, code)  # absurd count
    with pytest.raises(DeepzipError, match="Kraft"):
        HuffmanCode(np.array([1, 1, 1])).tables()
    with pytest.raises(DeepzipError):
        encode(np.array([5]), code)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(1, 5000), st.integers(0, 2 ** 31))
def test_vectorized_encoder_writes_the_canonical_bitstream(alphabet, n, seed):
    """The NumPy encoder against bitarray's encoder on the same canonical code words."""
    from bitarray import bitarray

    rng = np.random.default_rng(seed)
    symbols = rng.choice(alphabet, size=n, p=rng.dirichlet(np.full(alphabet, 0.3)))
    code = HuffmanCode.from_symbols(symbols, alphabet)
    ref = bitarray(endian="big")
    ref.encode(code.codes(), symbols.tolist())
    assert encode(symbols, code) == (ref.tobytes(), len(ref))


def test_encoder_blocks_join_at_any_bit(monkeypatch):
    import deepzip.huffman as h

    rng = np.random.default_rng(1)
    symbols = rng.integers(0, 37, size=10_001)
    code = HuffmanCode.from_symbols(symbols, 37)
    whole = encode(symbols, code)
    monkeypatch.setattr(h, "_BLOCK", 97)  # blocks that end mid-byte
    assert encode(symbols, code) == whole
    assert (decode(*whole, len(symbols), code) == symbols).all()
