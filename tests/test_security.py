"""A file is data: nothing read from a model file, checkpoint, run folder or recipe makes
deepzip import or call code, write outside its run folder, hang, or delete what it did
not make. Hostile files are built here and every command that reads a model runs on them.
"""

import os
import sys
import textwrap
import time

import pytest
import torch
from hostile import deadline

from deepzip import dzip_torch
from deepzip.atomic import LOCK_NAME, folder_lock, open_regular, read_gzip_limited
from deepzip.checkpoint import ModelSpec, save_checkpoint
from deepzip.cli import main
from deepzip.errors import DeepzipError
from deepzip.models import get
from deepzip.recipe import Recipe, load_recipe

EVIL = "deepzip_evil_probe"


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A module on the import path that leaves a marker file when imported: if deepzip
    ever imports what a file names, the marker appears."""
    marker = tmp_path / "IMPORTED"
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{EVIL}.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("imported")
        def make_task(**kw):
            pathlib.Path({str(marker)!r}).write_text("called")
        def Net(**kw):
            pathlib.Path({str(marker)!r}).write_text("called")
    """))
    monkeypatch.syspath_prepend(str(code))
    sys.modules.pop(EVIL, None)
    yield marker
    sys.modules.pop(EVIL, None)


def _hostile_files(folder):
    """A checkpoint and a .dzip each recording the evil task (with a real architecture,
    so loading gets as far as choosing a task) and the evil architecture."""
    torch.manual_seed(0)
    model = get("lenet300")
    files = []
    for arch in ("lenet300", f"{EVIL}:Net"):
        spec = ModelSpec(arch=arch, mean=(0.1307,), std=(0.3081,), task=f"{EVIL}:make_task")
        tag = "task" if arch == "lenet300" else "arch"
        ckpt = folder / f"evil-{tag}.pt"
        save_checkpoint(model, spec, ckpt)
        packed = folder / f"evil-{tag}.dzip"
        dzip_torch.save(model, packed, spec=spec)
        files += [ckpt, packed]
    return files


