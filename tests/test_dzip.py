import io
import json
import math
import pathlib
import struct
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from deepzip import DeepzipError, dzip
from deepzip.checkpoint import ModelSpec
from deepzip.codecs import (
    RAW_INTS,
    _pack_subsets,
    _unpack_subsets,
    book_round,
    decode_shared,
    encode_shared,
    grid_bytes,
    grid_encode,
    grid_round,
    grid_too_coarse,
)
from deepzip.dzip import (
    HEADER_DICT,
    VERSION,
    DeepzipFormatError,
    pack_header,
    read_container,
    unpack_header,
)
from deepzip.dzip_torch import (
    info,
    load,
    load_state,
    precision_changes,
    round_to_file_precision_,
    save,
    state_dict_bytes,
)
from deepzip.models import get
from deepzip.prune import PruneConfig, prune_
from deepzip.quantize import QuantizeConfig, quantize_


def _sparse_quantized(shape, sparsity, clusters, seed=0):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    book = np.sort(rng.standard_normal(clusters)).astype(np.float32) if clusters else []
    w = np.zeros(n, dtype=np.float32)
    keep = rng.random(n) >= sparsity
    if clusters:
        w[keep] = rng.choice(book, keep.sum())
    return w.reshape(shape)


def _decode(enc, w):
    return decode_shared({**enc.meta, "shape": list(w.shape)}, enc.parts, w.size)


def test_kernel_layout_wins_when_whole_kernels_are_empty():
    rng = np.random.default_rng(0)
    w = _sparse_quantized((64, 64, 3, 3), 0.6, 16)
    w[rng.random((64, 64)) < 0.8] = 0  # 80% of the kernels empty
    enc = encode_shared(w, "float32")
    assert enc.meta["encoding"] == "kernel"
    flat = encode_shared(w.reshape(-1), "float32")  # 1-D: no kernels, zero runs
    assert flat.meta["encoding"] == "sparse" and enc.nbytes < flat.nbytes
    assert np.array_equal(_decode(enc, w), w.ravel())
    for shape in [(4, 4, 5, 5), (3, 2, 2), (2, 2, 1, 1)]:  # 25 > 16 and 1: no kernel layout
        v = _sparse_quantized(shape, 0.5, 4)
        e = encode_shared(v, "float32")
        assert (e.meta["encoding"] == "kernel") <= (shape == (3, 2, 2))
        assert np.array_equal(_decode(e, v), v.ravel())


def test_subsets_pack_to_their_information_content():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 10, 1000)
    radices = np.array([math.comb(9, int(n)) for n in counts], dtype=object)
    digits = np.array([int(rng.integers(r)) for r in radices])
    data, nbits = _pack_subsets(radices, digits)
    bound = sum(math.log2(r) for r in radices)
    assert bound <= nbits <= bound + len(radices) / 32 + 1  # under a bit per block over
    assert np.array_equal(_unpack_subsets(data, nbits, radices), digits)
    with pytest.raises(DeepzipFormatError):
        _unpack_subsets(data, nbits - 1, radices)
    with pytest.raises(DeepzipFormatError, match="impossible"):  # a block past its product
        _unpack_subsets(b"\xff" * len(data), nbits, radices)


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (16, 3, 3, 3), (64, 64, 3, 3), (10, 64)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("clusters", [1, 2, 32, 256])
def test_shared_tensor_roundtrip(shape, sparsity, clusters):
    w = _sparse_quantized(shape, sparsity, clusters)
    enc = encode_shared(w, "float32")
    out = _decode(enc, w)
    assert np.array_equal(out, w.ravel())
    assert out.tobytes() == w.ravel().tobytes()  # bit-identical, signs of zero included


def test_sparse_layout_wins_when_sparse_and_fillers_cover_long_gaps():
    w = np.zeros(100_000, np.float32)
    w[[5, 70_000, 99_999]] = [0.5, -0.25, 0.5]
    enc = encode_shared(w, "float32")
    assert enc.meta["encoding"] == "sparse" and enc.nbytes < 300  # dense: >= 12,500 bytes
    assert np.array_equal(_decode(enc, w), w)
    dense = encode_shared(_sparse_quantized((4096,), 0.0, 4), "float32")
    assert dense.meta["encoding"] == "dense"


