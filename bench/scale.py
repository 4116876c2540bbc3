"""deepzip's non-training stages on big models, against torch.save/torch.load of the same
fp32 state_dict in the same run: seconds, parameters per second, the ratio, and the peak
memory beyond what the process held before the stage (resident set, from the kernel's
high-water mark, reset before each stage).

    python bench/scale.py [--models vgg16,gpt2,vit-b16,decoder-1.1b] [--out results/bench/scale.md]
    python bench/scale.py --masked --out results/bench/masks.md   # the masked path alone
    python bench/scale.py --io --out results/bench/io.md   # prune, 4 bits, save and load

Random weights of the real shapes: VGG-16 (Deep Compression's model, 138M), GPT-2 small
(124M, the token embedding tied to the output layer), ViT-B/16 (86M) and a 1.1B-parameter
decoder (22 layers, d 2048, FFN 5632, vocabulary 32000, untied; grouped KV projections as
TinyLlama's). One thread. Each model: global and per-layer magnitude pruning to 90% (+
``bake_``), Fisher sensitivities on two small batches, entropy-constrained and plain 4-bit
sharing, ``deepzip.save``, ``deepzip.load`` into the model's own storage, ``load_state``, the NumPy
``read_arrays`` and ``decode`` to safetensors; for the models whose layers' Hessians fit
(not VGG-16), the post-training path on a fresh copy: SparseGPT to 50% and 4-bit sharing
with clusters chosen for each layer's outputs, both on the two small batches. Timings
are one run each (these machines are noisy: read the ratios, not the seconds). Goals in
the README's performance section.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from deepzip import dzip, dzip_torch  # noqa: E402
from deepzip.prune import PruneConfig, bake_, prune_  # noqa: E402
from deepzip.quantize import QuantizeConfig, fisher_sensitivity, quantize_  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------- the models
def vgg16() -> nn.Module:
    layers: list[nn.Module] = []
    c = 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU(inplace=True)]
            c = int(v)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True),
                         nn.Linear(4096, 4096), nn.ReLU(True), nn.Linear(4096, 1000))


class Block(nn.Module):
    """A pre-norm transformer block; ``kv`` < d gives grouped key/value projections."""

    def __init__(self, d: int, ffn: int, heads: int, kv: int | None = None,
                 gated: bool = False) -> None:
        super().__init__()
        kv = kv or d
        self.heads, self.group = heads, d // kv
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, kv), nn.Linear(d, kv)
        self.o = nn.Linear(d, d)
        self.up = nn.Linear(d, ffn)
        self.gate = nn.Linear(d, ffn) if gated else None
        self.down = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        hd = d // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, -1, hd).transpose(1, 2)

        k, v = split(self.k(h)), split(self.v(h))
        if self.group > 1:
            k, v = k.repeat_interleave(self.group, 1), v.repeat_interleave(self.group, 1)
        a = nn.functional.scaled_dot_product_attention(split(self.q(h)), k, v, is_causal=causal)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        h = self.ln2(x)
        u = self.up(h)
        u = nn.functional.silu(self.gate(h)) * u if self.gate is not None else \
            nn.functional.gelu(u)
        return x + self.down(u)


class Decoder(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, ffn: int, heads: int, *,
                 kv: int | None = None, tied: bool, positions: int = 0,
                 gated: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(positions, d) if positions else None
        self.blocks = nn.ModuleList(Block(d, ffn, heads, kv, gated) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.pos is not None:
            x = x + self.pos(torch.arange(tokens.shape[1]))
        for blk in self.blocks:
            x = blk(x, causal=True)
        return self.head(self.norm(x))


class ViT(nn.Module):
    def __init__(self, d: int = 768, layers: int = 12, heads: int = 12, patch: int = 16,
                 size: int = 224, classes: int = 1000) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        n = (size // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.zeros(1, n, d))
        self.blocks = nn.ModuleList(Block(d, 4 * d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        for blk in self.blocks:
            x = blk(x, causal=False)
        return self.head(self.norm(x[:, 0]))


def _image_batches(size: int, classes: int) -> list:
    return [(torch.randn(1, 3, size, size), torch.randint(classes, (1,))) for _ in range(2)]


def _token_batches(vocab: int, t: int = 16) -> list:
    return [(torch.randint(vocab, (1, t)), torch.randint(vocab, (1, t))) for _ in range(2)]


def _lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten())


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], list], Callable]] = {
    "vgg16": (vgg16, lambda: _image_batches(224, 1000), nn.functional.cross_entropy),
    "gpt2": (lambda: Decoder(50257, 768, 12, 3072, 12, tied=True, positions=1024),
             lambda: _token_batches(50257), _lm_loss),
    "vit-b16": (ViT, lambda: _image_batches(224, 1000), nn.functional.cross_entropy),
    "decoder-1.1b": (lambda: Decoder(32000, 2048, 22, 5632, 32, kv=256, tied=False,
                                     gated=True),
                     lambda: _token_batches(32000), _lm_loss),
}


# The post-training path's Hessians are a layer's inputs squared: VGG-16's first
# classifier layer (25,088 inputs) alone would need 2.3 GiB and a day of one thread.
POSTTRAIN = ("gpt2", "vit-b16", "decoder-1.1b")


# ---------------------------------------------------------------- measuring
def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set
        f.write("5")


def measure(fn: Callable[[], object]) -> tuple[float, int, object]:
    """(seconds, peak resident bytes beyond what was resident before, fn's result)."""
    gc.collect()
    before = _rss()
    _reset_peak()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return seconds, max(0, _hwm() - before), out


def _unshare(model: nn.Module) -> None:
    """Back to the pruned weights under the sharing (the parametrization's original)."""
    for m in model.modules():
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=False)


