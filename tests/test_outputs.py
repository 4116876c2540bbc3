"""Outputs are as safe as inputs: deepzip writes regular files only, never replaces a
device, a FIFO or a folder, writes nothing through a symlink, deletes only what a deepzip
run wrote, and every bad output path is one line, not a traceback or a hang."""

import json
import os
import stat

import pytest
import torch
from hostile import deadline
from torch import nn

from deepzip import dzip_torch
from deepzip.atomic import LOCK_NAME, atomic_write, folder_lock, output_kind
from deepzip.checkpoint import ModelSpec, save_checkpoint
from deepzip.cli import main
from deepzip.errors import DeepzipError
from deepzip.models import get
from deepzip.runfolder import run_folder

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def one_line(capsys, *argv, code=2):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == code, (rc, out, err)
    if code:
        assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint, a .dzip of it and a run folder with a report: each command's input."""
    d = tmp_path_factory.mktemp("in")
    torch.manual_seed(0)
    model = get("lenet300")
    save_checkpoint(model, ModelSpec(arch="lenet300", task="mnist"), d / "m.pt")
    dzip_torch.save(model, d / "m.dzip", spec=ModelSpec(arch="lenet300", task="mnist"))
    run = d / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"summary": {
        "real_ratio": 10.0, "recipe": "x", "baseline_score": 0.9, "decoded_score": 0.89,
        "file_bytes": 100, "sparsity": 0.5, "formula_ratio": 12.0}}))
    return d


def commands(d, out):
    """Every command that writes a file the user names, writing ``out``."""
    return {
        "encode": ["encode", d / "m.pt", "-o", out],
        "decode": ["decode", d / "m.dzip", "-o", out],
        "summary --plot": ["summary", d / "m.pt", "--plot", out],
        "pareto": ["pareto", d / "run", "-o", out],
    }


def _special(kind, path):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        os.mkdir(path)
    elif kind == "zero":
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(*_rdev("/dev/zero")))
    elif kind == "null":
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(*_rdev("/dev/null")))
    return os.lstat(path).st_mode


def _rdev(name):
    rdev = os.stat(name).st_rdev
    return os.major(rdev), os.minor(rdev)


@pytest.mark.parametrize("command", ["encode", "decode", "summary --plot", "pareto"])
@pytest.mark.parametrize("kind", ["fifo", "dir", "zero"])
def test_an_output_that_is_not_a_file_is_refused_and_left_as_it_was(
        capsys, tmp_path, files, command, kind):
    if kind == "zero" and not ROOT:
        pytest.skip("making a device node needs root")
    out = tmp_path / "out.png"
    mode = _special(kind, out)
    with deadline(30):
        err = one_line(capsys, *commands(files, out)[command])
    assert "deepzip writes its outputs only as regular files" in err
    assert os.lstat(out).st_mode == mode  # still the FIFO, folder or device
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("command", ["encode", "decode", "summary --plot", "pareto"])
def test_the_null_device_takes_the_output_and_stays_a_device(capsys, tmp_path, files,
                                                             command):
    """`-o /dev/null` is how people try a command: it works, and the device stays."""
    if ROOT:
        out = tmp_path / "devnull.png"  # mknod devnull c 1 3, as the issue did
        _special("null", out)
    else:
        out = tmp_path / "null.png"
        out.symlink_to(os.devnull)
    mode = os.lstat(out).st_mode
    one_line(capsys, *commands(files, out)[command], code=0)
    assert os.lstat(out).st_mode == mode
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_symlink_output_is_replaced_and_its_target_never_written(capsys, tmp_path, files):
    target = tmp_path / "elsewhere.dzip"
    target.write_bytes(b"someone's file")
    link = tmp_path / "out.dzip"
    link.symlink_to(target)
    one_line(capsys, "encode", files / "m.pt", "-o", link, code=0)
    assert not link.is_symlink() and link.stat().st_size > 1000
    assert target.read_bytes() == b"someone's file"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "to-fifo.dzip").symlink_to(fifo)  # a link to what is not a file: refused
    with deadline(30):
        one_line(capsys, "encode", files / "m.pt", "-o", tmp_path / "to-fifo.dzip")
    assert (tmp_path / "to-fifo.dzip").is_symlink()


def test_the_python_writer_refuses_what_is_not_a_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    model = nn.Linear(4, 2)
    with deadline(30), pytest.raises(DeepzipError, match="is a FIFO"):
        dzip_torch.save(model, tmp_path / "fifo")
    with pytest.raises(DeepzipError, match="NUL"):
        dzip_torch.save(model, str(tmp_path / "a\0b.dzip"))
    assert output_kind(tmp_path / "new.dzip") == "file"
    assert output_kind(os.devnull) == "null"


