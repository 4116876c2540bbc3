"""Every way a command can fail ends in one line on stderr and exit status 2 (130 for an
interrupt): user mistakes, damaged run folders, OS errors. Never a traceback."""

import json

import pytest
import torch

from deepzip.checkpoint import ModelSpec, save_checkpoint
from deepzip.cli import main
from deepzip.models import get


def one_line(capsys, *argv, code=2):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == code, (rc, err)
    assert err.count("\n") == 1 and err.startswith("deepzip") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "m.pt"
    torch.manual_seed(0)
    save_checkpoint(get("resnet20"), ModelSpec(), path)
    return path


def test_output_paths_that_cannot_be_written(capsys, tmp_path, ckpt):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    err = one_line(capsys, "encode", ckpt, "-o", a_file / "m.dzip")  # a path under a file
    assert "File exists" in err or "Not a directory" in err
    (tmp_path / "dir.dzip").mkdir()
    err = one_line(capsys, "encode", ckpt, "-o", tmp_path / "dir.dzip")  # -o is a folder
    assert "directory" in err
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left behind


def test_disk_full_during_a_checkpoint(capsys, tmp_path, ckpt, monkeypatch):
    def full(*_a, **_k):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 512")

    monkeypatch.setattr(torch, "save", full)
    err = one_line(capsys, "decode", _dzip(tmp_path, ckpt), "-o", tmp_path / "back.pt")
    assert "disk full" in err and not (tmp_path / "back.pt").exists()


def _dzip(tmp_path, ckpt):
    from deepzip import dzip_torch
    from deepzip.checkpoint import load_checkpoint

    path = tmp_path / "m.dzip"
    dzip_torch.save(load_checkpoint(ckpt)[0], path, spec=ModelSpec())
    return path


@pytest.mark.parametrize("argv,match", [
    (["eval", "resnet20", "--device", "meta"], "cpu or cuda"),
    (["eval", "resnet20", "--device", "mps"], "cpu or cuda"),
    (["eval", "resnet20", "--device", "warp9"], "bad --device"),
    (["run", "smoke", "--subset", "0"], "--subset must be >= 1"),
    (["run", "smoke", "--subset", "-5"], "--subset must be >= 1"),
    (["run", "smoke", "--task", "imagenet"], "unknown task"),
    (["run", "smoke", "--arch", "nosuch.module:Net"], "cannot import"),
    (["run", "smoke", "--seed", "-1"], "seed"),
    (["inspect", "/dev/zero"], "not a regular file"),
    (["eval", "lenet5", "--normalize", "0.5/0"], "bad --normalize"),
])
def test_bad_arguments(capsys, data_root, argv, match):
    err = one_line(capsys, *argv, "--data-dir", data_root) if argv[0] != "inspect" else \
        one_line(capsys, *argv)
    assert match in err


def test_damaged_run_folders(capsys, tmp_path, data_root, ckpt):
    run = tmp_path / "run"
    argv = ["run", "smoke", "--model", ckpt, "--subset", 128, "--data-dir", data_root,
            "-o", run]
    run.mkdir()
    (run / "state.json").write_text('{"recipe": {"na')  # truncated by a crash
    assert "damaged" in one_line(capsys, *argv)
    (run / "state.json").unlink()
    (run / "prune" / "step1").mkdir(parents=True)
    (run / "prune" / "step1" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    assert "cannot resume" in one_line(capsys, *argv)
    torch.save({"state_dict": {}, "epoch": 3}, run / "prune" / "step1" / "checkpoint.pt")
    assert "another run's" in one_line(capsys, *argv)  # a checkpoint of something else
    (run / "prune" / "step1" / "checkpoint.pt").unlink()
    (run / ".model.dzip.abcd1234.tmp").write_bytes(b"half a file")  # a kill before a rename
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    assert not list(run.rglob("*.tmp"))
    pareto_in = tmp_path / "other"
    pareto_in.mkdir()
    (pareto_in / "report.json").write_text("{not json")
    assert "not a deepzip report" in one_line(capsys, "pareto", run, pareto_in, "-o",
                                              tmp_path / "p.png")
    report = json.loads((run / "report.json").read_text())
    assert report["summary"]["identical_outputs"]


def test_interrupt_exits_130(capsys, monkeypatch, ckpt):
    import deepzip.cli as cli

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_inspect", interrupted)
    parser_func = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with(parser_func(), interrupted))
    assert "interrupted" in one_line(capsys, "inspect", "x.dzip", code=130)


def _with(parser, func):
    for action in parser._subparsers._group_actions:
        action.choices["inspect"].set_defaults(func=func)
    return parser


def test_nan_weights_are_not_written(capsys, tmp_path):
    model = get("resnet20")
    with torch.no_grad():
        model.linear.weight[0, 0] = float("nan")
    save_checkpoint(model, ModelSpec(), tmp_path / "nan.pt")
    assert "NaN" in one_line(capsys, "encode", tmp_path / "nan.pt", "-o", tmp_path / "x.dzip")
    assert not (tmp_path / "x.dzip").exists()


def test_read_only_folder(capsys, tmp_path, ckpt, monkeypatch):
    """Root ignores permission bits, so the read-only file system is simulated where the
    write lands: the rename that publishes a finished file."""
    import errno
    import os

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "m.dzip"))

    monkeypatch.setattr(os, "replace", read_only)
    err = one_line(capsys, "encode", ckpt, "-o", tmp_path / "m.dzip")
    assert "Read-only file system" in err and not list(tmp_path.glob(".*.tmp"))


def test_a_file_that_is_no_model_is_one_line_and_a_failed_start_leaves_no_folder(
        capsys, tmp_path, data_root):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    err = one_line(capsys, "eval", notes, "--data-dir", data_root)
    assert "neither a PyTorch checkpoint nor a .dzip file" in err
    err = one_line(capsys, "run", "smoke", "--model", notes, "-o", tmp_path / "run",
                   "--data-dir", data_root)
    assert not (tmp_path / "run").exists()
