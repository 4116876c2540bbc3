"""The C reader: the hostile corpus under sanitizers, and its speed against NumPy's.

    python bench/c_reader.py [--n 10000] [--seed 0] [--out results/bench/c-reader.txt]

1. Builds c/dzip.c with AddressSanitizer and UBSan (leaks included) and reads N mutants
   of the fuzz benchmark's base files (tests/hostile.py: every layout, header fields
   changed with the checksums recomputed, parts cut and grown) in one process: any
   sanitizer report fails the run. Each verdict (decoded or refused) is compared with the
   NumPy reader's (deepzip.dzip.read_arrays) on the same bytes.
2. Builds it with -O2 and times decoding every committed .dzip (median of 9 runs of the
   whole set, in one process each) against read_arrays on the same files.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from hostile import dzip_bases, mutate_dzip  # noqa: E402

SOURCES = [str(ROOT / "c" / "dzip.c"), str(ROOT / "c" / "dzip_print.c")]


def build(out: Path, *flags: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise SystemExit("no C compiler")
    subprocess.run([cc, "-std=c99", "-ffp-contract=off", *flags, *SOURCES, "-lm", "-o",
                    str(out)], check=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from deepzip.dzip import read_arrays
    from deepzip.errors import DeepzipFormatError

    lines = ["$ python bench/c_reader.py " + " ".join(sys.argv[1:])]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        sanitized = build(t / "san", "-O1", "-g", "-fsanitize=address,undefined",
                          "-fno-sanitize-recover=all")
        bases = dzip_bases(t)
        rng = random.Random(args.seed)
        paths = []
        for i in range(args.n):
            variant, _ = mutate_dzip(bases[i % len(bases)][0], rng)
            paths.append(t / f"m{i}.dzip")
            paths[-1].write_bytes(variant)
        t0 = time.perf_counter()
        verdicts: list[str] = []
        for i in range(0, len(paths), 500):  # argument lists of a sane length
            r = subprocess.run([str(sanitized), "--check", *map(str, paths[i:i + 500])],
                               capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-4000:])
                raise SystemExit("a sanitizer stopped the C reader")
            verdicts += r.stdout.splitlines()
        seconds = time.perf_counter() - t0
        differ = 0
        for path, line in zip(paths, verdicts, strict=True):
            try:
                read_arrays(path)
                numpy_ok = True
            except DeepzipFormatError:
                numpy_ok = False
            differ += numpy_ok != line.startswith("ok")
        ok = sum(v.startswith("ok") for v in verdicts)
        lines.append(f"hostile corpus under AddressSanitizer + UBSan (leaks checked): "
                     f"{len(paths):,} mutants, {ok:,} decoded, {len(paths) - ok:,} refused, "
                     f"0 sanitizer reports, {differ} verdicts unlike the NumPy reader's; "
                     f"{seconds:.0f} s")
        fast = build(t / "fast", "-O2")
        files = sorted(ROOT.glob("results/**/*.dzip"))
        c_times, np_times = [], []
        for _ in range(9):
            t0 = time.perf_counter()
            subprocess.run([str(fast), "--check", *map(str, files)], check=True,
                           capture_output=True)
            c_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for f in files:
                read_arrays(f)
            np_times.append(time.perf_counter() - t0)
        c, n = statistics.median(c_times), statistics.median(np_times)
        total = sum(f.stat().st_size for f in files)
        lines.append(f"decoding the {len(files)} committed files ({total:,} bytes): C reader "
                     f"{1000 * c:.0f} ms (its whole process, start included), NumPy reader "
                     f"{1000 * n:.0f} ms (in a running Python): {n / c:.2f}x")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