def run_model(name: str, tmp: Path, log: Callable[[str], None], mode: str = "full"
              ) -> list[dict]:
    """The stages on one model: all of them ("full"), the masked path alone ("masked"),
    or the file's own (--io: pruning, k-means sharing, save and the loaders)."""
    make, batches, loss = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    params = sum(p.numel() for p in model.parameters())
    fp32 = 4 * params
    rows: list[dict] = []

    def stage(what: str, fn: Callable[[], object], base: str | None) -> object:
        s, peak, out = measure(fn)
        rows.append({"model": name, "stage": what, "seconds": s, "params": params,
                     "base": base, "peak": peak, "fp32": fp32})
        log(f"{name:13s} {what:34s} {s:8.2f} s  peak +{peak / 2**20:8.0f} MiB")
        return out

    log(f"{name}: {params / 1e6:.1f}M parameters, fp32 {fp32 / 2**20:.0f} MiB, resident "
        f"{_rss() / 2**20:.0f} MiB")
    ref = tmp / "ref.pt"
    for i in range(3):  # the reference: the median of three, it is short and noisy
        stage(f"torch.save (fp32 state_dict) #{i + 1}",
              lambda: torch.save(model.state_dict(), ref), None)
        stage(f"torch.load (fp32 state_dict) #{i + 1}",
              lambda: torch.load(ref, weights_only=True, map_location="cpu"), None)
    ref.unlink()
    if mode == "masked":  # the masked path alone (--masked): a short run for that change
        model = None
        gc.collect()
        masked_path(make, stage)
        return rows
    stage("prune: global 90%, in place", lambda: prune_(
        model, PruneConfig("global", 0.9), bake=True), "save")
    if mode == "full":
        stage("fisher_sensitivity (2 batches of 1)",
              lambda: fisher_sensitivity(model, batches(), loss), "save")
        stage("share: entropy-constrained, 4 bits",
              lambda: quantize_(model, QuantizeConfig(bits=4, entropy_weight=1.0)), "save")
        _unshare(model)
    stage("share: k-means, 4 bits", lambda: quantize_(model, QuantizeConfig(bits=4)), "save")
    path = tmp / f"{name}.dzip"
    stage("dzip.save", lambda: dzip_torch.save(model, path), "save")
    size = path.stat().st_size
    model = fresh = None  # the model is freed; a fresh one is filled from the file
    gc.collect()
    fresh = make()
    stage("dzip.load into the model", lambda: dzip_torch.load(path, fresh), "load")
    fresh = None
    gc.collect()
    with torch.device("meta"):  # the shapes to check the file against, without memory
        meta = make()  # (a file of over 2^28 values is decoded only against a model)
    shapes = {k: list(v.shape) for k, v in meta.state_dict().items()}
    stage("dzip.load_state", lambda: dzip_torch.load_state(path, meta), "load")
    stage("read_arrays (NumPy)", lambda: dzip.read_arrays(path, shapes), "load")
    if mode == "io":
        path.unlink()
        return _file_row(rows, name, size, fp32, params, log)

    def decode() -> None:
        from deepzip.export import to_safetensors

        to_safetensors(dzip_torch.load_state(path, meta)[0], tmp / f"{name}.safetensors")

    stage("decode to safetensors", decode, "save")
    (tmp / f"{name}.safetensors").unlink(missing_ok=True)
    path.unlink()
    gc.collect()
    other = make()  # the other pruning paths, on fresh weights
    stage("prune: per-layer 90%, in place", lambda: prune_(
        other, PruneConfig("percentile", 0.9), bake=True), "save")
    other = None
    masked_path(make, stage)
    if name in POSTTRAIN:  # without retraining: calibration inputs choose masks and clusters
        gc.collect()
        other, calibration = make().eval(), batches()
        stage("post-training: sparsegpt 50%", lambda: prune_(
            other, PruneConfig("sparsegpt", 0.5), bake=True, calibration=calibration,
            calibration_batches=len(calibration)), "save")
        stage("post-training: 4 bits for the outputs", lambda: quantize_(
            other, QuantizeConfig(bits=4), calibration=calibration,
            calibration_batches=len(calibration)), "save")
        other = None
    return _file_row(rows, name, size, fp32, params, log)