def test_an_export_to_a_fifo_is_refused(capsys, tmp_path, files):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    os.mkfifo(tmp_path / "m.onnx")
    with deadline(30):
        err = one_line(capsys, "export", files / "m.pt", "-o", tmp_path / "m.onnx")
    assert "FIFO" in err


@pytest.mark.parametrize("flag", ["--out", "-o", "--plot"])
def test_a_nul_byte_in_an_output_path_is_one_line(capsys, tmp_path, files, flag):
    argv = {"--out": ["run", "smoke", "--out", f"{tmp_path}/a\0b"],
            "-o": ["encode", files / "m.pt", "-o", f"{tmp_path}/a\0b.dzip"],
            "--plot": ["summary", files / "m.pt", "--plot", f"{tmp_path}/a\0b.png"]}[flag]
    assert "NUL byte" in one_line(capsys, *argv)


@pytest.mark.parametrize("argv", [["summary", "{d}/m.pt", "--plot", "{t}/x.dzip"],
                                  ["pareto", "{d}/run", "-o", "{t}/x.txt"]])
def test_a_plot_with_an_extension_no_plot_format_has_is_one_line(capsys, tmp_path, files,
                                                                 argv):
    argv = [a.format(d=files, t=tmp_path) for a in argv]
    assert "a plot can be written as" in one_line(capsys, *argv)
    assert not list(tmp_path.iterdir())


def test_train_writes_its_command_file_atomically(capsys, tmp_path, data_root):
    out = tmp_path / "t"
    out.mkdir()
    os.mkfifo(out / "command.txt")
    argv = ["train", "--model", "lenet300", "--task", "mnist", "--epochs", "1", "--subset",
            "64", "--batch-size", "32", "--data-dir", data_root, "--out", out]
    with deadline(30):
        assert "FIFO" in one_line(capsys, *argv)
    os.unlink(out / "command.txt")
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    (out / "command.txt").symlink_to(target)
    one_line(capsys, *argv, code=0)
    assert target.read_text() == "mine"
    assert (out / "command.txt").read_text().startswith("deepzip train")


# --------------------------------------------------------------------- --restart
def _run_state(folder):
    (folder / "state.json").write_text(json.dumps({"recipe": {"name": "x"}, "stages": {}}))


def test_restart_refuses_a_folder_whose_state_is_not_a_runs(tmp_path):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("code")
    (proj / "notes.txt").write_text("notes")
    (proj / "state.json").write_text("{}")
    with pytest.raises(DeepzipError, match="no deepzip run state"), \
            run_folder(proj, restart=True):
        pass
    assert (proj / "src" / "main.py").read_text() == "code"
    assert (proj / "notes.txt").read_text() == "notes"
    (proj / "state.json").write_text("[" * 50_000 + "]" * 50_000)  # nested past recursion
    with pytest.raises(DeepzipError, match="no deepzip run state"), \
            run_folder(proj, restart=True):
        pass


def test_restart_deletes_only_what_a_run_wrote_and_says_what_it_kept(tmp_path):
    out = tmp_path / "run"
    (out / "prune").mkdir(parents=True)
    (out / "prune" / "model.pt").write_bytes(b"x")
    _run_state(out)
    for name in ("model.dzip", "report.md", "notes.txt"):
        (out / name).write_text(name)
    (out / "mine").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    (out / "quantize").symlink_to(outside)  # a link named like a stage: only the link goes
    said = []
    with run_folder(out, restart=True, log=said.append):
        pass
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, "notes.txt", "mine"])
    assert (outside / "keep").read_text() == "keep"
    assert "notes.txt" in said[0] and "mine/" in said[0]


def test_restart_never_deletes_through_a_symlinked_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    _run_state(real)
    (real / "model.dzip").write_text("x")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(DeepzipError, match="symlink"), \
            run_folder(tmp_path / "link", restart=True):
        pass
    assert (real / "model.dzip").exists()


def test_the_run_that_loses_the_lock_deletes_nothing(tmp_path, monkeypatch):
    """Two runs start on a new folder at once: both saw no folder, one wins the lock. The
    loser's failed start must not remove the winner's folder (and its lock)."""
    out = tmp_path / "new"
    real_exists = type(out).exists
    with folder_lock(out):  # the winner, working in the folder it made
        (out / "state.json").write_text("{}")
        monkeypatch.setattr(type(out), "exists",
                            lambda p: False if p == out else real_exists(p))
        with pytest.raises(DeepzipError, match="in use"), run_folder(out):
            pass
        monkeypatch.undo()
        assert (out / LOCK_NAME).exists() and (out / "state.json").exists()