@pytest.mark.parametrize("bits", sorted(RAW_INTS.values()))
def test_grid_store_is_exact_idempotent_and_bounded(bits):
    rng = np.random.default_rng(bits)
    for x in [rng.standard_normal(300).astype(np.float32) * 3, np.full(5, 0.7, np.float32),
              np.zeros(0, np.float32), np.array([-60000.0, 60000.0], np.float32)]:
        data = grid_encode(x, bits)
        assert len(data) == grid_bytes(x.size, bits)
        once = grid_round(x, bits)
        assert np.array_equal(grid_round(once, bits), once)  # the file's values are kept
        if x.size:
            step = (float(x.max()) - float(x.min())) / ((1 << bits) - 1)
            assert np.abs(once - x).max() <= step / 2 + 1e-3 * np.abs(x).max() + 1e-7
            assert len(np.unique(once)) <= 1 << bits
    for bad in [np.array([1.0, np.inf], np.float32), np.array([-1e5, 0], np.float32),
                np.array([1e-6, 2e-6], np.float32)]:  # a step float16 cannot hold
        assert grid_encode(bad, bits) is None and grid_round(bad, bits) is None


def test_grid_store_falls_back_to_float32_where_the_grid_cannot_hold_a_tensor(tmp_path):
    m = _model()
    with torch.no_grad():
        m.linear.bias[0] = -1e6  # below float16: no grid can start there
        m.bn1.bias[0] = -1e6
    round_to_file_precision_(m, "int6", "float32")
    x = torch.randn(2, 3, 32, 32)
    save(m, tmp_path / "m.dzip", spec=ModelSpec(), raw_dtype="int6")
    header, _, _ = read_container(tmp_path / "m.dzip")
    stores = {e["name"]: e["store"] for e in header["tensors"] if "store" in e}
    assert stores["linear.bias"] == stores["bn1"] == "float32"
    assert stores["layer1.0.bn1"] == "int6"
    assert torch.equal(load(tmp_path / "m.dzip")(x), m(x))


def test_a_grid_too_coarse_for_most_values_gives_way_to_float16(tmp_path):
    rng = np.random.default_rng(0)
    normal = rng.uniform(0.5, 2.0, 64).astype(np.float32)
    outlier = normal.copy()
    outlier[3] = 300 * np.median(normal)  # one nearly empty channel's folded scale
    assert not grid_too_coarse(normal, 8) and grid_too_coarse(outlier, 8)
    assert not grid_too_coarse(grid_round(outlier, 8), 8)  # once on its grid, it stays
    m = _model()
    with torch.no_grad():
        for bn in (m.bn1, m.layer1[0].bn1):
            bn.running_var.copy_(torch.from_numpy(normal[:bn.num_features]))
        m.bn1.running_var[0] = 1e-5  # scale 1/sqrt(2e-5): ~300x the others
    round_to_file_precision_(m, "int8", "float32")
    assert precision_changes(m, "int8", "float32") == []  # the stores are chosen again alike
    save(m, tmp_path / "m.dzip", spec=ModelSpec(), raw_dtype="int8")
    header, _, _ = read_container(tmp_path / "m.dzip")
    stores = {e["name"]: e["store"] for e in header["tensors"] if "store" in e}
    assert stores["bn1"] == "float16" and stores["layer1.0.bn1"] == "int8"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load(tmp_path / "m.dzip").eval()(x), m.eval()(x))


def test_a_grid_with_a_non_finite_end_is_refused(tmp_path):
    m = _model()
    path = tmp_path / "m.dzip"
    save(m, path, spec=ModelSpec(), raw_dtype="int8")
    header, data, head = read_container(path)
    off = next(e for e in header["tensors"] if e["encoding"] == "bn")["parts"]["data"][0]
    body = bytearray(data)
    body[off:off + 2] = np.array([np.inf], "<f2").tobytes()  # lo of the first group
    raw = path.read_bytes()
    bad = raw[:20] + struct.pack("<I", zlib.crc32(bytes(body))) + raw[24:head] + bytes(body)
    with pytest.raises(DeepzipFormatError, match="finite"):
        _load_bytes(tmp_path, bad)


