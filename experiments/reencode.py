"""Re-encode published runs' ``model.dzip`` in the current format version, losslessly.

    python experiments/reencode.py results/lenet300 [RUN ...] --data-dir ../shared/data

For each RUN folder (a published pipeline run: ``model.dzip``, ``recipe.yaml``,
``report.json``, ``command.txt``): decode the file, write it again with the recipe's
encode settings in the current format version, check that the new file decodes to
exactly the same tensors, verify the decoded model against the old file's on the task's
whole evaluation set, and rewrite ``report.json``, ``report.md`` and ``layers.png`` with
the new encode and verify stages (the other stages are the run's own). ``report.md``
ends with a section that says so. A file already in the current version is left alone.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import types
from pathlib import Path

import torch
import yaml

from deepzip import dzip, dzip_torch, stages
from deepzip.atomic import atomic_path
from deepzip.render import write_run_report
from deepzip.report import current_stages, run_summary
from deepzip.stages import verify
from deepzip.task import resolve_task


def version_of(path: Path) -> int:
    return struct.unpack_from("<H", path.read_bytes()[:10], 8)[0]


def reencode(run: Path, data_dir: str | None) -> str:
    path = run / "model.dzip"
    old_version = version_of(path)
    if old_version == dzip.VERSION:
        return f"{run}: already format version {dzip.VERSION}"
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    enc = recipe.get("encode") or {}
    settings = {"raw_dtype": enc.get("raw_dtype", "float16"),
                "codebook_dtype": enc.get("codebook_dtype", "float32"),
                "fold_batchnorm": enc.get("fold_batchnorm", True)}
    old_state, spec = dzip_torch.load_state(path)
    model = dzip_torch.load(path, spec.build())
    old_bytes = path.stat().st_size
    with atomic_path(path) as tmp:
        t0 = time.time()
        dzip_torch.save(model, tmp, spec=spec, **settings)
        encode_seconds = time.time() - t0
        new_state, _ = dzip_torch.load_state(tmp)
        same = set(new_state) == set(old_state) and all(
            torch.equal(new_state[k], old_state[k]) for k in old_state)
        if not same:
            raise SystemExit(f"{run}: the re-encoded file decodes to other weights; "
                             "left unchanged")
        info = dzip_torch.info(tmp, spec.build())
        task = resolve_task(spec.task or recipe.get("task") or "cifar10", data_dir)
        t0 = time.time()
        decoded = dzip_torch.load(tmp, spec.build())
        checked = verify(model, decoded, stages.eval_loader(task, spec), task=task)
        verify_seconds = time.time() - t0
        st = current_stages(json.loads((run / "report.json").read_text())["stages"])
        st["encode"] = {"seconds": encode_seconds, **info.to_dict()}
        st["verify"] = {"seconds": verify_seconds, **checked}
        run_summary(recipe["name"], {"stages": st}, task)  # the report can be made: replace
    write_run_report(run, types.SimpleNamespace(name=recipe["name"],
                                                description=recipe.get("description", "")),
                     {"stages": st}, task, (run / "command.txt").read_text().strip())
    note = (f"\n## Re-encoded\n\nThe run wrote this model in format version {old_version} "
            f"({old_bytes:,} bytes). `python experiments/reencode.py {run.as_posix()} "
            f"--data-dir DATA` wrote the same weights again in format version "
            f"{dzip.VERSION} ({info.file_bytes:,} bytes; decoded tensors checked equal) and "
            "re-ran the encode and verify stages above; the other stages are the run's.\n")
    with open(run / "report.md", "a") as f:
        f.write(note)
    return (f"{run}: format v{old_version} {old_bytes:,} B -> v{dzip.VERSION} "
            f"{info.file_bytes:,} B, decoded {task.metric.name} {checked['score']:.4f}, "
            f"identical outputs: {checked['identical']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    for run in args.runs:
        print(reencode(run, args.data_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
