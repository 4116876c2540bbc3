import shutil
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deepzip.huffman as h
from deepzip import DeepzipError
from deepzip.huffman import MAX_CODE_LENGTH, HuffmanCode, code_lengths, decode, encode


def _decoders():
    """The coders of this install: the compiled ones where they were built, and the
    fallbacks (NumPy's encoder, bitarray's decoder)."""
    out = [("bitarray", mock.patch.object(h, "_native", None))]
    if h._native is not None:
        out.append(("compiled", mock.patch.object(h, "_native", h._native)))
    return out


def _decode_all(data, nbits, count, code):
    """Each decoder's symbols, or its error message; both must agree on which."""
    got = []
    for _, patch in _decoders():
        with patch:
            try:
                got.append(decode(data, nbits, count, code))
            except DeepzipError as e:
                got.append(e)
    return got


def test_the_compiled_decoder_is_built_where_a_compiler_is():
    """pip builds deepzip._huffman optionally; on a machine with a compiler (CI) a failed
    build would leave the slow decoder in place without a word, so this says it."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: deepzip decodes through bitarray")
    assert h._native is not None


def test_textbook_code_lengths():
    # counts 45,13,12,16,9,5 -> the CLRS example: lengths 1,3,3,3,4,4
    assert code_lengths(np.array([45, 13, 12, 16, 9, 5])).tolist() == [1, 3, 3, 3, 4, 4]


def test_uniform_alphabet_gives_log2_lengths():
    assert set(code_lengths(np.full(32, 100)).tolist()) == {5}


def test_single_and_unused_symbols():
    assert code_lengths(np.array([0, 7, 0])).tolist() == [0, 1, 0]
    assert code_lengths(np.array([0, 0])).tolist() == [0, 0]


FIBONACCI = [1, 1]
while len(FIBONACCI) < 40:
    FIBONACCI.append(FIBONACCI[-1] + FIBONACCI[-2])


def test_length_limit_holds_for_fibonacci_counts():
    lengths = code_lengths(np.array(FIBONACCI))
    assert lengths.max() <= MAX_CODE_LENGTH
    assert sum(2.0 ** -lengths) <= 1 + 1e-12


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=3000), st.integers(41, 300))
def test_roundtrip(symbols, alphabet):
    syms = np.array(symbols)
    code = HuffmanCode.from_symbols(syms, alphabet)
    data, nbits = encode(syms, code)
    assert nbits == code.bits(syms) and len(data) == (nbits + 7) // 8
    for out in _decode_all(data, nbits, len(syms), code):
        assert not isinstance(out, Exception) and np.array_equal(out, syms)
        assert out.dtype == (np.uint8 if alphabet <= 256 else np.uint16)


def test_huffman_is_optimal_against_entropy():
    rng = np.random.default_rng(0)
    syms = np.minimum(rng.geometric(0.3, 50000) - 1, 31)
    code = HuffmanCode.from_symbols(syms, 32)
    p = np.bincount(syms, minlength=32) / len(syms)
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    assert entropy <= code.average_length(syms) < entropy + 1


@pytest.mark.parametrize("backend", ["bitarray", "compiled"])
def test_corrupt_streams_are_errors(backend):
    decoders = dict(_decoders())
    if backend not in decoders:
        pytest.skip("deepzip._huffman was not built (no C compiler)")
    syms = np.array([0, 1, 2, 3, 3, 3, 3, 3])
    code = HuffmanCode.from_symbols(syms, 4)
    data, nbits = encode(syms, code)
    incomplete = HuffmanCode(np.array([1, 2, 0]))  # 0 and 10; 11 is no code word
    with decoders[backend]:
        with pytest.raises(DeepzipError):
            decode(data, nbits - 1, len(syms), code)  # short
        with pytest.raises(DeepzipError):
            decode(data, nbits, len(syms) - 1, code)  # bits left over
        with pytest.raises(DeepzipError):
            decode(data, 8 * len(data) + 1, len(syms), code)  # more bits than bytes
        with pytest.raises(DeepzipError):
            decode(data, nbits, 10 ** 12, code)  # absurd count
        assert decode(b"\x40", 3, 2, incomplete).tolist() == [0, 1]  # 0 10
        with pytest.raises(DeepzipError):
            decode(b"\xc0", 2, 1, incomplete)  # 11
    with pytest.raises(DeepzipError, match="Kraft"):
        HuffmanCode(np.array([1, 1, 1])).tables()
    with decoders[backend], pytest.raises(DeepzipError):
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
    for _, patch in _decoders():  # the compiled encoder, and NumPy's without it
        with patch:
            assert encode(symbols, code) == (ref.tobytes(), len(ref))
            assert encode(symbols.astype(np.uint16), code) == (ref.tobytes(), len(ref))


def test_encoder_blocks_join_at_any_bit(monkeypatch):
    import deepzip.huffman as h

    rng = np.random.default_rng(1)
    symbols = rng.integers(0, 37, size=10_001)
    code = HuffmanCode.from_symbols(symbols, 37)
    whole = encode(symbols, code)
    monkeypatch.setattr(h, "_native", None)  # NumPy's encoder, which works in blocks
    monkeypatch.setattr(h, "_BLOCK", 97)  # blocks that end mid-byte
    assert encode(symbols, code) == whole
    assert (decode(*whole, len(symbols), code) == symbols).all()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=2, max_size=400), st.booleans(),
       st.integers(-1, 10 ** 4), st.integers(-3, 3), st.integers(-1, 1))
def test_decoders_agree_on_damaged_streams(symbols, incomplete, flip, dbits, dcount):
    """A stream with a bit flipped, its size or count off, under a complete or an
    incomplete code: the compiled decoder and bitarray's return the same symbols, or
    both refuse it. The code has words of 1 to 15 bits (Fibonacci counts), so both
    the compiled decoder's table (up to 10 bits) and its search past it are read."""
    syms = np.array(symbols)
    lengths = code_lengths(np.array(FIBONACCI[:16]))  # 15, 15, 14, ..., 2, 1
    if incomplete:  # one code word unused: a hole in the code
        dropped = int(syms.max())
        lengths[dropped] = 0
        syms = syms[syms != dropped]
    code = HuffmanCode(lengths)
    data, nbits = encode(syms, code)
    if 0 <= flip < nbits:
        data = bytearray(data)
        data[flip // 8] ^= 0x80 >> (flip % 8)
        data = bytes(data)
    got = _decode_all(data, max(nbits + dbits, 0), len(syms) + dcount, code)
    if not all(isinstance(g, Exception) for g in got):
        assert not any(isinstance(g, Exception) for g in got), got
        assert all(np.array_equal(g, got[0]) for g in got)