@pytest.mark.parametrize("version", [3, 4])
def test_older_versions_still_load(tmp_path, version):
    """The same model as a version 3 file (offsets in the header) or a version 4 one
    (header deflated without the preset dictionary) decodes identically."""
    m = _model()
    path = tmp_path / "new.dzip"
    save(m, path, spec=ModelSpec())
    data = path.read_bytes()
    header, _, _ = read_container(path)
    header["version"] = version
    if version >= 4:
        for t in header["tensors"]:
            del t["parts"]
    old_bytes = _with_header(data, header, version)
    old_bytes = old_bytes[:8] + struct.pack("<H", version) + old_bytes[10:]
    old = tmp_path / f"v{version}.dzip"
    old.write_bytes(old_bytes)
    a, b = load_state(path)[0], load_state(old)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(old_bytes) > len(data)  # offsets, and a header deflated with no dictionary


def _model(seed=0, sparsity=0.8, bits=4):
    torch.manual_seed(seed)
    m = get("resnet20").eval()
    for mod in m.modules():  # non-trivial BatchNorm statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 2)
    prune_(m, PruneConfig("percentile", sparsity))
    quantize_(m, QuantizeConfig(bits=bits))
    return m


@pytest.mark.parametrize("raw,book", [("float16", "float32"), ("float32", "float16"),
                                      ("float32", "float32"), ("int8", "float16"),
                                      ("int3", "float32"), ("int8", "int8"),
                                      ("float16", "int5")])
def test_model_roundtrip_is_exact(tmp_path, raw, book):
    m = _model()
    round_to_file_precision_(m, raw, book)
    x = torch.randn(4, 3, 32, 32)
    ref = m(x)
    path = tmp_path / "m.dzip"
    report = save(m, path, spec=ModelSpec(), raw_dtype=raw, codebook_dtype=book)
    assert report["file_bytes"] == path.stat().st_size
    loaded = load(path)
    assert not loaded.training
    assert torch.equal(loaded(x), ref)
    sizes = info(path)
    kinds = sizes.bytes_by_kind
    assert sizes.file_bytes == path.stat().st_size == sum(kinds.values())
    assert kinds["positions"] > 0 and kinds["values"] > 0
    assert kinds["BatchNorm"] > 0 and kinds["biases"] > 0
    assert kinds["unshared weights"] == 0  # every weight is shared
    assert set(load_state(path)[0]) == set(get("resnet20").state_dict())
    assert sum(r.encoding == "bn" for r in sizes.tensors) == 19  # folded BatchNorm


def test_grid_codebooks_cost_one_byte_per_value_and_fall_back_exactly(tmp_path):
    m = _model(bits=6)
    sizes = {}
    for book in ("float16", "int8"):
        save(m, tmp_path / f"{book}.dzip", spec=ModelSpec(), codebook_dtype=book)
        sizes[book] = info(tmp_path / f"{book}.dzip").bytes_by_kind["codebooks"]
    rows = [r for r in info(tmp_path / "int8.dzip").tensors if r.shared]
    clusters = sum(r.clusters for r in rows)  # neighbours closer than a step merge
    assert clusters <= sizes["float16"] // 2
    assert sizes["int8"] == clusters + 4 * len(rows)  # k levels + fp16 lo and step per layer
    # values float16 cannot hold: that codebook is kept as float32, decoded exactly
    w = torch.zeros(8, 16)
    w[0, :3] = torch.tensor([1e5, 2e5, 3e5])
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight.copy_(w)
    save(lin, tmp_path / "big.dzip", codebook_dtype="int8")
    header, _, _ = read_container(tmp_path / "big.dzip")
    assert {t["name"]: t for t in header["tensors"]}["weight"]["codebook_dtype"] == "float32"
    assert torch.equal(load_state(tmp_path / "big.dzip")[0]["weight"], w)


