import json
import subprocess
import sys

import pytest
import torch

from deepzip import TrainConfig, evaluate, fit
from deepzip.checkpoint import load_checkpoint
from deepzip.cli import main
from deepzip.data import IMAGENET_MEAN, IMAGENET_STD, BatchLoader
from deepzip.models import get


def run(capsys, *argv):
    capsys.readouterr()  # drop what earlier steps printed
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_python_dash_m_and_the_console_script_say_one_version():
    import shutil
    from importlib.metadata import version

    import deepzip

    r = subprocess.run([sys.executable, "-m", "deepzip", "--version"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"deepzip {deepzip.__version__}"
    assert version("deepzip") == deepzip.__version__  # pip show says the same
    script = shutil.which("deepzip")
    if script:  # installed: the console script runs the same main
        r = subprocess.run([script, "--version"], capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip() == f"deepzip {deepzip.__version__}"


@pytest.mark.parametrize("argv,match", [
    (["eval", "no-such.pt"], "no such checkpoint file"),
    (["eval", "resnet20", "--normalize", "bogus"], "bad --normalize"),
    (["eval", "resnet20", "--data-dir", "/nonexistent"], "--download"),
    (["prune", "resnet20", "--method", "std", "-o", "/tmp/x"], "needs --s"),
    (["summary", "resnet20", "--structure", "layer7"], "no prunable layer"),
    (["train", "--epochs", "-3", "--out", "/tmp/x", "--data-dir", "/nonexistent"],
     "epochs must be >= 0"),
])
def test_user_errors_are_one_line(capsys, argv, match):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert err.count("\n") == 1 and match in err and "Traceback" not in err


def test_public_imagenet_checkpoint_evaluates(capsys, tmp_path, data_root, cifar_train,
                                              cifar_test):
    """A checkpoint in the common public layout, trained with ImageNet normalization."""
    torch.manual_seed(0)
    model = get("resnet20")
    train = BatchLoader(cifar_train.subset(2560), 128, train=True, mean=IMAGENET_MEAN,
                        std=IMAGENET_STD, channels_last=True)
    fit(model, train, TrainConfig(epochs=2, lr=0.05))
    test = BatchLoader(cifar_test.subset(1000), 500, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    _, expected = evaluate(model, test)
    path = tmp_path / "resnet20-public.th"
    torch.save({"state_dict": {f"module.{k}": v.contiguous()
                               for k, v in model.state_dict().items()},
                "best_prec1": expected * 100}, path)

    rc, out, _ = run(capsys, "eval", path, "--normalize", "imagenet", "--data-dir", data_root,
                     "--subset", 1000, "--json")
    assert rc == 0
    got = json.loads(out)
    assert got["test_acc"] == expected and got["test_acc"] > 0.2
    assert got["mean"] == list(IMAGENET_MEAN)
    rc, out, _ = run(capsys, "eval", path, "--data-dir", data_root, "--subset", 1000, "--json")
    assert json.loads(out)["test_acc"] != expected  # the wrong normalization is noticed


def test_train_prune_summary_commands(capsys, tmp_path, data_root):
    rc, out, _ = run(capsys, "train", "--epochs", 1, "--subset", 1024, "--data-dir", data_root,
                     "--out", tmp_path / "t")
    assert rc == 0 and (tmp_path / "t" / "model.pt").is_file()
    assert len((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()) == 1
    rc, out, _ = run(capsys, "prune", tmp_path / "t" / "model.pt", "--method", "percentile",
                     "--q", 0.5, "--exclude", "linear", "--finetune-epochs", 1, "--subset", 1024,
                     "--data-dir", data_root, "-o", tmp_path / "p")
    assert rc == 0 and "masked retraining" in out
    model, _ = load_checkpoint(tmp_path / "p" / "model.pt")
    assert (model.layer2[1].conv2.weight == 0).float().mean() == pytest.approx(0.5, abs=1e-3)
    assert (model.linear.weight == 0).sum() == 0
    report = json.loads((tmp_path / "p" / "prune.json").read_text())
    assert {"acc_before", "acc_pruned", "acc_retrained", "summary"} <= set(report)
    rc, out, _ = run(capsys, "summary", tmp_path / "p" / "model.pt", "--json")
    assert rc == 0 and json.loads(out)["total"]["sparsity"] > 0.45
    rc, out, _ = run(capsys, "summary", tmp_path / "p" / "model.pt", "--structure", "conv1",
                     "layer3.2.conv2", "--plot", tmp_path / "f.png")
    assert rc == 0 and "all-zero filters" in out and (tmp_path / "f.png").stat().st_size > 0


def test_quantize_with_fisher_weighted_penalties_and_a_budget(capsys, tmp_path, data_root):
    from deepzip.checkpoint import ModelSpec, save_checkpoint
    from deepzip.prune import PruneConfig, bake_, prune_

    torch.manual_seed(0)
    model = get("resnet20")
    prune_(model, PruneConfig("percentile", 0.7))
    save_checkpoint(bake_(model), ModelSpec(), tmp_path / "pruned.pt")
    rc, _, _ = run(capsys, "quantize", tmp_path / "pruned.pt", "--bits", 6, "--entropy-weight",
                   80, "--sensitivity", "fisher", "--target-bits", 2, "--subset", 512,
                   "--data-dir", data_root, "-o", tmp_path / "q")
    assert rc == 0
    q = json.loads((tmp_path / "q" / "quantize.json").read_text())
    assert q["config"]["target_bits"] == 2
    rc, out, _ = run(capsys, "encode", tmp_path / "q" / "model.pt", "-o", tmp_path / "m.dzip")
    assert rc == 0 and float(out.split("Huffman ")[1].split(" bits")[0]) <= 2.05
    sens = q["config"]["sensitivity"]
    assert set(sens) == set(q["layers"]) and all(v > 0 for v in sens.values())


def test_quantize_encode_inspect_decode_eval(capsys, tmp_path, data_root):
    from deepzip.checkpoint import ModelSpec, save_checkpoint
    from deepzip.prune import PruneConfig, bake_, prune_

    torch.manual_seed(0)
    model = get("resnet20")
    prune_(model, PruneConfig("percentile", 0.7))
    save_checkpoint(bake_(model), ModelSpec(), tmp_path / "pruned.pt")
    rc, out, _ = run(capsys, "quantize", tmp_path / "pruned.pt", "--bits", 4, "--bits-linear", 3,
                     "--init", "density", "--finetune-epochs", 1, "--subset", 512,
                     "--plot-layers", "conv1", "linear", "--data-dir", data_root,
                     "-o", tmp_path / "q")
    assert rc == 0 and "centroid training" in out
    assert (tmp_path / "q" / "weights.png").stat().st_size > 0
    q = json.loads((tmp_path / "q" / "quantize.json").read_text())
    assert q["layers"]["linear"]["bits"] == 3 and "acc_trained" in q

    dz = tmp_path / "m.dzip"
    rc, out, _ = run(capsys, "encode", tmp_path / "q" / "model.pt", "-o", dz,
                     "--raw-dtype", "float32", "--no-fold-batchnorm")
    assert rc == 0 and "real compression" in out and "indices-only ratio" in out
    rc, out, _ = run(capsys, "inspect", dz, "--json")
    info = json.loads(out)
    assert info["file_bytes"] == dz.stat().st_size and info["real_ratio"] > 5
    linear = next(r for r in info["tensors"] if r["name"] == "linear.weight")
    assert linear["bits"] <= 3 and linear["clusters"] <= 8

    ev = [("eval", p, "--subset", 500, "--data-dir", data_root, "--json")
          for p in (tmp_path / "q" / "model.pt", dz)]
    accs = [json.loads(run(capsys, *a)[1])["test_acc"] for a in ev]
    assert accs[0] == accs[1]  # the decoded file scores exactly what the checkpoint does
    rc, out, _ = run(capsys, "decode", dz, "-o", tmp_path / "back.pt")
    back, spec = load_checkpoint(tmp_path / "back.pt")  # the spec travels with the weights
    ref, ref_spec = load_checkpoint(tmp_path / "q" / "model.pt")
    assert spec == ref_spec
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    plain = torch.load(tmp_path / "back.pt")  # as the README promises: a plain state_dict
    fresh = get("resnet20")
    fresh.load_state_dict(plain)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in ref.state_dict().items())


def test_corrupt_dzip_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.dzip"
    bad.write_bytes(b"DZIP\x00\r\n\x1a" + b"\x01\x00" + b"\x00" * 30)
    for cmd in (["inspect", bad], ["eval", bad], ["decode", bad, "-o", tmp_path / "x.pt"]):
        rc, _, err = run(capsys, *cmd)
        assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_old_prefixed_resnet32_evaluates_and_compresses(capsys, tmp_path, data_root):
    """A third-party ResNet-32 file as such files are found: {'state_dict': ...}, module.
    prefixes, BatchNorm without num_batches_tracked, ImageNet normalization. Compressed with
    the smoke recipe (the default's code path, minutes instead of an hour)."""
    torch.manual_seed(0)
    model = get("resnet32")
    state = {f"module.{k}": v for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet32-old.th"
    torch.save({"state_dict": state, "best_prec1": 92.6}, path)
    rc, _, err = run(capsys, "eval", path, "--data-dir", data_root, "--subset", 200)
    assert rc == 2 and "--arch resnet32" in err  # the hint names the fix
    rc, out, _ = run(capsys, "eval", path, "--arch", "resnet32", "--normalize", "imagenet",
                     "--data-dir", data_root, "--subset", 200, "--json")
    assert rc == 0 and json.loads(out)["arch"] == "resnet32"
    rc, out, err = run(capsys, "run", "smoke", "--model", path, "--arch", "resnet32",
                       "--normalize", "imagenet", "--subset", 256, "--data-dir", data_root,
                       "-o", tmp_path / "run")
    assert rc == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["summary"]["identical_outputs"] and report["summary"]["real_ratio"] > 5
    rc, out, _ = run(capsys, "eval", tmp_path / "run" / "model.dzip", "--data-dir", data_root,
                     "--subset", 256, "--json")  # the file records arch and normalization
    assert rc == 0 and json.loads(out)["test_acc"] == report["summary"]["decoded_score"]


def test_failed_start_does_not_block_the_rerun(capsys, tmp_path, data_root):
    path = tmp_path / "r32.th"
    torch.save(get("resnet32").state_dict(), path)
    argv = ["run", "smoke", "--model", path, "--subset", 128, "--data-dir", data_root,
            "-o", tmp_path / "run"]
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and "--arch resnet32" in err
    rc, _, err = run(capsys, *argv, "--arch", "resnet32")
    assert rc == 0, err


def test_mnist_lenet_eval_and_bad_patterns(capsys, data_root):
    rc, out, _ = run(capsys, "eval", "lenet300", "--data-dir", data_root, "--subset", 500,
                     "--json")
    got = json.loads(out)
    assert rc == 0 and got["task"] == "mnist" and got["test_acc"] > 0.95
    rc, _, err = run(capsys, "prune", "lenet300", "--method", "global", "--sparsity", 0.5,
                     "--exclude", "linear", "-o", "/tmp/never", "--data-dir", data_root)
    assert rc == 2 and "matches no prunable parameter" in err and "fc1" in err
    rc, _, err = run(capsys, "eval", "resnet32", "--data-dir", data_root)
    assert rc == 2 and "deepzip train --model resnet32" in err


def test_encode_says_when_the_file_rounds(capsys, tmp_path):
    from deepzip.checkpoint import ModelSpec, save_checkpoint
    from deepzip.dzip_torch import round_to_file_precision_
    from deepzip.quantize import QuantizeConfig, dequantize_, quantize_

    torch.manual_seed(0)
    model = get("resnet20").eval()
    quantize_(model, QuantizeConfig(bits=4))
    dequantize_(model)
    save_checkpoint(model, ModelSpec(), tmp_path / "raw.pt")
    rc, out, _ = run(capsys, "encode", tmp_path / "raw.pt", "-o", tmp_path / "a.dzip")
    assert rc == 0 and "not at the file's precision" in out
    round_to_file_precision_(model)
    save_checkpoint(model, ModelSpec(), tmp_path / "rounded.pt")
    rc, out, _ = run(capsys, "encode", tmp_path / "rounded.pt", "-o", tmp_path / "b.dzip")
    assert rc == 0 and "not at the file's precision" not in out
    rc, out, _ = run(capsys, "encode", tmp_path / "raw.pt", "-o", tmp_path / "c.dzip",
                     "--raw-dtype", "float32", "--no-fold-batchnorm")
    assert rc == 0 and "not at the file's precision" not in out  # stored exactly


def test_train_holds_out_the_validation_images_the_pipeline_decides_on(capsys, tmp_path,
                                                                       data_root):
    rc, out, _ = run(capsys, "train", "--model", "lenet300", "--task", "mnist", "--epochs", 1,
                     "--validation", 5000, "--subset", 1000, "--data-dir", data_root,
                     "--out", tmp_path / "t")
    assert rc == 0 and "; val acc 0." in out
    log = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text()
           .splitlines()]
    assert "val_acc" in log[-1] and "test_acc" not in log[-1]


def test_eval_scores_the_held_out_examples_on_request(capsys, tmp_path, data_root):
    rc, out, _ = run(capsys, "eval", "lenet300", "--validation", 5000, "--subset", 500,
                     "--json", "--data-dir", data_root)
    result = json.loads(out)
    assert rc == 0 and result["examples"] == 500 and "val_acc" in result
    assert "test_acc" not in result
