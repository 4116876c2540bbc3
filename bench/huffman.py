"""Huffman decoding speed and .dzip load time, each against a named alternative.

    python bench/huffman.py [--symbols 2000000]

Decoding: deepzip's compiled decoder (``deepzip._huffman``, the C reader's) vs its
fallback where no compiler built it (bitarray's ``canonical_decode``), vs a pure-Python
bit-by-bit decoder over the same canonical code, vs the dahuffman package, on the same
symbols (cluster indices drawn like a 5-bit quantized layer's: a peaked distribution).
Load: ``deepzip.dzip_torch.load`` of a pruned, 5-bit ResNet-20 vs ``torch.load`` of the same
model's fp32 state_dict.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from common import median_time
from dahuffman import HuffmanCodec

import deepzip.huffman
from deepzip import dzip_torch
from deepzip.checkpoint import ModelSpec
from deepzip.huffman import HuffmanCode, decode, encode
from deepzip.loading import pretrained
from deepzip.prune import PruneConfig, prune_
from deepzip.quantize import QuantizeConfig, quantize_


def python_decode(data: bytes, nbits: int, count: int, code: HuffmanCode) -> list[int]:
    """Textbook decoder: walk the bits one by one through a dict of code words."""
    table = {(len(c), int(c.to01(), 2)): s for s, c in code.codes().items()}
    out, acc, length = [], 0, 0
    for i in range(nbits):
        acc = acc << 1 | (data[i >> 3] >> (7 - (i & 7)) & 1)
        length += 1
        sym = table.get((length, acc))
        if sym is not None:
            out.append(sym)
            acc = length = 0
    return out[:count]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--symbols", type=int, default=2_000_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    p = np.exp(-0.5 * ((np.arange(32) - 15.5) / 5) ** 2)
    syms = rng.choice(32, size=args.symbols, p=p / p.sum())
    code = HuffmanCode.from_symbols(syms, 32)
    data, nbits = encode(syms, code)
    assert np.array_equal(decode(data, nbits, len(syms), code), syms)
    n = len(syms)
    if deepzip.huffman._native is None:
        raise SystemExit("deepzip._huffman was not built (no C compiler at install)")
    t_ours = median_time(lambda: decode(data, nbits, n, code), 5)
    with mock.patch.object(deepzip.huffman, "_native", None):
        t_bitarray = median_time(lambda: decode(data, nbits, n, code), 5)
    small = n // 20  # the slow decoders get a slice; rates are per symbol
    sdata, sbits = encode(syms[:small], code)
    assert python_decode(sdata, sbits, small, code) == syms[:small].tolist()
    t_py = median_time(lambda: python_decode(sdata, sbits, small, code), 1) * n / small
    codec = HuffmanCodec.from_frequencies(dict(enumerate(np.bincount(syms).tolist())))
    ddata = codec.encode(syms[:small].tolist())
    t_da = median_time(lambda: codec.decode(ddata), 1) * n / small
    print(f"decoding {n:,} symbols ({code.average_length(syms):.3f} bits each on average)")
    for name, t in [("deepzip (compiled)", t_ours),
                    ("deepzip without it (bitarray)", t_bitarray),
                    ("pure-Python bit-by-bit", t_py), ("dahuffman", t_da)]:
        print(f"  {name:30s} {n / t / 1e6:8.2f} M symbols/s   ({t_py / t:7.1f}x pure Python)")
    print(f"  compiled vs bitarray: {t_bitarray / t_ours:.1f}x; vs dahuffman: "
          f"{t_da / t_ours:.1f}x")

    model, spec = pretrained("resnet20")
    prune_(model, PruneConfig("percentile", 0.64))
    quantize_(model, QuantizeConfig(bits=5))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.dzip"
        dzip_torch.save(model, path, spec=spec)
        buf = io.BytesIO()
        torch.save(dzip_torch._plain_state(model), buf)
        raw = buf.getvalue()
        t_load = median_time(lambda: dzip_torch.load(path), 5)
        t_torch = median_time(lambda: torch.load(io.BytesIO(raw), weights_only=True), 5)
        t_torch_model = median_time(lambda: ModelSpec().build().load_state_dict(
            torch.load(io.BytesIO(raw), weights_only=True)), 5)
        print(f"loading ResNet-20 (64% pruned, 5-bit): .dzip {path.stat().st_size:,} bytes, "
              f"state_dict {len(raw):,} bytes")
        print(f"  deepzip.dzip_torch.load (decode + build model)  {t_load * 1000:7.1f} ms")
        print(f"  torch.load state_dict                     {t_torch * 1000:7.1f} ms")
        print(f"  torch.load + build model + load_state_dict {t_torch_model * 1000:7.1f} ms")
        print(f"  ratio dzip/torch (both building the model): {t_load / t_torch_model:.2f}x")


if __name__ == "__main__":
    main()