def _run(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    return rc, err


@pytest.mark.parametrize("command", [
    ["eval"], ["prune", "--method", "global", "--sparsity", "0.5", "-o", "{out}"],
    ["quantize", "--bits", "4", "-o", "{out}"], ["sensitivity", "--levels", "0.5", "-o", "{out}"],
    ["export", "-o", "{out}/m.onnx"], ["summary"], ["encode", "-o", "{out}/m.dzip"],
])
def test_a_recorded_task_or_arch_imports_nothing_under_any_command(
        capsys, tmp_path, data_root, evil, command):
    for f in _hostile_files(tmp_path):
        argv = [command[0], f, *(a.format(out=tmp_path / "out") for a in command[1:])]
        if command[0] not in ("summary", "encode"):
            argv += ["--data-dir", data_root]
        rc, err = _run(capsys, *argv)
        assert not evil.exists(), (argv, err)
        assert EVIL not in sys.modules
        if command[0] == "export" and "is not installed" in err:
            assert rc == 2  # without the export extra it stops before opening the model
        elif "arch" in f.name:
            assert rc == 2 and "not registered" in err, err
        elif command[0] in ("summary", "encode"):  # no task needed: they just work
            assert rc == 0, err
        else:
            assert rc == 2 and err.count("\n") == 1 and "--task" in err, err
            assert "deepzip never runs code a file names" in err


def test_inspect_decode_and_the_python_loaders_import_nothing(capsys, tmp_path, evil):
    from deepzip.loading import load_model

    for f in _hostile_files(tmp_path):
        if f.suffix == ".dzip":
            assert _run(capsys, "inspect", f)[0] == 0
            assert _run(capsys, "decode", f, "-o", tmp_path / "back.pt")[0] == 0
            state, spec = dzip_torch.load_state(f)
            assert spec.task == f"{EVIL}:make_task"  # kept as a label, never resolved
        if "task" in f.name:
            model, spec = load_model(str(f))
            assert type(model).__name__ == "LeNet300"
        else:
            with pytest.raises(DeepzipError, match="not registered"):
                load_model(str(f))
    assert not evil.exists() and EVIL not in sys.modules


def test_the_user_names_the_task_and_only_then_it_runs(capsys, tmp_path, data_root, evil):
    """--task on the command line is the user's choice: then (and only then) it is called."""
    f = _hostile_files(tmp_path)[0]
    rc, err = _run(capsys, "eval", f, "--task", f"{EVIL}:make_task", "--data-dir", data_root)
    assert rc == 2 and "returned NoneType" in err  # called, as the user asked
    assert evil.read_text() == "called"


def _recipe(tmp_path, **fields):
    import yaml

    body = {"name": "r", "model": "lenet300", "task": "mnist", "prune": {"schedule": "none"},
            "quantize": None, **fields}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize("key,value", [("task", f"{EVIL}:make_task"), ("arch", f"{EVIL}:Net")])
def test_a_recipe_runs_code_only_with_allow_code(capsys, tmp_path, data_root, evil, key, value):
    path = _recipe(tmp_path, **{key: value})
    out = tmp_path / "run"
    rc, err = _run(capsys, "run", path, "-o", out, "--data-dir", data_root)
    assert rc == 2 and err.count("\n") == 1 and "--allow-code" in err and value in err, err
    assert not evil.exists() and not out.exists()  # stopped before anything else
    from deepzip.api import compress

    with pytest.raises(DeepzipError, match="allow_code"):
        compress(get("lenet300"), "mnist", str(path), out=out)
    assert not evil.exists()
    rc, err = _run(capsys, "run", path, "-o", out, "--data-dir", data_root, "--allow-code")
    assert evil.exists(), err  # consent given: the entry point was imported


def test_shipped_recipes_name_no_code():
    from importlib import resources

    folder = resources.files("deepzip") / "recipes"
    names = [p.name for p in folder.iterdir() if p.name.endswith(".yaml")]
    assert len(names) >= 5
    for name in names:
        assert load_recipe(str(folder / name)).entry_points() == {}, name


@pytest.mark.parametrize("name", ["../../victim", "..", ".", "", "a/b", "x\0y", "a" * 101,
                                  "/abs"])
def test_a_recipe_name_is_a_plain_folder_name(tmp_path, name):
    with pytest.raises(DeepzipError) as e:
        Recipe(name=name).validate()
    assert "\0" not in str(e.value)


def test_recipe_names_never_escape_or_delete(capsys, tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    sibling = tmp_path / "runs" / "other"
    sibling.mkdir(parents=True)
    (sibling / "state.json").write_text("{}")
    for name in ("../victim", "", ".."):
        path = _recipe(tmp_path, name=name)
        rc, err = _run(capsys, "run", path, "--restart", "--data-dir", data_root)
        assert rc == 2 and "plain folder name" in err, err
    assert (victim / "precious.txt").read_text() == "keep"
    assert (sibling / "state.json").exists()
    # --out given by the user is the user's choice, but --restart still only deletes a run
    rc, err = _run(capsys, "run", _recipe(tmp_path), "-o", victim, "--restart",
                   "--data-dir", data_root)
    assert rc == 2 and "no deepzip run state" in err, err
    assert (victim / "precious.txt").read_text() == "keep"


def test_a_nul_byte_is_one_line(capsys, tmp_path, data_root):
    path = tmp_path / "nul.yaml"
    path.write_text('name: "a\\0b"\n')
    rc, err = _run(capsys, "run", path, "--data-dir", data_root)
    assert rc == 2 and "NUL" in err and err.count("\n") == 1, err
    path.write_text('model: "m\\0.pt"\n')
    rc, err = _run(capsys, "run", path, "--data-dir", data_root)
    assert rc == 2 and "NUL" in err and err.count("\n") == 1, err
    with pytest.raises(DeepzipError, match="NUL"):
        open_regular("a\0b")


def test_fifos_and_directories_are_refused_at_once(capsys, tmp_path, data_root):
    fifo = tmp_path / "x.dzip"
    os.mkfifo(fifo)
    os.mkfifo(tmp_path / "r.yaml")
    (tmp_path / "d.pt").mkdir()
    with deadline(5):
        t0 = time.time()
        for argv in (["eval", fifo, "--data-dir", data_root], ["inspect", fifo],
                     ["decode", fifo, "-o", tmp_path / "o.pt"], ["summary", fifo],
                     ["eval", tmp_path / "d.pt", "--data-dir", data_root],
                     ["run", tmp_path / "r.yaml", "--data-dir", data_root],
                     ["pareto", tmp_path]):
            rc, err = _run(capsys, *argv)
            assert rc == 2 and err.count("\n") == 1, (argv, err)
            assert "regular file" in err or "no report.json" in err, (argv, err)
        assert time.time() - t0 < 5


def test_a_fifo_in_the_mnist_folder_is_refused_at_once(tmp_path):
    from deepzip.data import load_mnist

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        os.mkfifo(raw / name)
    with deadline(5), pytest.raises(DeepzipError, match="regular file"):
        load_mnist(tmp_path, train=False)
    with deadline(5), pytest.raises(DeepzipError, match="regular file"):
        read_gzip_limited(raw / "t10k-labels-idx1-ubyte.gz", 100, "MNIST file")


def test_a_second_run_on_a_folder_stops_at_once_and_a_stale_lock_does_not_block(
        capsys, tmp_path, data_root):
    out = tmp_path / "run"
    path = _recipe(tmp_path)
    with folder_lock(out):  # another run holds the folder
        rc, err = _run(capsys, "run", path, "-o", out, "--data-dir", data_root)
        assert rc == 2 and f"pid {os.getpid()}" in err and err.count("\n") == 1, err
        assert not (out / "state.json").exists()
    (out / LOCK_NAME).write_text("999999\n")  # a killed run's lock file: no lock held
    with folder_lock(out):
        pass
    assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_flags_out_of_range_are_one_line(capsys, tmp_path, data_root):
    path = tmp_path / "std.yaml"
    path.write_text("prune:\n  schedule: iterative\n  steps: [{method: std, amount: -1}]\n")
    rc, err = _run(capsys, "run", path, "--data-dir", data_root)
    assert rc == 2 and "std" in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):  # eval takes no --batch-size: argparse says so
        main(["eval", "lenet5", "--batch-size", "0"])