def _file_row(rows: list[dict], name: str, size: int, fp32: int, params: int,
              log: Callable[[str], None]) -> list[dict]:
    log(f"{name}: file {size:,} bytes, {fp32 / size:.1f}x the fp32 state_dict")
    rows.append({"model": name, "stage": "file", "bytes": size, "fp32": fp32,
                 "params": params})
    return rows


def masked_path(make: Callable[[], nn.Module], stage: Callable[..., object]) -> None:
    """Pruning with masks (what retraining needs), then baking them, on fresh weights."""
    gc.collect()
    other = make()
    stage("prune: global 90% with masks (retraining)",
          lambda: prune_(other, PruneConfig("global", 0.9)), "save")
    stage("bake_ (masks -> zeros)", lambda: bake_(other), "save")


GOALS = {"prune": 3.0, "dzip.save": 3.0, "share: k-means": 10.0,
         "dzip.load into": 2.0}


def table(rows: list[dict]) -> str:
    lines = ["| model | stage | seconds | M params/s | x torch.save/load | peak beyond "
             "(x fp32 model) |", "|---|---|---:|---:|---:|---:|"]
    ref: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["stage"].startswith("torch.") and r["stage"].endswith("#1"):
            same = [x for x in rows if x["model"] == r["model"]
                    and x["stage"].startswith(r["stage"][:-2])]
            r["seconds"] = statistics.median(x["seconds"] for x in same)
            r["peak"] = max(x["peak"] for x in same)
            r["stage"] = r["stage"][:-3] + ", median of 3"
            ref[(r["model"], r["stage"].split()[0][6:])] = r["seconds"]
    for r in rows:
        if r["stage"] == "file":
            lines.append(f"| {r['model']} | **file** | | | **{r['fp32'] / r['bytes']:.1f}x** "
                         f"| {r['bytes'] / 2**20:.2f} MiB |")
            continue
        if r["stage"].startswith("torch.") and "#" in r["stage"]:
            continue
        ratio = "" if r["base"] is None else \
            f"{r['seconds'] / ref[(r['model'], r['base'])]:.1f}x {r['base']}"
        goal = next((g for k, g in GOALS.items() if r["stage"].startswith(k)), None)
        if goal is not None and r["base"] is not None:
            met = r["seconds"] / ref[(r["model"], r["base"])] <= goal
            ratio += f" ({'ok' if met else 'over'} <= {goal:g}x)"
        lines.append(f"| {r['model']} | {r['stage']} | {r['seconds']:.2f} | "
                     f"{r['params'] / r['seconds'] / 1e6:.1f} | {ratio} | "
                     f"{r['peak'] / 2**20:,.0f} MiB ({r['peak'] / r['fp32']:.2f}x) |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line per model: the file, each goal's ratio, the largest peak beyond the model
    in the stages that do not train (the masked path is retraining's)."""
    lines = ["| model | parameters | file vs fp32 | prune in place | share, 4 bits | save | "
             "load into model | post-training (SparseGPT 50% + 4 bits for the outputs) | "
             "largest peak beyond the model |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        by = {r["stage"]: r for r in mine}
        ref = {b: next(r["seconds"] for r in mine if r["stage"].startswith(f"torch.{b}")
                       and "median" in r["stage"]) for b in ("save", "load")}

        def ratio(stage: str, base: str, by: dict = by, ref: dict = ref) -> str:
            return f"{by[stage]['seconds'] / ref[base]:.1f}x {base}"

        peak = max((r for r in mine if r["stage"] != "file" and "masks" not in r["stage"]
                    and not r["stage"].startswith("torch.")), key=lambda r: r["peak"])
        file = by["file"]
        post = [r for r in mine if r["stage"].startswith("post-training")]
        posttrain = (f"{sum(r['seconds'] for r in post) / ref['save']:.1f}x save, "
                     f"{sum(r['seconds'] for r in post) / 60:.1f} min") if post else "-"
        lines.append(
            f"| {name} | {mine[0]['params'] / 1e6:,.1f}M | **{file['fp32'] / file['bytes']:.1f}x**"
            f" ({file['bytes'] / 2**20:.1f} MiB) | {ratio('prune: global 90%, in place', 'save')}"
            f" | {ratio('share: k-means, 4 bits', 'save')} | {ratio('dzip.save', 'save')} | "
            f"{ratio('dzip.load into the model', 'load')} | {posttrain} | "
            f"{peak['peak'] / file['fp32']:.2f}x "
            f"({peak['stage'].split(' (')[0]}) |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--io", action="store_true",
                   help="only the file's stages: pruning, k-means sharing, save, load")
    p.add_argument("--masked", action="store_true",
                   help="only the masked path (pruning for retraining, bake_) and the "
                        "torch.save/load references")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: one model
    args = p.parse_args()
    if args.io and args.masked:
        p.error("--io and --masked are two different short runs: name one")
    mode = "io" if args.io else "masked" if args.masked else "full"
    flag = "" if mode == "full" else f" --{mode}"
    if args.one:  # in a process of its own, so no model's freed memory hides another's peak
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            rows = run_model(args.one, Path(tmp), lambda s: print(s, file=sys.stderr,
                                                                   flush=True), mode)
        print(json.dumps(rows))
        return 0
    names = args.models.split(",")
    unknown = set(names) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; known: {', '.join(MODELS)}")
    rows: list[dict] = []
    for name in names:
        child = subprocess.run([sys.executable, __file__, "--one", name, *flag.split()],
                               check=True, stdout=subprocess.PIPE, text=True)
        rows += json.loads(child.stdout.strip().splitlines()[-1])
    text = table(rows)
    brief = "" if mode == "masked" else summary(rows)
    print(brief + "\n\n" + text)
    if args.out:
        Path(args.out).write_text(
            f"$ python bench/scale.py --models {args.models}{flag} --out {args.out}\n\n"
            f"torch {torch.__version__}, one thread, each model in a process of its own; "
            "random weights of the real shapes; one run (torch.save/load: the median of "
            "three). Peak: the resident set's high-water mark during the stage minus what "
            f"was resident before it. Goals: prune and save <= 3x torch.save, load <= 2x "
            f"torch.load, sharing <= 10x torch.save, peak <= 1x the model.\n\n"
            + (f"{brief}\n\n" if brief else "") + f"{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
