"""Helpers shared by the assignment's lab scripts in this folder."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from deepzip.atomic import atomic_write
from deepzip.data import BatchLoader, load_cifar10
from deepzip.loading import pretrained

ROOT = Path(__file__).resolve().parents[2]  # the repository


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py/")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"),
                   help="results folder")
    return p


def baseline_and_test(data_dir: str | None):
    model, spec = pretrained("resnet20")
    test = BatchLoader(load_cifar10(data_dir, train=False), 500, mean=spec.mean, std=spec.std)
    return model, spec, test


def command_line() -> str:
    rel = Path(sys.argv[0]).resolve().relative_to(ROOT)
    return shlex.join(["python", str(rel), *sys.argv[1:]])


def write_json(path: Path, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def cached(path: Path, compute):
    """Run ``compute()`` once: its JSON result is kept at ``path`` and reused on reruns,
    so a long table script interrupted halfway resumes where it stopped."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return result