def test_grid_codebook_rounding_is_idempotent():
    rng = np.random.default_rng(0)
    for _ in range(200):
        book = np.unique(rng.normal(0, rng.uniform(1e-3, 10), int(rng.integers(1, 64))))
        book = book[book != 0].astype(np.float32)
        for store in ("int8", "int4", "float16"):
            once = book_round(book, store)
            assert np.array_equal(book_round(once, store), once)
            assert np.all(np.diff(once) >= 0) and np.all(once != 0)


def test_batchnorm_folding_is_the_same_function_and_idempotent(tmp_path):
    m = _model()
    x = torch.randn(4, 3, 32, 32)
    ref = m(x)
    unfolded = save(m, tmp_path / "a.dzip", spec=ModelSpec(), raw_dtype="float32",
                    fold_batchnorm=False)
    folded = save(m, tmp_path / "b.dzip", spec=ModelSpec(), raw_dtype="float32")
    assert folded["file_bytes"] < unfolded["file_bytes"] - 4 * 688 * 2
    assert torch.allclose(load(tmp_path / "b.dzip")(x), ref, atol=1e-4)
    assert torch.equal(load(tmp_path / "a.dzip")(x), ref)
    round_to_file_precision_(m, "float32", "float32")
    once = m(x)
    round_to_file_precision_(m, "float32", "float32")
    assert torch.equal(m(x), once)


def test_file_is_really_smaller(tmp_path):
    m = _model(sparsity=0.9, bits=4)
    report = save(m, tmp_path / "m.dzip", spec=ModelSpec())
    assert state_dict_bytes(m) / report["file_bytes"] > 25


def test_unshared_and_custom_models_roundtrip(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, groups=8), nn.Flatten(),
                                      nn.Linear(8 * 28 * 28, 5))
            self.register_buffer("steps", torch.tensor(3, dtype=torch.int64))

    torch.manual_seed(0)
    net = Net().eval()
    quantize_(net, QuantizeConfig(bits=3, exclude=["body.4"]))  # the Linear stays fp32
    save(net, tmp_path / "n.dzip", raw_dtype="float32")
    with pytest.raises(DeepzipError, match="no architecture"):
        load(tmp_path / "n.dzip")
    back = load(tmp_path / "n.dzip", Net())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back.body(x), net.body(x)) and back.steps.item() == 3


# ------------------------------------------------------------------ robustness
@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("f") / "m.dzip"
    save(_model(sparsity=0.7, bits=3), path, spec=ModelSpec())
    return path.read_bytes()


def _load_bytes(tmp_path, data):
    p = tmp_path / "x.dzip"
    p.write_bytes(data)
    return load_state(p)


def test_truncation_at_every_section_boundary(tmp_path, good_file):
    info_path = tmp_path / "ok.dzip"
    info_path.write_bytes(good_file)
    sizes = info(info_path)
    head = sizes.header_bytes
    cuts = {0, 4, 8, 12, 19, 20, head - 1, head, len(good_file) - 1}
    for t in sizes.tensors:
        cuts.add(head + t.bytes)
    offset = head
    header, _, _ = read_container(info_path)  # version 4 lists no offsets: the reader derives them
    for t in header["tensors"]:
        for off, length in t["parts"].values():
            cuts.update({head + off, head + off + length - 1})
    for cut in sorted(c for c in cuts if 0 <= c < len(good_file)):
        with pytest.raises(DeepzipFormatError):
            _load_bytes(tmp_path, good_file[:cut])
    assert offset == head


def _header(data):
    hlen = struct.unpack_from("<I", data, 12)[0]
    return json.loads(unpack_header(data[24:24 + hlen], VERSION))


def _with_header(data, header, version=VERSION):
    hlen = struct.unpack_from("<I", data, 12)[0]
    hdr = pack_header(header, version)
    return (data[:12] + struct.pack("<II", len(hdr), zlib.crc32(hdr)) + data[20:24] + hdr
            + data[24 + hlen:])


