"""The ``deepzip`` command: a thin layer over the Python API.

User mistakes (bad arguments, missing files, mismatched checkpoints) end with one line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import stages
from .atomic import output_kind, read_limited, unless_null
from .checkpoint import ModelSpec, save_checkpoint
from .codecs import BOOK_DTYPES, RAW_DTYPES
from .errors import DeepzipError
from .loading import load_model
from .models import available, resolve_arch
from .prune import FINETUNE
from .qat import CENTROID_TRAINING
from .quantize import INITS
from .recipe import shipped_recipes
from .task import TASKS, Task, resolve_task
from .train import (
    PRECISIONS,
    SCHEDULES,
    TrainConfig,
    default_device,
    fit,
    init_distributed_from_env,
    is_main_process,
)
from .version import __version__

TASK_HELP = (f"what the model is for: {', '.join(TASKS)}, or package.module:function "
             "returning a deepzip Task (default: the task the model records, else cifar10)")
ARCH_HELP = (f"architecture of a checkpoint without deepzip metadata: {', '.join(available())}"
             ", or package.module:Factory for your own (default: resnet20)")


def _add_validation_from(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--validation-from", choices=["train", "test"], default=None,
                   help="hold --validation's examples out of the training images (for a "
                        "model trained without them) or the test images (for a model that "
                        "saw every training image: the test set is then the rest); "
                        f"default: {default}")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", default=None, metavar="TASK", help=TASK_HELP)
    g.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ and MNIST/raw/ "
                   "(default: $DEEPZIP_DATA, then ~/.cache/deepzip/data)")
    g.add_argument("--download", action="store_true",
                   help="download the data set into the data folder if it is missing")
    g.add_argument("--subset", type=int, default=None, metavar="N",
                   help="use only the first N examples of each split (quick runs)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")


def _add_model_args(p: argparse.ArgumentParser, *, positional: bool) -> None:
    if positional:
        p.add_argument("model", metavar="MODEL",
                       help="checkpoint, .dzip file, or the name of a shipped model "
                            "(resnet20, lenet300, lenet5)")
    p.add_argument("--arch", default=None, metavar="ARCH", help=ARCH_HELP)
    p.add_argument("--normalize", default=None, metavar="SPEC",
                   help="input normalization the weights were trained with: cifar, imagenet, "
                        "mnist or M,.../S,... per channel (default: from the file, else the "
                        "task's)")


def _axes(text: str) -> tuple[int, ...]:
    try:
        axes = tuple(sorted({int(a) for a in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: axes as numbers, e.g. 0,1") from None
    if any(a < 0 for a in axes):
        raise argparse.ArgumentTypeError(f"{text!r}: axes are counted from 0")
    return axes


def _budget_arg(text: str) -> float | str:
    """``--max-loss``: a plain number stays a number (the recipe's form); text such as
    ``1%`` or ``0.01 mse`` is checked when the recipe is."""
    try:
        return float(text)
    except ValueError:
        return text


def _task(args: argparse.Namespace, recorded: str | None = None) -> Task:
    """The task of ``--task``, else the one a model file records, built once per command.

    A recorded task is only ever a shipped task's name: a file never makes deepzip import
    code, so one that records ``package.module:function`` is refused with the flag to
    pass (the user's own choice)."""
    name = getattr(args, "task", None)
    if name is None and recorded and recorded not in TASKS:
        how = (f"--task {shlex.quote(recorded)} if you trust it" if ":" in recorded else
               "--task package.module:function, the entry point that makes that task")
        raise DeepzipError(f"the model records the task {recorded!r}, not one deepzip ships "
                           f"({', '.join(TASKS)}), and deepzip never runs code a file names: "
                           f"pass {how}")
    name = name or recorded or "cifar10"
    cache = args.__dict__.setdefault("_tasks", {})
    if name not in cache:
        cache[name] = resolve_task(name, args.data_dir, download=args.download,
                                   subset=args.subset, device=_device(args),
                                   validation=getattr(args, "validation", None) or 0,
                                   validation_from=getattr(args, "validation_from", None)
                                   or "train")
    return cache[name]


def resolve_model(args: argparse.Namespace) -> tuple[nn.Module, ModelSpec]:
    """MODEL argument -> (model, spec): a checkpoint, a .dzip file or a shipped name.

    ``--normalize`` overrides the file's own normalization; ``--arch`` names the
    architecture of a checkpoint that carries no deepzip metadata. With ``--task``, a file
    that records no normalization gets the task's.
    """
    task = _task(args) if getattr(args, "task", None) else None
    return load_model(args.model, arch=args.arch, normalize=args.normalize, task=task)


def model_and_task(args: argparse.Namespace) -> tuple[nn.Module, ModelSpec, Task]:
    """The model, and the task of ``--task`` or else the one the model records."""
    model, spec = resolve_model(args)
    model.to(_device(args))
    task = _task(args, spec.task)
    task.check(model, task.eval_loader(mean=spec.mean, std=spec.std))  # one line if unfit
    return model, spec, task


def _device(args: argparse.Namespace) -> torch.device:
    if args.device is None:
        return default_device()
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise DeepzipError(f"bad --device {args.device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise DeepzipError(f"--device {args.device}: deepzip runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeepzipError("--device cuda requested but CUDA is not available")
    return dev


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


def _finetune_config(args: argparse.Namespace) -> TrainConfig | None:
    """The retraining of prune and quantize (--finetune-epochs and friends); None: none."""
    if not args.finetune_epochs:
        return None
    return TrainConfig(epochs=args.finetune_epochs, lr=args.lr, batch_size=args.batch_size,
                       weight_decay=args.weight_decay, schedule=args.schedule, seed=args.seed)


def _retrained(model: nn.Module, spec: ModelSpec, task: Task, result: dict,
               cfg: TrainConfig | None, key: str, what: str) -> None:
    """The score after the optional retraining of prune and quantize, into ``result``."""
    if cfg is None:
        return
    result[key] = stages.score(model, task, spec).value
    result["finetune"] = dataclasses.asdict(cfg)
    print(f"after {cfg.epochs} epochs of {what}: {_fmt(task, result[key])}")


def _fmt(task: Task, value: float) -> str:
    """A metric value as people read it: accuracy in percent, anything else as a number."""
    return f"{value * 100:.2f}%" if task.metric.name == "acc" else \
        f"{task.metric.name} {value:.6g}"


def cmd_train(args: argparse.Namespace) -> int:
    from .normalization import parse_normalize

    cfg = TrainConfig(  # settings are checked before any data is read
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        seed=args.seed, precision=args.precision, compile=args.compile,
    )
    task = _task(args)
    mean, std = parse_normalize(args.normalize) if args.normalize else (
        task.normalization or ((), ()))
    spec = ModelSpec(arch=resolve_arch(args.arch), mean=mean, std=std, task=task.name)
    torch.manual_seed(cfg.seed)
    model = spec.build()
    train = stages.train_loader(task, spec, cfg)
    out = Path(args.out)
    if is_main_process():
        _write_text(out / "command.txt", _command(args) + "\n")
    t0 = time.time()
    history = fit(model, train, cfg, **stages.training(task, spec, out_dir=out,
                                                       resume=args.resume, desc=spec.arch))
    if not is_main_process():
        return 0
    save_checkpoint(model, spec, out / "model.pt")
    on = task.decision_split
    final = history[-1].get(f"{on}_{task.metric.name}") if history else None
    print(f"saved {out / 'model.pt'}; {on} {task.metric.name} "
          f"{final if final is None else f'{final:.4f}'} after {len(history)} epochs "
          f"({(time.time() - t0) / 60:.1f} min this run)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    model, spec, task = model_and_task(args)
    on, loss, value = ("val", *stages.decision_score(model, task, spec)) if args.validation \
        else ("test", *stages.score(model, task, spec))
    m = task.metric.name
    data = (task.val_description if args.validation else task.description or task.name)
    result = {"model": args.model, "arch": spec.arch, "task": task.name, "metric": m,
              f"{on}_{m}": value, f"{on}_loss": loss,
              "examples": task.val_size if args.validation else task.eval_size,
              "mean": list(spec.mean), "std": list(spec.std)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model}: {on} {_fmt(task, value)} on {data} (loss {loss:.4f})")
    return 0


def _write_json(path: Path, obj: object) -> None:
    _write_text(path, json.dumps(obj, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    from .atomic import atomic_write

    with atomic_write(path, "w") as f:
        f.write(text)


def _prune_config(args: argparse.Namespace):
    from .prune import PruneConfig

    amount = {"percentile": args.q, "std": args.s, "global": args.sparsity}[args.method]
    if amount is None:
        flag = {"percentile": "--q", "std": "--s", "global": "--sparsity"}[args.method]
        raise DeepzipError(f"--method {args.method} needs {flag}")
    return PruneConfig(args.method, amount, include=args.include, exclude=args.exclude or [])


def cmd_prune(args: argparse.Namespace) -> int:
    from .report import summary

    pcfg, retrain = _prune_config(args), _finetune_config(args)
    model, spec, task = model_and_task(args)
    m = task.metric.name
    out = Path(args.out)
    before = stages.score(model, task, spec).value
    result: dict = {"method": pcfg.method, "amount": pcfg.amount, "metric": m,
                    f"{m}_before": before}

    def pruned(_model: nn.Module) -> None:  # reported between pruning and retraining
        result.update(sparsity=stages.sparsity(model), **{
            f"{m}_pruned": stages.score(model, task, spec).value})
        print(f"pruned ({pcfg.method} {pcfg.amount}): sparsity {result['sparsity']:.4f}, "
              f"{_fmt(task, before)} -> {_fmt(task, result[f'{m}_pruned'])}")

    stages.prune_step(model, task, spec, pcfg, retrain, out_dir=out, resume=args.resume,
                      desc="masked retraining", after_prune=pruned)
    _retrained(model, spec, task, result, retrain, f"{m}_retrained", "masked retraining")
    stages.bake(model)
    save_checkpoint(model, spec, out / "model.pt")
    _write_json(out / "prune.json", {**result, "summary": summary(model)})
    print(f"saved {out / 'model.pt'} and {out / 'prune.json'}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import QuantizeConfig
    from .render import plot_weight_sharing

    qcfg = QuantizeConfig(bits=args.bits, bits_conv=args.bits_conv,
                          bits_linear=args.bits_linear, init=args.init, seed=args.seed,
                          exclude=args.exclude or [], entropy_weight=args.entropy_weight,
                          target_bits=args.target_bits)
    centroids = _finetune_config(args)
    model, spec, task = model_and_task(args)
    m = task.metric.name
    out = Path(args.out)
    before = stages.score(model, task, spec).value
    names = args.plot_layers or []
    targets = stages.weights(model)
    missing = [n for n in names if n not in targets]
    if missing:
        raise DeepzipError(f"--plot-layers: no layer {', '.join(missing)}; layers: "
                           + ", ".join(targets))
    weights_before = {n: targets[n].detach().clone() for n in names}
    shared = stages.share(
        model, task, spec, qcfg, centroids=centroids, out_dir=out, resume=args.resume,
        fisher=TrainConfig(batch_size=128, seed=args.seed) if args.sensitivity == "fisher"
        else None)
    print(f"quantized ({args.init} init): {_fmt(task, before)} -> "
          f"{_fmt(task, shared.score_kmeans)}")
    result = {"config": dataclasses.asdict(shared.config), "metric": m, f"{m}_before": before,
              f"{m}_quantized": shared.score_kmeans, "layers": shared.layers}
    _retrained(model, spec, task, result, centroids, f"{m}_trained", "centroid training")
    books = stages.shared_values(model)
    missing = [n for n in names if n not in books]
    if missing:
        raise DeepzipError(f"--plot-layers: {', '.join(missing)} not quantized (excluded?)")
    after = {n: books[n].clone() for n in names}
    stages.unshare(model)
    if names:
        plot_weight_sharing([(n, weights_before[n], stages.weights(model)[n], after[n])
                             for n in names], out / "weights.png",
                            title=f"{args.model}, {args.init} init")
    save_checkpoint(model, spec, out / "model.pt")
    _write_json(out / "quantize.json", result)
    print(f"saved {out / 'model.pt'} and {out / 'quantize.json'}")
    return 0


def _size_table(info: Any) -> str:
    """``deepzip encode``'s and ``inspect``'s table of a file's sizes (a FileInfo)."""
    from .render import bytes_by_kind_line, text_table

    rows = [{**t.to_dict(), "huffman": t.huffman_avg} for t in info.tensors if t.shared]
    other = [t for t in info.tensors if not t.shared]
    rows.append({"name": f"other ({len(other)} tensors)",
                 "params": sum(t.params for t in other), "encoding": "raw",
                 "bytes": sum(t.bytes for t in other)})
    rows.append({"name": "header", "bytes": info.header_bytes})
    table = text_table(rows, ["name", "shape", "params", "nonzero", "clusters", "bits",
                              "huffman", "encoding", "gap_bits", "bytes"])
    kinds = bytes_by_kind_line(info.bytes_by_kind)
    return (f"{table}\n\nfile: {info.file_bytes:,} bytes ({kinds}); fp32 state_dict "
            f"(as torch.save writes it, tied tensors once): {info.state_dict_bytes:,} "
            f"bytes\nreal compression: {info.real_ratio:.2f}x on disk (state_dict / file), "
            f"{8 * info.file_bytes / max(1, info.params):.3f} bits per parameter "
            f"({info.params:,} parameters)\n" + (
                f"indices-only ratio: {info.formula_ratio:.2f}x "
                f"({info.shared_nonzero:,} of {info.shared_weights:,} weights nonzero, "
                f"Huffman {info.huffman_avg:.3f} bits on average)"
                if info.formula_ratio else
                "indices-only ratio: n/a (no shared weights: run deepzip quantize first)"))


def cmd_encode(args: argparse.Namespace) -> int:
    from . import dzip_torch

    output_kind(args.output)  # before any work
    model, spec = resolve_model(args)
    out = Path(args.output)
    changed = dzip_torch.precision_changes(model, args.raw_dtype, args.codebook_dtype,
                                           args.fold_batchnorm)
    print(_size_table(stages.encode(model, spec, out, raw_dtype=args.raw_dtype,
                                    codebook_dtype=args.codebook_dtype,
                                    fold_batchnorm=args.fold_batchnorm)))
    if changed:
        print(f"note: {len(changed)} tensors are not at the file's precision "
              f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): the file "
              f"holds them rounded ({args.raw_dtype} stores, {args.codebook_dtype} codebooks"
              f"{', folded BatchNorm' if args.fold_batchnorm else ''}), so its outputs can "
              "differ "
              "slightly from the checkpoint's; --raw-dtype float32 --codebook-dtype float32 "
              "--no-fold-batchnorm stores them exactly")
    print(f"wrote {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import dzip_torch

    info = dzip_torch.info(args.file)
    print(json.dumps(info.to_dict()) if args.json else _size_table(info))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    """A .dzip back to a plain checkpoint: a state_dict needs no architecture; with
    --arch (or a registered one in the file) it is also checked against the model."""
    from . import dzip_torch
    from .atomic import atomic_torch_save
    from .checkpoint import load_state_dict_strict, plain_state_dict

    output_kind(args.output)
    state, spec = dzip_torch.load_state(args.file)
    if args.arch:
        spec = dataclasses.replace(spec or ModelSpec(), arch=resolve_arch(args.arch))
        load_state_dict_strict(spec.build(), state)
    arch = f", architecture {spec.arch}" if spec else ""
    if str(args.output).endswith(".safetensors"):
        from .export import to_safetensors

        kinds = to_safetensors(state, args.output, sparse=args.sparse, metadata={
            "format": "pt", **({"deepzip.spec": json.dumps(spec.to_dict())} if spec else {})})
        print(f"wrote {args.output} ({len(kinds['dense'])} dense tensors, "
              f"{len(kinds['sparse'])} as indices + values{arch})"
              + ("; --sparse: indices + values would be larger than dense for every tensor, "
                 "so all are dense" if args.sparse and not kinds["sparse"] else ""))
        return 0
    if args.sparse:
        raise DeepzipError("--sparse applies to .safetensors output")
    atomic_torch_save(plain_state_dict(state, spec), args.output)
    print(f"wrote {args.output} ({len(state)} tensors, a plain fp32 state_dict: "
          f"model.load_state_dict(torch.load(path)) takes it{arch})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A model to ONNX, checked, and compared with PyTorch on the task's evaluation data
    where onnxruntime is installed. By default the graph takes images scaled to [0, 1]
    and normalizes them itself, so what is deployed scores what deepzip reports."""
    from .checkpoint import require
    from .export import Normalized, to_onnx

    require("onnx"), require("onnxscript")  # before any data is read
    output_kind(args.output)
    model, spec, task = model_and_task(args)
    loader = task.eval_loader(mean=spec.mean, std=spec.std)
    images = next(iter(loader))[0].is_floating_point()  # token ids are never normalized
    inside = bool(spec.mean) and not args.no_normalize and images
    if inside:  # the task's images before normalization: what a deployment feeds
        c = len(spec.mean)
        loader = task.eval_loader(mean=(0.0,) * c, std=(1.0,) * c)
        reference = Normalized(model, spec.mean, spec.std)
        wants = (f"NCHW float32 images scaled to [0, 1]; the graph normalizes with mean "
                 f"{list(spec.mean)}, std {list(spec.std)}")
    else:
        reference = model
        wants = ("normalized input: (x - mean) / std per channel with mean "
                 f"{list(spec.mean)}, std {list(spec.std)}" if spec.mean and images else
                 "the model's input as the task's loader gives it")
    example, _ = next(iter(loader))
    with unless_null(args.output) as target:  # -o /dev/null: the same checks, nothing kept
        packed = to_onnx(model, example, target, opset=args.opset,
                         packed=not args.fp32_weights, dynamic_axes=args.dynamic_axes,
                         mean=spec.mean if inside else (), std=spec.std if inside else (),
                         metadata={"deepzip.input": wants,
                                   "deepzip.mean": json.dumps(list(spec.mean)),
                                   "deepzip.std": json.dumps(list(spec.std)),
                                   "deepzip.normalization_in_graph": str(inside).lower(),
                                   "deepzip.task": task.name, "deepzip.arch": spec.arch,
                                   "deepzip.version": __version__})
        how = (f"{len(packed.packed)} shared weights packed as codebooks and indices, "
               "rebuilt by standard operators when a session starts"
               if packed and packed.packed else "weights as fp32")
        dynamic = ", ".join("batch" if a == 0 else f"axis {a}" for a in args.dynamic_axes)
        print(f"wrote {args.output} ({target.stat().st_size:,} bytes: {how}; ONNX opset "
              f"{args.opset}, dynamic {dynamic}; onnx.checker passed); input: {wants}")
        _check_onnx(reference, target, loader, task, spec, model,
                    "[0, 1] images" if inside else "normalized input" if images
                    else "token ids")
    return 0


def _check_onnx(reference: nn.Module, path: Path, loader, task: Task, spec: ModelSpec,
                model: nn.Module, fed: str) -> None:
    """onnxruntime against PyTorch on the task's evaluation data, printed: the largest
    output difference, equal predictions (per token for a sequence model) and, for an
    accuracy, both accuracies."""
    from .export import compare_onnx

    try:
        result = compare_onnx(reference, path, loader)
    except DeepzipError as e:
        print(f"not compared with onnxruntime: {e}")
        return
    unit = "tokens" if fed == "token ids" else "examples"
    same = (f", predictions equal on {result['same_predictions']}/{result['examples']} "
            f"{unit}" if task.classification else "")
    print(f"onnxruntime vs PyTorch on {task.description or task.name}: max output difference "
          f"{result['max_abs_diff']:.3g}{same}")
    if task.classification and task.metric.points and result["examples"]:
        value = stages.score(model, task, spec).value
        print(f"accuracy{' per token' if unit == 'tokens' else ''}: onnxruntime "
              f"{100 * result['onnx_correct'] / result['examples']:.2f}% on {fed}, deepzip "
              f"eval {100 * value:.2f}%")

OVERRIDES = ("model", "reference", "arch", "normalize", "task", "seed", "validation",
             "validation_from", "max_loss", "margin_se")


def cmd_run(args: argparse.Namespace) -> int:
    from .recipe import load_recipe, recipe_path
    from .runfolder import run_folder

    path = recipe_path(args.recipe)
    recipe = load_recipe(path)
    for key in OVERRIDES:
        if getattr(args, key) is not None:
            setattr(recipe, key, getattr(args, key))
    recipe.validate()
    recipe.check_code(args.allow_code, where=path,  # the command line's own are the user's
                      given={k for k in ("task", "arch") if getattr(args, k) is not None})
    out = Path(args.out or f"runs/{recipe.name}")
    with run_folder(out, restart=args.restart):
        return _run(args, recipe, out)


def _run(args: argparse.Namespace, recipe, out: Path) -> int:
    from .pipeline import Pipeline
    from .runfolder import write_run_files

    task = resolve_task(recipe.task, args.data_dir, download=args.download,
                        subset=args.subset, device=_device(args),
                        validation=recipe.validation,
                        validation_from=recipe.validation_from)
    pipe = Pipeline(recipe, out, task, device=_device(args), command=_command(args))
    changed = any(getattr(args, k) is not None for k in OVERRIDES)
    write_run_files(out, recipe, pipe.command,
                    f" ({args.recipe or 'default'}" + (" with the command line's settings)"
                                                        if changed else ")"))
    report = pipe.run()
    if not is_main_process():
        return 0
    s = report["summary"]
    fr = f"{s['formula_ratio']:.1f}x" if s["formula_ratio"] else "n/a"
    print(f"\n{recipe.name}: {_fmt(task, s['baseline_score'])} -> "
          f"{_fmt(task, s['decoded_score'])} (decoded .dzip), {s['file_bytes']:,} bytes on "
          f"disk: {s['real_ratio']:.1f}x real, {fr} by the indices-only ratio\n"
          f"report: {out / 'report.md'}")
    return 0


def cmd_pareto(args: argparse.Namespace) -> int:
    from .render import markdown_table, plot_format, plot_pareto

    plot_format(args.output)
    reports = []
    for d in args.runs:
        f = Path(d) / "report.json"
        if not f.is_file():
            raise DeepzipError(f"no report.json in {d} (run deepzip run first)")
        try:
            report = json.loads(read_limited(f, 64 << 20, "report").decode())
            report["summary"]["run"] = Path(d).name
            for key in ("real_ratio", "recipe"):
                report["summary"][key]  # noqa: B018 - present, or the report is not ours
        except (ValueError, KeyError, TypeError):
            raise DeepzipError(f"{f} is not a deepzip report (damaged?)") from None
        reports.append(report)
    from .report import run_score

    rows = [r["summary"] for r in reports]
    for r in rows:
        r["baseline"], r["decoded"] = run_score(r, "baseline"), run_score(r, "decoded")
    kinds = {(r.get("task", "cifar10"), r.get("metric", "acc"), _examples(r)) for r in rows}
    if len(kinds) > 1:  # points scored on different data do not belong on one front
        raise DeepzipError("these runs were evaluated differently (task, metric, examples: "
                           + "; ".join(", ".join(map(str, k)) for k in sorted(kinds, key=str))
                           + "): compare runs of one task on the same evaluation set")
    plot_pareto(reports, args.output)
    print(markdown_table(rows, ["run", "recipe", "baseline", "decoded", "sparsity",
                                "formula_ratio", "real_ratio", "file_bytes"]))
    print(f"wrote {args.output}")
    return 0


def _examples(summary: dict) -> int | None:
    """How many examples a run was scored on (older reports say it only as "N/M")."""
    if summary.get("eval_examples"):
        return int(summary["eval_examples"])
    tail = str(summary.get("same_predictions") or "").rpartition("/")[2]
    return int(tail) if tail.isdigit() else None


def cmd_summary(args: argparse.Namespace) -> int:
    from .render import plot_filter_norms, plot_format, text_table
    from .report import structure, summary

    if args.plot:
        plot_format(args.plot)
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
    from .render import plot_sensitivity, write_csv

    try:
        levels = tuple(float(v) for v in args.levels.split(","))
    except ValueError:
        raise DeepzipError(f"bad --levels {args.levels!r}: use e.g. 0.1,0.5,0.9") from None
    model, spec, task = model_and_task(args)
    rows = stages.sensitivity_scan(model, task, spec, levels,
                                   score_fn=lambda m: stages.score(m, task, spec).value)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sensitivity.csv", rows)
    plot_sensitivity(rows, out / "sensitivity.png")
    targets = stages.layer_targets(rows, args.max_drop, task)
    _write_json(out / "sensitivity.json", {"rows": rows, "max_drop": args.max_drop,
                                           "targets": targets})
    print(f"wrote {out}/sensitivity.csv, .json, .png; per-layer targets within "
          f"{args.max_drop:g} of the unpruned {task.metric.name}: "
          + ", ".join(f"{k}={v}" for k, v in targets.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepzip", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"deepzip {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_train_command, _eval_command, _prune_command, _quantize_command,
                _run_command, _pareto_command, _encode_command, _inspect_command,
                _decode_command, _export_command, _summary_command, _sensitivity_command):
        add(sub)  # each command's flags, in the order `deepzip --help` lists them
    return p


def _train_command(sub: Any) -> None:
    """`deepzip train`: a baseline from scratch."""
    t = sub.add_parser("train", help="train a model from scratch on a task's data")
    t.add_argument("--model", dest="arch", default="resnet20", metavar="ARCH",
                   help=f"{', '.join(available())}, or package.module:Factory")
    t.add_argument("--normalize", default=None, metavar="SPEC",
                   help="cifar, imagenet, mnist, or M,.../S,... (default: the task's)")
    d = TrainConfig()
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--schedule", default=d.schedule, choices=SCHEDULES)
    t.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    t.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--precision", default=d.precision, choices=PRECISIONS)
    t.add_argument("--compile", action="store_true", help="torch.compile the model (GPUs)")
    t.add_argument("--validation", type=int, default=None, metavar="N",
                   help="hold the N training images out that `deepzip run --validation N` "
                        "decides on (the same fixed split), and evaluate on them while "
                        "training: a baseline whose validation data it never saw")
    t.add_argument("--out", required=True, help="output folder (checkpoints, log, model.pt)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    _add_data_args(t)
    t.set_defaults(func=cmd_train)


def _eval_command(sub: Any) -> None:
    e = sub.add_parser("eval", help="a model's test metric on its task's evaluation data")
    _add_model_args(e, positional=True)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--validation", type=int, default=None, metavar="N",
                   help="score on the N examples --validation N holds out instead")
    _add_validation_from(e, "train")
    _add_data_args(e)
    e.set_defaults(func=cmd_eval)


def _prune_command(sub: Any) -> None:
    pr = sub.add_parser("prune", help="magnitude-prune a model, optionally retrain with masks")
    _add_model_args(pr, positional=True)
    pr.add_argument("--method", default="percentile", choices=["percentile", "std", "global"])
    pr.add_argument("--q", type=float, help="percentile: fraction of each layer to prune")
    pr.add_argument("--s", type=float, help="std: prune |w| < s * std(w) per layer")
    pr.add_argument("--sparsity", type=float, help="global: model-wide fraction to prune")
    pr.add_argument("--include", action="append", metavar="GLOB",
                    help="only layers/parameters matching (repeatable; default: Conv, "
                         "Linear, Embedding, attention and RNN weights)")
    pr.add_argument("--exclude", action="append", metavar="GLOB",
                    help="skip layers matching, e.g. --exclude conv1 --exclude linear")
    _add_finetune_args(pr, "masked retraining", FINETUNE)
    pr.add_argument("--out", "-o", required=True, help="output folder (model.pt, prune.json)")
    _add_data_args(pr)
    pr.set_defaults(func=cmd_prune)


def _quantize_command(sub: Any) -> None:
    q = sub.add_parser("quantize", help="k-means weight sharing, optionally trained centroids")
    _add_model_args(q, positional=True)
    q.add_argument("--bits", type=int, default=5, help="bits per shared weight (1..8)")
    q.add_argument("--bits-conv", type=int, help="bits for conv layers (overrides --bits)")
    q.add_argument("--bits-linear", type=int, help="bits for linear layers")
    q.add_argument("--init", default="linear", choices=list(INITS))
    q.add_argument("--entropy-weight", type=float, default=0.0, metavar="BETA",
                   help="entropy-constrained clustering: > 0 trades squared error for "
                   "shorter Huffman codes (--bits becomes a cap)")
    q.add_argument("--target-bits", type=float, default=None, metavar="B",
                   help="with --entropy-weight: scale the penalties until the indices' Huffman "
                   "codes average at most B bits per nonzero weight (a size budget)")
    q.add_argument("--sensitivity", choices=["fisher"], default=None,
                   help="with --entropy-weight: weigh each layer's error by the loss's "
                   "Fisher sensitivity to it, so a bit costs the same loss everywhere")
    q.add_argument("--exclude", action="append", metavar="GLOB", help="layers to leave alone")
    q.add_argument("--plot-layers", nargs="+", metavar="LAYER",
                   help="plot these layers' weights before/after (OUT/weights.png)")
    _add_finetune_args(q, "centroid training", CENTROID_TRAINING)
    q.add_argument("--out", "-o", required=True, help="output folder (model.pt, quantize.json)")
    _add_data_args(q)
    q.set_defaults(func=cmd_quantize)


def _run_command(sub: Any) -> None:
    r = sub.add_parser("run", help="the whole pipeline: prune, quantize, encode, verify, report")
    r.add_argument("recipe", nargs="?", default=None, metavar="RECIPE",
                   help="recipe file or shipped name (default: default): "
                        + ", ".join(shipped_recipes()))
    r.add_argument("--model", default=None,
                   help="start from this checkpoint, .dzip or shipped model instead")
    r.add_argument("--reference", default=None, metavar="MODEL",
                   help="measure the accuracy loss against (and distill from) this model "
                        "instead of the starting one, e.g. --model a pruned checkpoint "
                        "--reference resnet20")
    r.add_argument("--arch", default=None, metavar="ARCH", help=ARCH_HELP)
    r.add_argument("--normalize", default=None, metavar="SPEC",
                   help="the model's input normalization (cifar, imagenet, mnist, M,.../S,...)")
    r.add_argument("--seed", type=int, default=None, help="the recipe's seed, for a repeat")
    r.add_argument("--validation", type=int, default=None, metavar="N",
                   help="hold N examples out as validation data: every decision of the run "
                        "reads them, the test set only the final evaluation (default: the "
                        "recipe's; the default recipe's: 5000)")
    _add_validation_from(r, "the recipe's (the default recipe's: test)")
    r.add_argument("--max-loss", type=_budget_arg, default=None, metavar="BUDGET",
                   help="the smallest file within this loss on validation data: a number "
                        "is points of accuracy (1) or a percent of any other metric's "
                        "baseline; 1%% is relative for any metric; '0.01 mse' absolute in "
                        "the metric's units (default: the recipe's; the default recipe's: "
                        "1); needs --validation")
    r.add_argument("--margin-se", type=float, default=None, metavar="K",
                   help="with --max-loss: hold each loss plus K of its standard errors "
                        "(paired over the validation examples) against the budget "
                        "(default: the recipe's; the default recipe's: 2)")
    r.add_argument("--out", "-o", default=None, help="run folder (default runs/RECIPE-NAME)")
    r.add_argument("--restart", action="store_true",
                   help="discard an earlier deepzip run in --out (only a folder a run made)")
    r.add_argument("--allow-code", action="store_true",
                   help="let the recipe's task: and arch: import and call the Python entry "
                        "points they name (package.module:function); without it such a "
                        "recipe stops before anything runs")
    _add_data_args(r)
    r.set_defaults(func=cmd_run)


def _pareto_command(sub: Any) -> None:
    pa = sub.add_parser("pareto", help="accuracy vs real compression across runs")
    pa.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pa.add_argument("-o", "--output", default="pareto.png")
    pa.set_defaults(func=cmd_pareto)


def _encode_command(sub: Any) -> None:
    en = sub.add_parser("encode", help="write a quantized model as a compressed .dzip file")
    _add_model_args(en, positional=True)
    en.add_argument("-o", "--output", required=True, metavar="FILE.dzip")
    en.add_argument("--raw-dtype", default="float16", choices=RAW_DTYPES,
                    help="storage of BatchNorm, biases and unshared weights: floats, or intN, "
                    "N bits on a uniform grid over each tensor's range")
    en.add_argument("--codebook-dtype", default="float32", choices=BOOK_DTYPES,
                    help="storage of each layer's shared values: floats, or intN, N bits on "
                    "a uniform grid over the layer's values")
    en.add_argument("--fold-batchnorm", action=argparse.BooleanOptionalAction, default=True,
                    help="store each BatchNorm as its eval-mode scale and shift (default on)")
    en.set_defaults(func=cmd_encode)


def _inspect_command(sub: Any) -> None:
    ins = sub.add_parser("inspect", help="per-layer sizes and compression ratios of a .dzip")
    ins.add_argument("file", metavar="FILE.dzip")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)


def _decode_command(sub: Any) -> None:
    de = sub.add_parser("decode", help="turn a .dzip file back into a PyTorch checkpoint")
    de.add_argument("file", metavar="FILE.dzip")
    de.add_argument("-o", "--output", required=True, metavar="FILE.pt|FILE.safetensors",
                    help="a PyTorch checkpoint, or .safetensors (needs deepzip[export])")
    de.add_argument("--sparse", action="store_true",
                    help="safetensors: tensors that are smaller so as indices + values")
    de.add_argument("--arch", default=None, metavar="ARCH",
                    help="check the weights against this architecture (" + ARCH_HELP + ")")
    de.set_defaults(func=cmd_decode)


def _export_command(sub: Any) -> None:
    ex = sub.add_parser("export", help="a .dzip (or checkpoint) to ONNX, checked and "
                        "compared with PyTorch (needs deepzip[export])")
    _add_model_args(ex, positional=True)
    ex.add_argument("-o", "--output", required=True, metavar="FILE.onnx")
    ex.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    ex.add_argument("--dynamic-axes", type=_axes, default=(0,), metavar="A,B",
                    help="the input's axes that may take any size (default: 0, the batch; "
                         "a language model's sequence too: 0,1)")
    ex.add_argument("--fp32-weights", action="store_true",
                    help="store every weight as fp32 (default: shared weights stay "
                         "compressed in the graph, a codebook and packed indices that "
                         "standard operators rebuild once when the session starts)")
    ex.add_argument("--no-normalize", action="store_true",
                    help="leave the input normalization to the caller (default: inside the "
                         "graph, which then takes images scaled to [0, 1])")
    _add_data_args(ex)
    ex.set_defaults(func=cmd_export)


def _summary_command(sub: Any) -> None:
    sm = sub.add_parser("summary", help="per-layer parameters, nonzeros and sparsity")
    _add_model_args(sm, positional=True)
    sm.add_argument("--structure", nargs="+", metavar="LAYER",
                    help="per-filter/per-channel zero fraction and L1 norm of these layers")
    sm.add_argument("--plot", metavar="PNG", help="plot per-filter L1 norms of --structure")
    sm.add_argument("--json", action="store_true")
    sm.set_defaults(func=cmd_summary)


def _sensitivity_command(sub: Any) -> None:
    se = sub.add_parser("sensitivity", help="prune each layer alone at several levels")
    _add_model_args(se, positional=True)
    se.add_argument("--levels", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    se.add_argument("--max-drop", type=float, default=0.01,
                    help="accuracy budget per layer for the derived targets (0.01 = 1 point)")
    se.add_argument("--out", "-o", required=True)
    _add_data_args(se)
    se.set_defaults(func=cmd_sensitivity)


def _no_nul(args: argparse.Namespace) -> None:
    """A NUL byte cannot be in a file name: one line for any argument that holds one."""
    for key, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and "\0" in v:
                raise DeepzipError(f"{key.replace('_', '-')} {v!r}: contains a NUL byte")


def _command(args: argparse.Namespace) -> str:
    """The command line as run, for a run folder's ``command.txt``."""
    return "deepzip " + shlex.join(args.argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _no_nul(args)
        dist_device = init_distributed_from_env()
        if dist_device is not None and getattr(args, "device", "") is None:
            args.device = str(dist_device)
        return args.func(args)
    except DeepzipError as e:
        print(f"deepzip: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only folder, disk full, a path that is a directory...
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"deepzip: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepzip: interrupted", file=sys.stderr)
        return 130
