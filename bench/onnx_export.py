"""What ships: the packed ONNX export against the fp32 export, in one run.

    python bench/onnx_export.py results/agp90/model.dzip results/lenet5/model.dzip \
        --data-dir ../shared/data [--out results/export/packed-onnx.md]

For each .dzip: `deepzip export` with packed weights (the default) and with
`--fp32-weights`, each checked by the command itself against PyTorch and `deepzip eval` on
the whole test set; then, side by side: bytes on disk (and the .dzip's), onnxruntime
session creation (median of 31, each from the file's bytes already in memory), latency
at batch 1 (median of 301 runs) and batch 64 (median of 31), the two files' runs
interleaved, and whether they give the same outputs on the whole test set. The ratios
are what carries across machines.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _medians(fns: dict[str, object], repeat: int) -> dict[str, float]:
    """Median seconds of each function, their runs interleaved (a drift of the machine's
    speed then touches both alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(dzip: Path, data_dir: str, tmp: Path) -> tuple[dict, list[str]]:
    import onnxruntime as ort

    from deepzip.cli import main
    from deepzip.loading import load_model
    from deepzip.task import resolve_task

    said = []
    files = {}
    for kind, flags in (("packed", []), ("fp32", ["--fp32-weights"])):
        files[kind] = tmp / f"{dzip.parent.name}-{kind}.onnx"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["export", str(dzip), "-o", str(files[kind]), "--data-dir", data_dir,
                       *flags])
        if rc:
            raise SystemExit(f"export failed for {dzip}")
        said.append(f"$ deepzip export {dzip} -o {kind}.onnx {' '.join(flags)}".rstrip())
        said += out.getvalue().strip().splitlines()
    _, spec = load_model(str(dzip))
    task = resolve_task(spec.task or "cifar10", data_dir)
    c = len(spec.mean)
    images = np.concatenate([x.numpy() for x, _ in task.eval_loader(
        mean=(0.0,) * c, std=(1.0,) * c)]).astype(np.float32)
    row = {"model": dzip.parent.name, "dzip": dzip.stat().st_size}
    data = {kind: path.read_bytes() for kind, path in files.items()}
    sessions = {kind: ort.InferenceSession(b, providers=["CPUExecutionProvider"])
                for kind, b in data.items()}
    name = sessions["fp32"].get_inputs()[0].name
    timings = {
        "session": (_medians({k: (lambda b=b: ort.InferenceSession(
            b, providers=["CPUExecutionProvider"])) for k, b in data.items()}, 31)),
        "b1": _medians({k: (lambda s=s: s.run(None, {name: images[:1]}))
                        for k, s in sessions.items()}, 301),
        "b64": _medians({k: (lambda s=s: s.run(None, {name: images[:64]}))
                         for k, s in sessions.items()}, 31)}
    outputs = {}
    for kind, s in sessions.items():
        row[f"{kind} bytes"] = len(data[kind])
        for what, medians in timings.items():
            row[f"{kind} {what} ms"] = 1000 * medians[kind]
        outputs[kind] = np.concatenate([s.run(None, {name: images[i:i + 500]})[0]
                                        for i in range(0, len(images), 500)])
    row["same outputs"] = bool(np.array_equal(outputs["packed"], outputs["fp32"]))
    row["same predictions"] = int((outputs["packed"].argmax(1)
                                   == outputs["fp32"].argmax(1)).sum())
    row["examples"] = len(images)
    return row, said


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path, metavar="FILE.dzip")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args()
    rows, said = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for f in args.files:
            row, lines = measure(f, args.data_dir, Path(tmp))
            rows.append(row)
            said += lines
    lines = ["| model | .dzip | fp32 ONNX | packed ONNX | smaller | session (packed / fp32) "
             "| batch 1 | batch 64 | outputs on the test set |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dzip']:,} B | {r['fp32 bytes']:,} B | "
            f"{r['packed bytes']:,} B | {r['fp32 bytes'] / r['packed bytes']:.1f}x | "
            f"{r['packed session ms']:.1f} / {r['fp32 session ms']:.1f} ms = "
            f"{r['packed session ms'] / r['fp32 session ms']:.2f}x | "
            f"{r['packed b1 ms']:.3f} / {r['fp32 b1 ms']:.3f} ms = "
            f"{r['packed b1 ms'] / r['fp32 b1 ms']:.2f}x | "
            f"{r['packed b64 ms']:.2f} / {r['fp32 b64 ms']:.2f} ms = "
            f"{r['packed b64 ms'] / r['fp32 b64 ms']:.2f}x | "
            + ("identical" if r["same outputs"] else
               f"predictions equal on {r['same predictions']:,}/{r['examples']:,}")
            + f" ({r['examples']:,} images) |")
    text = "\n".join(["$ python bench/onnx_export.py " + " ".join(sys.argv[1:]), "",
                      *lines, "", "What each export command printed:", "", "```",
                      *said, "```", ""])
    print(text)
    if args.out:
        from deepzip.atomic import atomic_write

        with atomic_write(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