def test_bit_flips_are_always_caught(tmp_path, good_file):
    rng = np.random.default_rng(0)
    for _ in range(300):
        data = bytearray(good_file)
        pos = int(rng.integers(len(data)))
        data[pos] ^= 1 << int(rng.integers(8))
        if pos in (10, 11):  # the reserved field is not read
            _load_bytes(tmp_path, bytes(data))
            continue
        with pytest.raises(DeepzipFormatError):  # magic, version, CRCs of header and data
            _load_bytes(tmp_path, bytes(data))


@pytest.mark.parametrize("mutate", [
    lambda t: t.update(shape=[2 ** 30, 2 ** 30]),
    lambda t: t.update(shape=[-1]),
    lambda t: t.update(shape="big"),
    lambda t: t.update(dtype="object"),
    lambda t: t.update(encoding="lzma"),
    lambda t: t.update(clusters=10 ** 9),
    lambda t: t.update(entries=10 ** 12),
    lambda t: t.update(index_nbits=10 ** 12),
    lambda t: t.update(gap_bits=40),
    lambda t: t.update(parts={"indices": [0, 10 ** 12]}),  # version 4 lists no parts
    lambda t: t.update(index_nbits=t["index_nbits"] + 8),  # sizes no longer add up
    lambda t: t.update(gap_nbits=t["gap_nbits"] - 8),
    lambda t: t.update(gap_nbits=-1),
    lambda t: t.update(clusters=t["clusters"] + 1),
    lambda t: t.update(codebook_dtype="float64"),
])
def test_hostile_headers_are_rejected(tmp_path, good_file, mutate):
    header = _header(good_file)
    target = next(t for t in header["tensors"] if t["encoding"] == "sparse")
    mutate(target)
    with pytest.raises(DeepzipFormatError):
        _load_bytes(tmp_path, _with_header(good_file, header))


def test_not_a_dzip_file(tmp_path):
    buf = io.BytesIO()
    torch.save(get("resnet20").state_dict(), buf)
    for data in [b"", b"DZIP", buf.getvalue(), b"DZIP\x00\r\n\x1a" + b"\xff" * 40]:
        with pytest.raises(DeepzipFormatError):
            _load_bytes(tmp_path, data)
    with pytest.raises(DeepzipError, match="cannot read"):
        load(tmp_path / "missing.dzip")


