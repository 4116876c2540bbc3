"""Copy a finished training run in as a shipped baseline, with its command and log.

    python experiments/ship_baseline.py runs/resnet20-baseline --data-dir ../shared/data
    python experiments/ship_baseline.py runs/lenet300-baseline --data-dir ../shared/data
    python experiments/ship_baseline.py runs/resnet20-val-s1 --data-dir ../shared/data \
        --not-shipped baseline-val-s1

``--not-shipped NAME`` publishes a baseline that does not ship: its checkpoint goes to
results/NAME/model.pt beside the README, log and command.

Writes src/deepzip/weights/ARCH_TASK.{pt,json} (the names deepzip.pretrained knows) and
results/baseline/ for ResNet-20, results/baseline-ARCH/ for the others (README.md,
metrics.jsonl, command.txt), evaluating the shipped file on the task's full test set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from deepzip.atomic import atomic_write
from deepzip.checkpoint import load_checkpoint
from deepzip.loading import PRETRAINED
from deepzip.task import image_task
from deepzip.train import evaluate

AUGMENTATION = {"cifar10": "random crop (4-pixel padding) and horizontal flip",
                "mnist": "random crop (2-pixel padding), no flip"}


ROOT = Path(__file__).resolve().parents[1]


def write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def command_line() -> str:
    return shlex.join(["python", "experiments/ship_baseline.py", *sys.argv[1:]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder holding the data sets")
    p.add_argument("--out", default=str(ROOT / "results"), help="results folder")
    p.add_argument("--not-shipped", metavar="NAME", default=None,
                   help="publish to results/NAME (checkpoint included) instead of shipping")
    p.add_argument("run", help="folder written by deepzip train")
    args = p.parse_args()
    run = Path(args.run)
    if not (run / "model.pt").is_file():
        sys.exit(f"{run}/model.pt not found: has the run finished?")
    _, spec = load_checkpoint(run / "model.pt")
    task = image_task(spec.task or "cifar10", args.data_dir)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    command = (run / "command.txt").read_text().strip()
    config = json.loads((run / "train_config.json").read_text())
    if args.not_shipped:
        out = Path(args.out) / args.not_shipped
        out.mkdir(parents=True, exist_ok=True)
        shipped = out / "model.pt"
        shutil.copyfile(run / "model.pt", shipped)
    else:
        name = PRETRAINED[spec.arch]  # e.g. resnet20_cifar10.pt
        weights = ROOT / "src" / "deepzip" / "weights"
        weights.mkdir(exist_ok=True)
        shipped = weights / name
        shutil.copyfile(run / "model.pt", shipped)
        out = Path(args.out) / ("baseline" if spec.arch == "resnet20" else
                                f"baseline-{spec.arch}")
    model, spec = load_checkpoint(shipped)
    loss, acc = evaluate(model, task.eval_loader(mean=spec.mean, std=spec.std))
    if not args.not_shipped:
        write_json(shipped.with_suffix(".json"), {
            "arch": spec.arch, "task": task.name, "test_acc": acc, "test_loss": loss,
            "epochs": len(history), "command": command, "train_config": config,
            "shipped_by": command_line()})
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "metrics.jsonl", out / "metrics.jsonl")
    (out / "command.txt").write_text(command + "\n")
    on = "val" if "val_acc" in history[-1] else "test"  # trained with images held out?
    best = max(h[f"{on}_acc"] for h in history if f"{on}_acc" in h)
    total_min = sum(h["train_time_s"] for h in history) / 60
    autocast = ("fp32" if config["precision"] == "fp32" else
                "bf16 autocast with channels_last")
    where = os.path.relpath(shipped, ROOT)
    n = re.search(r"--validation (\d+)", command)
    held_out = (f"\nThe {int(n[1]):,} training images that `--validation {n[1]}` holds out "
                "were never trained on, so a run on this model can decide on them and "
                f"report on the whole test set (`deepzip run --model {where} "
                f"--validation {n[1]} --validation-from train`).\n" if n else "")
    title, load = ((f"A {spec.arch} baseline trained here, not shipped", f"`{where}`")
                   if args.not_shipped else
                   (f"The shipped {spec.arch} baseline",
                    f"`deepzip.pretrained(\"{spec.arch}\")`, file `{where}`"))
    write_text(out / "README.md", f"""# {title}

{load} ({shipped.stat().st_size:,} bytes).

**Test accuracy: {acc * 100:.2f}%** (error {100 - acc * 100:.2f}%) on {task.description},
fp32, measured by `{command_line()}`; check it with
`deepzip eval {where if args.not_shipped else spec.arch} --data-dir ../shared/data`.

Trained from scratch on this project's 2-core CPU by

    {command}
{held_out}
{len(history)} epochs, SGD with Nesterov momentum {config['momentum']}, lr {config['lr']},
{config['schedule']} schedule, weight decay {config['weight_decay']}, batch
{config['batch_size']}, {AUGMENTATION[task.name]}, {autocast} for training;
{total_min:.0f} minutes of training time in all (the machine was shared with other work
at times). Final-epoch {"validation" if on == "val" else "test"} accuracy during training:
{history[-1][f'{on}_acc'] * 100:.2f}% (best epoch {best * 100:.2f}%; the model is the
final epoch, not a pick of the best). Per-epoch log: `metrics.jsonl`.
""")
    print(f"{'published' if args.not_shipped else 'shipped'} {shipped}: test accuracy "
          f"{acc * 100:.2f}%")


if __name__ == "__main__":
    main()
