"""The hostile-input budget: 10,000+ structure-aware inputs per reader.

    python bench/fuzz.py [--n 10000] [--seed 0] [--only dzip|cifar|mnist|recipes|specs|outputs]

Runs the generators of tests/hostile.py (the tests run the same ones on a few hundred
inputs) against the .dzip reader (load_state, load and inspect on each variant), the
CIFAR-10 batch reader, the MNIST IDX reader, the recipe loader (with the --allow-code check
and the run folder's name) and the recorded specs of checkpoints and .dzip files (the model
and the task every command would open: nothing may be imported), then every command that
writes a file against every kind of output path (a device, the null device, a FIFO, a
directory, symlinks to each, a NUL byte, a path under a file, an extension no plot format
has: refused in one line and left as it was, or written as a regular file with a link's
target untouched), and prints per reader:
inputs, accepted, refused with the reader's own error, unexpected exceptions, and
allocations over the bound (peak traced memory against a bound proportional to what the
input legitimately declares). Exit status 1 if any unexpected exception or allocation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hostile import (  # noqa: E402
    dzip_bases,
    fuzz_cifar,
    fuzz_dzip,
    fuzz_mnist,
    fuzz_outputs,
    fuzz_recipes,
    fuzz_specs,
    output_commands,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000, help="inputs per reader")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="outputs: also the commands that read MNIST (train, prune, "
                        "quantize, sensitivity --out; export -o)")
    p.add_argument("--only", choices=["dzip", "cifar", "mnist", "recipes", "specs", "outputs"],
                   help="fuzz one reader (e.g. after a format change)")
    args = p.parse_args()
    recipes = [yaml.safe_load(f.read_text())
               for f in sorted((ROOT / "src" / "deepzip" / "recipes").glob("*.yaml"))]
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for key, what, run in [
            ("dzip", ".dzip (load_state, load, inspect per input)",
             lambda: fuzz_dzip(dzip_bases(t), args.n, args.seed, t)),
            ("cifar", "CIFAR-10 batches", lambda: fuzz_cifar(args.n, args.seed, t)),
            ("mnist", "MNIST IDX files", lambda: fuzz_mnist(args.n, args.seed, t)),
            ("recipes", "recipes (load, training keys, --allow-code, run folder)",
             lambda: fuzz_recipes(recipes, args.n, args.seed, t)),
            ("specs", "recorded arch/task in checkpoints and .dzip (nothing imported)",
             lambda: fuzz_specs(args.n, args.seed, t)),
            ("outputs", "output paths (every writing command x every kind of path)",
             lambda: fuzz_outputs(output_commands(_made(t / "inputs"), args.data_dir), t)),
        ]:
            if args.only not in (None, key):
                continue
            t0 = time.perf_counter()
            out = run()
            print(out.line(what) + f"; {time.perf_counter() - t0:.0f} s", flush=True)
            for line in (out.unexpected + out.over_bound)[:20]:
                print("   ", line)
            bad += len(out.unexpected) + len(out.over_bound)
    return 1 if bad else 0


def _made(folder: Path) -> Path:
    folder.mkdir()
    return folder


if __name__ == "__main__":
    sys.exit(main())
