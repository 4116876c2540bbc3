"""The ``deepzip`` command: a thin layer over the Python API.

User mistakes (bad arguments, missing files, mismatched checkpoints) end with one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .data import BatchLoader, load_cifar10, parse_normalize
from .errors import DeepzipError
from .models import ModelSpec, available, load_model, save_checkpoint
from .prune import FINETUNE
from .quantize import CENTROID_TRAINING, INITS
from .train import (
    TrainConfig,
    default_device,
    evaluate,
    fit,
    init_distributed_from_env,
    is_main_process,
)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ "
                   "(default: $DEEPZIP_DATA, then ~/.cache/deepzip/data)")
    g.add_argument("--download", action="store_true",
                   help="download CIFAR-10 into the data folder if it is missing")
    g.add_argument("--subset", type=int, default=None, metavar="N",
                   help="use only the first N images of each split (quick runs)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")


def _add_model_args(p: argparse.ArgumentParser, *, positional: bool) -> None:
    if positional:
        p.add_argument("model", metavar="MODEL",
                       help="checkpoint path, or the name of a shipped model (resnet20)")
    p.add_argument("--arch", default=None, choices=available(),
                   help="architecture of a checkpoint without deepzip metadata "
                        "(default: resnet20)")
    p.add_argument("--normalize", default=None, metavar="SPEC",
                   help="input normalization the weights were trained with: cifar, imagenet "
                        "or R,G,B/R,G,B (default: from the checkpoint, else cifar)")


def resolve_model(args: argparse.Namespace) -> tuple[nn.Module, ModelSpec]:
    """MODEL argument -> (model, spec): a checkpoint file or a shipped model's name.

    ``--normalize`` overrides the checkpoint's own normalization; ``--arch`` names the
    architecture of a checkpoint that carries no deepzip metadata.
    """
    norm = parse_normalize(args.normalize) if args.normalize else None  # fail before loading
    if _is_dzip(args.model):
        from . import dzip

        arch = ModelSpec(arch=args.arch) if args.arch else None
        model = dzip.load(args.model, arch.build() if arch else None)
        spec = arch or dzip.load_state(args.model)[1] or ModelSpec()
    else:
        model, spec = load_model(args.model, ModelSpec(arch=args.arch) if args.arch else None)
    if norm:
        spec = dataclasses.replace(spec, mean=norm[0], std=norm[1])
    return model, spec


def _is_dzip(path: str) -> bool:
    from .dzip import MAGIC

    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _device(args: argparse.Namespace) -> torch.device:
    if args.device is None:
        return default_device()
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise DeepzipError(f"bad --device {args.device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeepzipError("--device cuda requested but CUDA is not available")
    return dev


def _load_split(args: argparse.Namespace, train: bool):
    split = load_cifar10(args.data_dir, train=train, download=args.download)
    if args.subset is not None:
        if args.subset < 1:
            raise DeepzipError(f"--subset must be >= 1, got {args.subset}")
        split = split.subset(args.subset)
    return split


def test_loader(args: argparse.Namespace, spec: ModelSpec,
                batch_size: int = 500) -> BatchLoader:
    return BatchLoader(_load_split(args, train=False), batch_size, mean=spec.mean,
                       std=spec.std, device=_device(args))


def train_loader(args: argparse.Namespace, spec: ModelSpec, cfg: TrainConfig) -> BatchLoader:
    return BatchLoader(_load_split(args, train=True), cfg.batch_size, train=True,
                       mean=spec.mean, std=spec.std, device=_device(args), seed=cfg.seed,
                       channels_last=cfg.channels_last)


def _add_finetune_args(p: argparse.ArgumentParser, what: str, d: TrainConfig) -> None:
    g = p.add_argument_group(what)
    g.add_argument("--finetune-epochs", type=int, default=0, help=f"{what} epochs (0: none)")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--schedule", default=d.schedule,
                   choices=["cosine", "multistep", "onecycle", "constant"])
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--resume", action="store_true", help=f"continue {what} from OUT")


def _finetune_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.finetune_epochs, lr=args.lr, batch_size=args.batch_size,
                       weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed)


def _finetune(args: argparse.Namespace, model: nn.Module, spec: ModelSpec, test: BatchLoader,
              out: Path, result: dict, train_fn, key: str, what: str) -> None:
    """The optional retraining of prune and quantize (--finetune-epochs and friends)."""
    if not args.finetune_epochs:
        return
    cfg = _finetune_config(args)
    train_fn(model, train_loader(args, spec, cfg), cfg, test_loader=test, out_dir=out,
             resume=args.resume, desc=what)
    _, result[key] = evaluate(model, test)
    result["finetune"] = dataclasses.asdict(cfg)
    print(f"after {cfg.epochs} epochs of {what}: {result[key] * 100:.2f}%")


def cmd_train(args: argparse.Namespace) -> int:
    mean, std = parse_normalize(args.normalize or "cifar")
    spec = ModelSpec(arch=args.arch or "resnet20", mean=mean, std=std)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        seed=args.seed, precision=args.precision, compile=args.compile,
    )
    torch.manual_seed(cfg.seed)
    model = spec.build()
    train = train_loader(args, spec, cfg)
    test = test_loader(args, spec)
    out = Path(args.out)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        (out / "command.txt").write_text("deepzip " + shlex.join(sys.argv[1:]) + "\n")
    t0 = time.time()
    history = fit(model, train, cfg, test_loader=test, out_dir=out, resume=args.resume,
                  desc=spec.arch)
    if not is_main_process():
        return 0
    save_checkpoint(model, spec, out / "model.pt")
    final = history[-1] if history else {}
    print(f"saved {out / 'model.pt'}; test accuracy {final.get('test_acc', float('nan')):.4f}"
          f" after {len(history)} epochs ({(time.time() - t0) / 60:.1f} min this run)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    model, spec = resolve_model(args)
    model.to(_device(args))
    loss, acc = evaluate(model, test_loader(args, spec, args.batch_size))
    n = args.subset or 10000
    result = {"model": args.model, "arch": spec.arch, "test_acc": acc, "test_loss": loss,
              "images": n, "mean": list(spec.mean), "std": list(spec.std)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model}: test accuracy {acc * 100:.2f}% on {n} CIFAR-10 test images "
              f"(loss {loss:.4f})")
    return 0


def _write_json(path: Path, obj: object) -> None:
    from .atomic import atomic_write

    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _prune_config(args: argparse.Namespace):
    from .prune import PruneConfig

    amount = {"percentile": args.q, "std": args.s, "global": args.sparsity}[args.method]
    if amount is None:
        flag = {"percentile": "--q", "std": "--s", "global": "--sparsity"}[args.method]
        raise DeepzipError(f"--method {args.method} needs {flag}")
    return PruneConfig(args.method, amount, include=args.include or ["*"],
                       exclude=args.exclude or [])


def cmd_prune(args: argparse.Namespace) -> int:
    from .prune import bake_, finetune_after_prune, prune_, sparsity_of
    from .report import summary

    pcfg = _prune_config(args)
    model, spec = resolve_model(args)
    device = _device(args)
    test = test_loader(args, spec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(device)
    _, acc0 = evaluate(model, test)
    prune_(model, pcfg)
    _, acc1 = evaluate(model, test)
    result = {"method": pcfg.method, "amount": pcfg.amount, "sparsity": sparsity_of(model),
              "acc_before": acc0, "acc_pruned": acc1}
    print(f"pruned ({pcfg.method} {pcfg.amount}): sparsity {result['sparsity']:.4f}, "
          f"accuracy {acc0 * 100:.2f}% -> {acc1 * 100:.2f}%")
    _finetune(args, model, spec, test, out, result, finetune_after_prune, "acc_retrained",
              "masked retraining")
    bake_(model)
    save_checkpoint(model, spec, out / "model.pt")
    _write_json(out / "prune.json", {**result, "summary": summary(model)})
    print(f"saved {out / 'model.pt'} and {out / 'prune.json'}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import QuantizeConfig, codebooks, dequantize_, quantize_, train_centroids
    from .report import plot_weight_sharing

    qcfg = QuantizeConfig(bits=args.bits, bits_conv=args.bits_conv,
                          bits_linear=args.bits_linear, init=args.init, seed=args.seed,
                          exclude=args.exclude or [])
    model, spec = resolve_model(args)
    model.to(_device(args))
    test = test_loader(args, spec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, acc0 = evaluate(model, test)
    names = args.plot_layers or []
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in names}
    layers = quantize_(model, qcfg)
    _, acc1 = evaluate(model, test)
    result = {"config": dataclasses.asdict(qcfg), "acc_before": acc0, "acc_quantized": acc1,
              "layers": layers}
    print(f"quantized ({args.init} init): accuracy {acc0 * 100:.2f}% -> {acc1 * 100:.2f}%")
    _finetune(args, model, spec, test, out, result, train_centroids, "acc_trained",
              "centroid training")
    books = codebooks(model)
    missing = [n for n in names if n not in books]
    if missing:
        raise DeepzipError(f"--plot-layers: no quantized layer {', '.join(missing)}")
    after = {n: books[n].codebook.detach().clone() for n in names}
    dequantize_(model)
    if names:
        weights = dict(model.named_modules())
        plot_weight_sharing([(n, before[n], weights[n].weight, after[n]) for n in names],
                            out / "weights.png", title=f"{args.model}, {args.init} init")
    save_checkpoint(model, spec, out / "model.pt")
    _write_json(out / "quantize.json", result)
    print(f"saved {out / 'model.pt'} and {out / 'quantize.json'}")
    return 0


def _size_table(info: dict) -> str:
    from .report import bytes_by_kind_line, text_table

    rows = [{**r, "shape": r["shape"], "huffman": r.get("huffman_avg", "")}
            for r in info["tensors"] if "clusters" in r]
    other = [r for r in info["tensors"] if "clusters" not in r]
    rows.append({"name": f"other ({len(other)} tensors)", "params": sum(r["params"] for r in
                                                                       other),
                 "encoding": "raw", "bytes": sum(r["bytes"] for r in other)})
    rows.append({"name": "header", "bytes": info["header_bytes"]})
    table = text_table(rows, ["name", "shape", "params", "nonzero", "clusters", "bits",
                              "huffman", "encoding", "gap_bits", "bytes"])
    kinds = bytes_by_kind_line(info["bytes_by_kind"])
    return (f"{table}\n\nfile: {info['file_bytes']:,} bytes ({kinds}); fp32 state_dict "
            f"(torch.save): {info['state_dict_bytes']:,} bytes\n"
            f"real compression: {info['real_ratio']:.2f}x on disk\n" + (
                f"assignment formula: {info['formula_ratio']:.2f}x "
                f"({info['shared_nonzero']:,} of {info['shared_weights']:,} weights nonzero, "
                f"Huffman {info['huffman_avg']:.3f} bits on average)"
                if info["formula_ratio"] else
                "assignment formula: n/a (no shared weights: run deepzip quantize first)"))


def cmd_encode(args: argparse.Namespace) -> int:
    from . import dzip

    model, spec = resolve_model(args)
    out = Path(args.output)
    dzip.save(model, out, spec=spec, raw_dtype=args.raw_dtype,
              codebook_dtype=args.codebook_dtype, fold_batchnorm=args.fold_batchnorm)
    print(_size_table(dzip.inspect(out)))
    print(f"wrote {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import dzip

    info = dzip.inspect(args.file)
    print(json.dumps(info) if args.json else _size_table(info))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from . import dzip

    state, spec = dzip.load_state(args.file)
    model = dzip.load(args.file, (ModelSpec(arch=args.arch) if args.arch else spec or
                                  ModelSpec()).build())
    save_checkpoint(model, spec or ModelSpec(arch=args.arch or "resnet20"), args.output)
    print(f"wrote {args.output} ({len(state)} tensors, fp32 state_dict)")
    return 0


def _recipe_path(name: str | None) -> str:
    """A recipe file, or the name of one shipped with deepzip (default, seed, ...)."""
    from importlib import resources

    if name is None:
        name = "default"
    if os.path.exists(name):
        return name
    ref = resources.files("deepzip") / "recipes" / f"{name}.yaml"
    if ref.is_file():
        return str(ref)
    shipped = sorted(p.name.removesuffix(".yaml") for p in
                     (resources.files("deepzip") / "recipes").iterdir())
    raise DeepzipError(f"no recipe file {name!r}; shipped recipes: {', '.join(shipped)}")


def cmd_run(args: argparse.Namespace) -> int:
    import shutil

    from .pipeline import DataSource, Pipeline
    from .recipe import load_recipe

    path = _recipe_path(args.recipe)
    recipe = load_recipe(path)
    if args.model:
        recipe.model = args.model
    if args.reference:
        recipe.reference = args.reference
    out = Path(args.out or f"runs/{recipe.name}")
    if args.restart and out.exists():
        shutil.rmtree(out)
    data = DataSource(args.data_dir, args.download, args.subset, _device(args))
    pipe = Pipeline(recipe, out, data)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / "recipe.yaml")
        (out / "command.txt").write_text("deepzip " + shlex.join(sys.argv[1:]) + "\n")
    report = pipe.run()
    if not is_main_process():
        return 0
    s = report["summary"]
    fr = f"{s['formula_ratio']:.1f}x" if s["formula_ratio"] else "n/a"
    print(f"\n{recipe.name}: accuracy {s['baseline_acc'] * 100:.2f}% -> "
          f"{s['decoded_acc'] * 100:.2f}% (decoded .dzip), {s['file_bytes']:,} bytes on disk: "
          f"{s['real_ratio']:.1f}x real, {fr} by the assignment's formula\n"
          f"report: {out / 'report.md'}")
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from .report import markdown_table, plot_pareto

    reports = []
    for d in args.runs:
        f = Path(d) / "report.json"
        if not f.is_file():
            raise DeepzipError(f"no report.json in {d} (run deepzip run first)")
        report = json.loads(f.read_text())
        report["summary"]["run"] = Path(d).name
        reports.append(report)
    plot_pareto(reports, args.output)
    rows = [r["summary"] for r in reports]
    print(markdown_table(rows, ["run", "recipe", "baseline_acc", "decoded_acc", "sparsity",
                                "formula_ratio", "real_ratio", "file_bytes"]))
    print(f"wrote {args.output}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from .report import plot_filter_norms, structure, summary, text_table

    model, _ = resolve_model(args)
    s = summary(model)
    if args.structure:
        s["structure"] = structure(model, args.structure)
    if args.plot:
        plot_filter_norms(model, args.structure or [n["name"] for n in s["layers"][:1]],
                          args.plot, title=str(args.model))
    if args.json:
        print(json.dumps(s))
        return 0
    rows = s["layers"] + [{"name": "total", **s["total"]}]
    print(text_table(rows, ["name", "shape", "params", "nonzero", "sparsity"]))
    print(f"(+{s['total']['other_params']} bias/BatchNorm parameters, not pruned)")
    for name, st in s.get("structure", {}).items():
        zf = st["filter_zero_fraction"]
        print(f"{name}: {st['empty_filters']}/{len(zf)} all-zero filters, "
              f"{st['empty_channels']}/{len(st['channel_zero_fraction'])} all-zero input "
              f"channels; filter zero fraction {min(zf):.2f}..{max(zf):.2f}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from .prune import sensitivity, targets_from_sensitivity
    from .report import plot_sensitivity, write_csv

    model, spec = resolve_model(args)
    model.to(_device(args))
    test = test_loader(args, spec)
    try:
        levels = tuple(float(v) for v in args.levels.split(","))
    except ValueError:
        raise DeepzipError(f"bad --levels {args.levels!r}: use e.g. 0.1,0.5,0.9") from None
    rows = sensitivity(model, lambda m: evaluate(m, test)[1], levels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sensitivity.csv", rows)
    plot_sensitivity(rows, out / "sensitivity.png")
    targets = targets_from_sensitivity(rows, args.max_drop)
    _write_json(out / "sensitivity.json", {"rows": rows, "max_drop": args.max_drop,
                                           "targets": targets})
    print(f"wrote {out}/sensitivity.csv, .json, .png; per-layer targets within "
          f"{args.max_drop * 100:.1f} points: " + ", ".join(f"{k}={v}" for k, v in
                                                           targets.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepzip", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"deepzip {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from scratch on CIFAR-10")
    t.add_argument("--model", dest="arch", default="resnet20", choices=available())
    t.add_argument("--normalize", default=None, metavar="SPEC",
                   help="cifar (default), imagenet, or R,G,B/R,G,B")
    d = TrainConfig()
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--schedule", default=d.schedule, choices=["cosine", "multistep",
                                                              "onecycle", "constant"])
    t.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    t.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--precision", default=d.precision, choices=["auto", "bf16", "fp16", "fp32"])
    t.add_argument("--compile", action="store_true", help="torch.compile the model (GPUs)")
    t.add_argument("--out", required=True, help="output folder (checkpoints, log, model.pt)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    _add_data_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="test accuracy of a model on CIFAR-10")
    _add_model_args(e, positional=True)
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _add_data_args(e)
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("prune", help="magnitude-prune a model, optionally retrain with masks")
    _add_model_args(pr, positional=True)
    pr.add_argument("--method", default="percentile", choices=["percentile", "std", "global"])
    pr.add_argument("--q", type=float, help="percentile: fraction of each layer to prune")
    pr.add_argument("--s", type=float, help="std: prune |w| < s * std(w) per layer")
    pr.add_argument("--sparsity", type=float, help="global: model-wide fraction to prune")
    pr.add_argument("--include", action="append", metavar="GLOB",
                    help="only layers matching (repeatable; default all Conv/Linear)")
    pr.add_argument("--exclude", action="append", metavar="GLOB",
                    help="skip layers matching, e.g. --exclude conv1 --exclude linear")
    _add_finetune_args(pr, "masked retraining", FINETUNE)
    pr.add_argument("--out", "-o", required=True, help="output folder (model.pt, prune.json)")
    _add_data_args(pr)
    pr.set_defaults(func=cmd_prune)

    q = sub.add_parser("quantize", help="k-means weight sharing, optionally trained centroids")
    _add_model_args(q, positional=True)
    q.add_argument("--bits", type=int, default=5, help="bits per shared weight (1..8)")
    q.add_argument("--bits-conv", type=int, help="bits for conv layers (overrides --bits)")
    q.add_argument("--bits-linear", type=int, help="bits for linear layers")
    q.add_argument("--init", default="linear", choices=list(INITS))
    q.add_argument("--exclude", action="append", metavar="GLOB", help="layers to leave alone")
    q.add_argument("--plot-layers", nargs="+", metavar="LAYER",
                   help="plot these layers' weights before/after (OUT/weights.png)")
    _add_finetune_args(q, "centroid training", CENTROID_TRAINING)
    q.add_argument("--out", "-o", required=True, help="output folder (model.pt, quantize.json)")
    _add_data_args(q)
    q.set_defaults(func=cmd_quantize)

    r = sub.add_parser("run", help="the whole pipeline: prune, quantize, encode, verify, report")
    r.add_argument("recipe", nargs="?", default=None, metavar="RECIPE",
                   help="recipe file or shipped name: default (the default), seed, share-3bit, "
                        "share-5bit, smoke")
    r.add_argument("--model", default=None, help="start from this checkpoint instead")
    r.add_argument("--reference", default=None, metavar="MODEL",
                   help="measure the accuracy loss against (and distill from) this model "
                        "instead of the starting one, e.g. --model a pruned checkpoint "
                        "--reference resnet20")
    r.add_argument("--out", default=None, help="run folder (default runs/RECIPE-NAME)")
    r.add_argument("--restart", action="store_true", help="discard an earlier run in --out")
    _add_data_args(r)
    r.set_defaults(func=cmd_run)

    pa = sub.add_parser("pareto", help="accuracy vs real compression across runs")
    pa.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pa.add_argument("-o", "--output", default="pareto.png")
    pa.set_defaults(func=cmd_pareto)

    en = sub.add_parser("encode", help="write a quantized model as a compressed .dzip file")
    _add_model_args(en, positional=True)
    en.add_argument("-o", "--output", required=True, metavar="FILE.dzip")
    en.add_argument("--raw-dtype", default="float16", choices=["float16", "float32"],
                    help="storage of BatchNorm, biases and unshared weights")
    en.add_argument("--codebook-dtype", default="float32", choices=["float16", "float32"])
    en.add_argument("--fold-batchnorm", action=argparse.BooleanOptionalAction, default=True,
                    help="store each BatchNorm as its eval-mode scale and shift (default on)")
    en.set_defaults(func=cmd_encode)

    ins = sub.add_parser("inspect", help="per-layer sizes and compression ratios of a .dzip")
    ins.add_argument("file", metavar="FILE.dzip")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)

    de = sub.add_parser("decode", help="turn a .dzip file back into a PyTorch checkpoint")
    de.add_argument("file", metavar="FILE.dzip")
    de.add_argument("-o", "--output", required=True, metavar="FILE.pt")
    de.add_argument("--arch", default=None, choices=available())
    de.set_defaults(func=cmd_decode)

    sm = sub.add_parser("summary", help="per-layer parameters, nonzeros and sparsity")
    _add_model_args(sm, positional=True)
    sm.add_argument("--structure", nargs="+", metavar="LAYER",
                    help="per-filter/per-channel zero fraction and L1 norm of these layers")
    sm.add_argument("--plot", metavar="PNG", help="plot per-filter L1 norms of --structure")
    sm.add_argument("--json", action="store_true")
    sm.set_defaults(func=cmd_summary)

    se = sub.add_parser("sensitivity", help="prune each layer alone at several levels")
    _add_model_args(se, positional=True)
    se.add_argument("--levels", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    se.add_argument("--max-drop", type=float, default=0.01,
                    help="accuracy budget per layer for the derived targets (0.01 = 1 point)")
    se.add_argument("--out", "-o", required=True)
    _add_data_args(se)
    se.set_defaults(func=cmd_sensitivity)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dist_device = init_distributed_from_env()
        if dist_device is not None and getattr(args, "device", "") is None:
            args.device = str(dist_device)
        return args.func(args)
    except DeepzipError as e:
        print(f"deepzip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepzip: interrupted", file=sys.stderr)
        return 130
