"""The C reader (c/dzip.c): compiled with the system's compiler, it decodes every
committed .dzip and the old-format fixtures to the same float32 values as the NumPy
reader, bit for bit, and reads the hostile corpus under AddressSanitizer and UBSan
(leaks included) without a crash, refusing what the NumPy reader refuses."""

import random
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from deepzip.dzip import read_arrays
from deepzip.errors import DeepzipFormatError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "c" / "dzip.c", ROOT / "c" / "dzip_print.c"]
FLAGS = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-ffp-contract=off"]
COMMITTED = sorted(ROOT.glob("results/**/*.dzip")) + sorted((ROOT / "tests" / "fixtures")
                                                            .glob("*.dzip"))


def _compiler() -> str:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler on this machine (cc, gcc or clang): the C reader's tests "
                    "need one")
    return cc


def _build(tmp: Path, *extra: str) -> Path | None:
    out = tmp / ("dzip_print" + "".join(e.replace("-", "_").replace("=", "_")
                                        for e in extra))
    r = subprocess.run([_compiler(), *FLAGS, *extra, *map(str, SOURCES), "-lm", "-o",
                        str(out)], capture_output=True, text=True)
    if r.returncode:
        if extra:  # a sanitizer the toolchain lacks: say so, do not fail
            return None
        raise AssertionError(r.stderr)
    return out


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("c"), "-O2")


def _dump(binary: Path, path: Path, out: Path) -> dict[str, np.ndarray]:
    r = subprocess.run([str(binary), "--dump", str(out), str(path)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    data, at, tensors = out.read_bytes(), 4, {}
    for _ in range(struct.unpack_from("<I", data)[0]):
        (n,) = struct.unpack_from("<I", data, at)
        name = data[at + 4:at + 4 + n].decode()
        at += 4 + n
        (ndim,) = struct.unpack_from("<I", data, at)
        shape = struct.unpack_from(f"<{ndim}q", data, at + 4)
        at += 4 + 8 * ndim
        count = int(np.prod(shape, dtype=np.int64))
        tensors[name] = np.frombuffer(data, "<f4", count, at).reshape(shape)
        at += 4 * count
    assert at == len(data)
    return tensors


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_file_decodes_bit_for_bit_as_numpy_does(reader, tmp_path, path):
    got = _dump(reader, path, tmp_path / "dump")
    want, _ = read_arrays(path)
    assert list(got) == list(want)  # the same keys, in the file's order
    for key, value in want.items():
        expect = np.asarray(value).astype(np.float32)
        assert got[key].shape == expect.shape, key
        assert np.array_equal(got[key].view(np.uint32), expect.view(np.uint32)), key


def test_the_example_program_prints_a_files_tensors(reader):
    r = subprocess.run([str(reader), str(ROOT / "results" / "lenet300" / "model.dzip")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "format version" in r.stdout
    assert "fc1.weight" in r.stdout and "[300, 784]" in r.stdout


def _python_accepts(path: Path) -> bool:
    try:
        read_arrays(path)
    except DeepzipFormatError:
        return False
    return True


def test_the_hostile_corpus_under_sanitizers(tmp_path):
    """The fuzz benchmark's mutants of every layout (header fields changed with the
    checksums recomputed, parts cut and grown): no crash, no leak, no read out of
    bounds; each accepted or refused as the NumPy reader does."""
    from hostile import dzip_bases, mutate_dzip

    binary = _build(tmp_path, "-O1", "-g", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all")
    if binary is None:
        pytest.skip("the compiler here builds no AddressSanitizer/UBSan binary")
    bases = dzip_bases(tmp_path)
    rng = random.Random(7)
    paths = []
    for i in range(400):
        data = bases[i % len(bases)][0]
        variant, _ = mutate_dzip(data, rng) if i >= len(bases) else (data, "base")
        paths.append(tmp_path / f"m{i}.dzip")
        paths[-1].write_bytes(variant)
    r = subprocess.run([str(binary), "--check", *map(str, paths)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]  # a sanitizer report ends the run
    lines = r.stdout.splitlines()
    assert len(lines) == len(paths)
    verdicts = [line.startswith("ok") for line in lines]
    assert sum(verdicts) >= len(bases) and not all(verdicts)  # both sides reached
    differ = [(p.name, line) for p, line, ok in zip(paths, lines, verdicts, strict=True)
              if ok != _python_accepts(p)]
    assert not differ, differ[:5]