class TiedLM(nn.Module):
    """Embedding tied to the decoder, self-attention and a two-layer LSTM."""

    def __init__(self, vocab=50, d=32):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.lstm = nn.LSTM(d, d, num_layers=2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.decoder = nn.Linear(d, vocab)
        self.decoder.weight = self.embedding.weight

    def forward(self, x):
        h = self.embedding(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        o, _ = self.lstm(h + a)
        return self.decoder(self.norm(o))


@pytest.mark.parametrize("make", [TiedLM, lambda: get("resnet20")])
def test_loading_a_batch_at_a_time_gives_the_same_model(tmp_path, monkeypatch, make):
    """load() puts the decoded tensors into the model a batch at a time, so it needs
    little memory beyond the model: with one tensor a batch, aliases (tied weights) and
    folded BatchNorm still land where they belong, and tied parameters stay one."""
    import deepzip.dzip_torch as dt

    torch.manual_seed(0)
    model = make().eval()
    prune_(model, PruneConfig("global", 0.6))
    quantize_(model, QuantizeConfig(bits=4))
    save(model, tmp_path / "m.dzip")
    whole = load(tmp_path / "m.dzip", make())
    monkeypatch.setattr(dt, "_FILL_BATCH", 1)
    one_by_one = load(tmp_path / "m.dzip", make())
    mine = one_by_one.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in whole.state_dict().items())
    if make is TiedLM:
        assert one_by_one.decoder.weight is one_by_one.embedding.weight


def test_load_decodes_shared_weights_in_place_unless_a_hook_must_see_them(tmp_path):
    """A shared weight is decoded straight into the model's tensor (it never passes
    through load_state_dict); a model whose loading is customized gets every value
    through load_state_dict, where its hook sees them."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    torch.manual_seed(0)
    model = make()
    prune_(model, PruneConfig("global", 0.7))
    quantize_(model, QuantizeConfig(bits=4))
    save(model, tmp_path / "m.dzip")
    want = load(tmp_path / "m.dzip", make()).state_dict()

    plain, loaded = make(), []
    keys = plain.load_state_dict
    plain.load_state_dict = lambda sd, strict=True: (loaded.extend(sd), keys(sd, strict))[1]
    ptr = plain[0].weight.data_ptr()
    load(tmp_path / "m.dzip", plain)
    assert "0.weight" not in loaded and "0.bias" in loaded  # in place; biases are raw
    assert plain[0].weight.data_ptr() == ptr
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in want.items())

    hooked, seen = make(), {}
    hooked[0]._register_load_state_dict_pre_hook(
        lambda sd, prefix, *_: seen.update({k: v.clone() for k, v in sd.items()
                                            if k.startswith(prefix)}))
    load(tmp_path / "m.dzip", hooked)
    assert torch.equal(seen["0.weight"], want["0.weight"])
    assert all(torch.equal(v, hooked.state_dict()[k]) for k, v in want.items())


def test_tied_attention_lstm_model_roundtrips_identically(tmp_path):
    from deepzip.prune import prunable, sparsity_of

    torch.manual_seed(0)
    model = TiedLM().eval()
    names = {t.name for t in prunable(model)}
    assert {"attn.in_proj_weight", "attn.out_proj", "lstm.weight_ih_l0",
            "lstm.weight_hh_l1"} <= names
    assert "embedding" in names and "decoder" not in names  # tied: one target, stored once
    x = torch.randint(0, 50, (3, 7))
    plain = model(x)
    prune_(model, PruneConfig("global", 0.6))
    quantize_(model, QuantizeConfig(bits=4))
    round_to_file_precision_(model)
    ref = model(x)
    assert not torch.equal(ref, plain)  # the LSTM and attention use their shared weights
    save(model, tmp_path / "lm.dzip")
    back = load(tmp_path / "lm.dzip", TiedLM())
    assert torch.equal(back(x), ref)
    assert back.decoder.weight is back.embedding.weight
    assert sparsity_of(back) == pytest.approx(0.6, abs=1e-3)
    rows = {r.name: r for r in info(tmp_path / "lm.dzip", TiedLM()).tensors}
    assert rows["decoder.weight"].encoding == "alias of embedding.weight"
    assert rows["decoder.weight"].bytes == 0
    assert rows["lstm.weight_hh_l0"].encoding in ("dense", "sparse")
    assert rows["embedding.weight"].encoding in ("dense", "sparse")  # shared, not raw
    # an untied copy of the class gets the same values under both names
    untied = TiedLM()
    untied.decoder.weight = nn.Parameter(torch.zeros(50, 32))
    load(tmp_path / "lm.dzip", untied)
    assert torch.equal(untied.decoder.weight, untied.embedding.weight)


@pytest.mark.parametrize("mutate", [
    lambda e: e.update(of="nowhere"),
    lambda e: e.update(of=["x"]),
    lambda e: e.update(shape=[1, 2]),
    lambda e: e.update(of="decoder.weight"),  # itself: not before it
])
def test_hostile_alias_entries_are_rejected(tmp_path, mutate):
    torch.manual_seed(0)
    save(TiedLM(), tmp_path / "lm.dzip")
    data = (tmp_path / "lm.dzip").read_bytes()
    header = _header(data)
    mutate(next(e for e in header["tensors"] if e["encoding"] == "alias"))
    with pytest.raises(DeepzipFormatError):
        _load_bytes(tmp_path, _with_header(data, header))


# Files written by earlier format versions (a ResNet-20 in v2, LeNet-300-100 in v3, a
# ResNet-20 in v4), with a digest of their decoded tensors as deepzip 0.2.0 decoded them.
OLD_FORMATS = {2: "1c2fa904d7a26710", 3: "5ac46afc9940152b", 4: "0d9865ef35582e22"}


def _digest(arrays: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        for part in (k.encode(), str(a.dtype).encode(), str(a.shape).encode(), a.tobytes()):
            h.update(part)
    return h.hexdigest()[:16]


@pytest.mark.parametrize("version", sorted(OLD_FORMATS))
def test_files_of_earlier_format_versions_decode_to_the_same_weights(version, tmp_path):
    """An old file still reads, to the very tensors it held, and re-encodes in the current
    version without a change to any of them."""
    import pathlib

    from deepzip import dzip_torch

    path = pathlib.Path(__file__).parent / "fixtures" / f"format-v{version}.dzip"
    assert struct.unpack_from("<H", path.read_bytes(), 8)[0] == version
    arrays, meta = dzip.read_arrays(path)
    assert _digest(arrays) == OLD_FORMATS[version]
    state, spec = dzip_torch.load_state(path)
    assert spec.arch == meta["arch"]
    model = dzip_torch.load(path)
    dzip_torch.save(model, tmp_path / "now.dzip", spec=spec, raw_dtype="float32",
                    codebook_dtype="float32", fold_batchnorm=False)
    again, _ = dzip_torch.load_state(tmp_path / "now.dzip")
    assert struct.unpack_from("<H", (tmp_path / "now.dzip").read_bytes(), 8)[0] == dzip.VERSION
    assert set(again) == set(state) and all(torch.equal(again[k], state[k]) for k in state)


BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked")
sys.meta_path.insert(0, Block())
import numpy as np
import deepzip.dzip as d
arrays, spec = d.read_arrays(sys.argv[1])
np.savez(sys.argv[2], **arrays)
print(spec["arch"] if spec else None, "torch" in sys.modules)
"""


def test_numpy_reader_needs_no_torch(tmp_path):
    """A device without PyTorch decodes a file with NumPy and bitarray alone, to the same
    values the PyTorch side decodes (tied weights, folded BatchNorm, sparse and dense)."""
    import subprocess
    import sys

    torch.manual_seed(0)
    model = get("resnet20").eval()
    prune_(model, PruneConfig("global", 0.8))
    quantize_(model, QuantizeConfig(bits=4))
    save(model, tmp_path / "r.dzip", spec=ModelSpec())
    lm = TiedLM()
    save(lm, tmp_path / "lm.dzip")
    for name, arch in (("r.dzip", "resnet20"), ("lm.dzip", "None")):
        r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(tmp_path / name),
                            str(tmp_path / "out.npz")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [arch, "False"]  # and torch was never imported
        arrays = np.load(tmp_path / "out.npz")
        state, _ = load_state(tmp_path / name)
        assert set(arrays.files) == set(state)
        for k, t in state.items():
            assert np.array_equal(arrays[k], t.numpy()), k


def test_the_format_page_publishes_the_header_dictionary():
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    block = page.split("## The header dictionary")[1].split("```text\n")[1].split("```")[0]
    assert block.replace("\n", "").encode() == HEADER_DICT


class _TiedLM(nn.Module):
    """A language model whose output layer is its token embedding (GPT-2's tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(500, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 500, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.embed(x))))


@pytest.mark.parametrize("bake", [True, False])
def test_a_tied_embedding_is_pruned_shared_and_stored_once(tmp_path, bake):
    from deepzip.prune import PruneConfig, prunable, prune_
    from deepzip.quantize import QuantizeConfig, codebooks, dequantize_, quantize_

    torch.manual_seed(0)
    model = _TiedLM()
    assert [t.name for t in prunable(model)] == ["embed", "mid"]  # the tied tensor once
    prune_(model, PruneConfig("global", 0.9), bake=bake)
    assert torch.equal(model.head.weight, model.embed.weight)
    assert (model.embed.weight == 0).float().mean() > 0.85  # the embedding was pruned
    quantize_(model, QuantizeConfig(bits=4))
    books = codebooks(model)
    assert books["embed"] is books["head"]  # one codebook serves both names
    path = tmp_path / "lm.dzip"
    report = save(model, path, raw_dtype="float32")
    kinds = {r["name"]: r["encoding"] for r in report["tensors"]}
    assert kinds["head.weight"] == "alias" and kinds["embed.weight"] in ("sparse", "dense")
    fresh = load(path, _TiedLM())
    assert fresh.head.weight is fresh.embed.weight
    x = torch.randint(500, (4, 7))
    assert torch.equal(fresh(x), model(x))
    sizes = info(path, _TiedLM())
    assert sizes.params == sum(p.numel() for p in _TiedLM().parameters())
    assert sizes.state_dict_bytes == state_dict_bytes(_TiedLM())  # counted once
    assert sizes.real_ratio > 20
    assert info(path).state_dict_bytes == sizes.state_dict_bytes  # one definition,
    assert info(path).real_ratio == sizes.real_ratio  # with or without the model
    dequantize_(model)
    assert model.head.weight is model.embed.weight


def test_a_shared_model_writes_the_bytes_of_its_plain_form(tmp_path):
    """The writer's shortcuts for weights a codebook computes (encoded from their indices
    and masks, never computed) change nothing: same bytes as the dequantized model."""
    from deepzip.dzip_torch import _plain_state
    from deepzip.quantize import codebooks

    torch.manual_seed(0)
    model = get("resnet20").eval()
    prune_(model, PruneConfig("global", 0.7), bake=True)
    quantize_(model, QuantizeConfig(bits=4))
    books = iter(codebooks(model).values())
    with torch.no_grad():  # centroids the writer must merge or drop as the plain path does
        next(books).codebook[0] = 1e-9  # zero in float16
        book = next(books).codebook
        book[1] = book[2] * (1 + 1e-6)  # one value in float16
        next(books).codebook[3] = 0.0  # its weights are zeros
        sw = next(books)
        sw.mask &= sw.indices != 0  # centroid 0 left only where masked: not in the file
        sw.codebook[0] = 0.5
        next(books).mask[:] = False  # a layer pruned away
    plain = get("resnet20").eval()
    plain.load_state_dict(_plain_state(model))
    for books in ("float32", "float16", "int8"):
        save(model, tmp_path / "a.dzip", codebook_dtype=books)
        save(plain, tmp_path / "b.dzip", codebook_dtype=books)
        assert (tmp_path / "a.dzip").read_bytes() == (tmp_path / "b.dzip").read_bytes()


REPO = pathlib.Path(__file__).parents[1]
COMMITTED = sorted(str(p.relative_to(REPO)) for folder in ("results", "examples")
                   for p in (REPO / folder).glob("**/model.dzip"))


@pytest.mark.parametrize("path", COMMITTED)
def test_every_committed_file_decodes_and_re_encodes_byte_for_byte(path, tmp_path,
                                                                    monkeypatch):
    """Every .dzip the README and docs cite: the PyTorch side decodes it to exactly the
    tensors the NumPy reader gives, and encoding that model again with the run's own
    encode settings (its recipe.yaml; float16 where the run shipped unshared) writes the
    same bytes: nothing in the file depends on more than the model and the settings."""
    from deepzip import dzip_torch
    from deepzip.entrypoints import load_entry_point
    from deepzip.recipe import load_recipe

    file = REPO / path
    arrays, _ = dzip.read_arrays(file)
    state, spec = dzip_torch.load_state(file)
    assert set(arrays) <= set(state)
    assert all(np.array_equal(arrays[k], state[k].numpy()) for k in arrays)
    e = load_recipe(file.parent / "recipe.yaml").encode
    report = file.parent / "report.json"
    stages = json.loads(report.read_text())["stages"] if report.is_file() else {}
    raw = stages.get("quantize", {}).get("unshared") or e.raw_dtype
    into = None
    if spec is not None and ":" in spec.arch:  # a user's architecture: one of examples/
        monkeypatch.syspath_prepend(str(REPO / "examples"))
        into = load_entry_point(spec.arch, "--arch")()
    dzip_torch.save(dzip_torch.load(file, into), tmp_path / "again.dzip", spec=spec,
                    raw_dtype=raw,
                    codebook_dtype=e.codebook_dtype, fold_batchnorm=e.fold_batchnorm)
    assert (tmp_path / "again.dzip").read_bytes() == file.read_bytes()