def test_a_failed_start_removes_the_folder_it_made(tmp_path):
    with pytest.raises(RuntimeError), run_folder(tmp_path / "made"):
        raise RuntimeError("the run could not start")
    assert not (tmp_path / "made").exists()


# --------------------------------------------------------------------- resumed files
def test_a_damaged_kept_search_is_searched_again(tmp_path):
    from types import SimpleNamespace

    from deepzip.context import RunContext

    said = []
    fake = SimpleNamespace(log=said.append)
    path = tmp_path / "budget.json"
    good = {"max_loss": 1.0, "margin_se": 2.0, "baseline_val_score": 0.9, "probes": [],
            "chosen": 2.5, "confirmed": []}
    for damaged in ["{}", "[]", "not json", '{"chosen": true}',
                    json.dumps({**good, "chosen": True}), json.dumps({**good, "probes": 3}),
                    "[" * 50_000 + "]" * 50_000]:
        path.write_text(damaged)
        assert RunContext.kept(fake, path, "budget search", lambda: good) == good
        assert "damaged" in said[-1]
    assert RunContext.kept(fake, path, "budget search", lambda: 1 / 0) == good  # kept


def test_a_damaged_run_state_is_one_line(tmp_path):
    from types import SimpleNamespace

    from deepzip.context import RunContext

    for damaged in ["[" * 50_000 + "]" * 50_000, '{"recipe": {}, "stages": {"prune": 3}}',
                    '{"recipe": {}, "stages": []}']:
        (tmp_path / "state.json").write_text(damaged)
        fake = SimpleNamespace(out=tmp_path, state_path=tmp_path / "state.json")
        with pytest.raises(DeepzipError, match="damaged"):
            RunContext.read_state(fake)


def test_a_checkpoint_whose_indices_point_past_the_codebook_does_not_load():
    from deepzip.quantize import QuantizeConfig, quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    quantize_(model, QuantizeConfig(bits=2))
    state = model.state_dict()
    key = next(k for k in state if k.endswith("indices"))
    state[key] = state[key].clone()
    state[key].view(-1)[0] = 255
    with pytest.raises(RuntimeError, match="index 255 with a 4-entry codebook"):
        model.load_state_dict(state)


def test_a_stored_bool_is_a_zero_or_a_one(tmp_path):
    from deepzip.dzip import read_arrays
    from deepzip.errors import DeepzipFormatError

    model = nn.Linear(4, 2)
    model.register_buffer("flags", torch.tensor([True, False, True]))
    path = tmp_path / "b.dzip"
    dzip_torch.save(model, path)
    assert read_arrays(path)[0]["flags"].tolist() == [True, False, True]
    data = bytearray(path.read_bytes())
    at = data.rfind(bytes([1, 0, 1]))
    assert at > 0
    data[at] = 7
    import zlib

    from deepzip.dzip import _PREAMBLE

    fields = list(_PREAMBLE.unpack_from(data))  # a well-formed file, checksums and all
    fields[-1] = zlib.crc32(bytes(data[_PREAMBLE.size + fields[3]:]))
    _PREAMBLE.pack_into(data, 0, *fields)
    path.write_bytes(bytes(data))
    with pytest.raises(DeepzipFormatError, match="other than 0 or 1"):
        read_arrays(path)


def test_a_file_that_fits_no_architecture_builds_no_alignment(monkeypatch):
    """Guessing the architecture compares shapes first: a file with deeply nested
    wrapper prefixes is not renamed once per registered model (that cost seconds)."""
    from deepzip import checkpoint

    calls = []
    real = checkpoint.align_state_dict
    monkeypatch.setattr(checkpoint, "align_state_dict",
                        lambda *a: calls.append(1) or real(*a))
    state = {"module." * 20_000 + "w": torch.zeros(3, 3)}
    assert checkpoint.guess_arch(state) == [] and calls == []
    renamed = {"module." + k: v for k, v in get("resnet20").state_dict().items()}
    assert checkpoint.guess_arch(renamed) == ["resnet20"]
    (key,) = real(state, {"w": torch.zeros(3, 3)})  # 8 rounds of renaming at most
    assert key == "module." * (20_000 - 8) + "w"


def test_atomic_write_to_the_null_device_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with atomic_write(os.devnull) as f:
        f.write(b"x" * 100)
    assert os.path.exists(os.devnull) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["m.pt", "m.safetensors", "m.dzip"])
def test_outputs_get_the_users_umask(capsys, tmp_path, files, name):
    if name.endswith(".safetensors"):
        pytest.importorskip("safetensors")
    old = os.umask(0o027)
    try:
        argv = (["encode", files / "m.pt", "-o", tmp_path / name] if name.endswith(".dzip")
                else ["decode", files / "m.dzip", "-o", tmp_path / name])
        one_line(capsys, *argv, code=0)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640
