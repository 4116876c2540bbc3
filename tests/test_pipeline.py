import json

import pytest
import torch

from deepzip import DeepzipError, dzip
from deepzip.checkpoint import ModelSpec, save_checkpoint
from deepzip.cli import main
from deepzip.loading import load_model
from deepzip.models import get
from deepzip.pipeline import Pipeline
from deepzip.recipe import Distill, load_recipe
from deepzip.task import image_task


@pytest.fixture(scope="module")
def start_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "start.pt"
    save_checkpoint(get("resnet20"), ModelSpec(), path)
    return path


def test_smoke_run_end_to_end_and_resume(tmp_path, data_root, start_model, capsys):
    out = tmp_path / "run"
    argv = ["run", "smoke", "--model", str(start_model), "--subset", "512", "--data-dir",
            str(data_root), "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert s["same_predictions"] == "512/512"  # decoded file == in-memory model
    assert s["quantized_score"] == s["decoded_score"] and s["identical_outputs"]
    assert s["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert s["real_ratio"] > 5 and s["formula_ratio"] > s["real_ratio"]
    for f in ["model.dzip", "report.md", "layers.png", "recipe.yaml", "state.json"]:
        assert (out / f).is_file()
    capsys.readouterr()
    assert main(argv) == 0  # everything done: nothing is retrained
    log = capsys.readouterr().out
    assert "[prune]" not in log and "[quantize]" not in log
    assert json.loads((out / "report.json").read_text())["summary"] == s


def test_interrupted_run_resumes_at_its_stage(tmp_path, data_root, start_model, monkeypatch):
    recipe = load_recipe("recipes/smoke.yaml")
    recipe.model = str(start_model)
    data = image_task("cifar10", data_root, subset=512)
    logs = []

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "encode", boom)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(recipe, tmp_path, data, log=logs.append).run()
    assert set(json.loads((tmp_path / "state.json").read_text())["stages"]) == {
        "baseline", "prune", "quantize"}
    monkeypatch.undo()
    state = json.loads((tmp_path / "state.json").read_text())
    del state["recipe"]["reference"]  # written by a deepzip that had no such key: still ours
    (tmp_path / "state.json").write_text(json.dumps(state))
    logs.clear()
    Pipeline(recipe, tmp_path, data, log=logs.append).run()
    assert not any(m.startswith(("[prune]", "[quantize]")) for m in logs)
    assert any(m.startswith("[encode]") for m in logs)
    recipe.quantize.bits = 3  # only a later stage changed: pruning is kept, the rest redone
    logs.clear()
    report = Pipeline(recipe, tmp_path, data, log=logs.append).run()
    assert not any(m.startswith("[prune]") for m in logs)
    assert any(m.startswith("[quantize]") for m in logs)
    assert all(t["clusters"] <= 8 for t in report["stages"]["encode"]["tensors"]
               if "clusters" in t)
    recipe.prune.steps[0].amount = 0.5
    with pytest.raises(DeepzipError, match="different recipe"):
        Pipeline(recipe, tmp_path, data)


def test_reference_model_is_the_baseline(tmp_path, data_root, start_model):
    """Compressing an already-pruned model still reports the loss against the original."""
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_checkpoint(get("resnet20"), ModelSpec(), other)
    recipe = load_recipe("recipes/smoke.yaml")
    recipe.prune.schedule, recipe.quantize.epochs = "none", 0
    recipe.model, recipe.reference = str(other), str(start_model)
    data = image_task("cifar10", data_root, subset=512)
    pipe = Pipeline(recipe, tmp_path / "run", data, log=lambda _m: None)
    report = pipe.run()
    ref, spec = load_model(str(start_model))
    assert report["stages"]["baseline"]["model"] == str(start_model)
    assert report["summary"]["baseline_score"] == pipe._score(ref, spec)
    assert pipe._loss(Distill()).teacher.state_dict()["conv1.weight"].equal(
        ref.state_dict()["conv1.weight"])


def test_gradual_pruning_with_distillation_path(tmp_path, data_root, start_model):
    """The default recipe's path: global-threshold AGP, distillation, quantization-aware
    training, trained centroids, grid stores."""
    recipe_file = tmp_path / "agp.yaml"
    recipe_file.write_text(f"""
name: agp-smoke
model: {start_model}
prune:
  schedule: agp
  agp: {{final: 0.8, epochs: 2, start_epoch: 0, end_epoch: 1, frequency: 2,
         global_threshold: true}}
  distill: {{alpha: 0.7, temperature: 4.0}}
quantize: {{bits: 6, entropy_weight: 80, sensitivity: fisher, target_bits: 2.5, qat_epochs: 1,
            recluster_every: 2, epochs: 1, distill: {{alpha: 0.5, temperature: 2.0}}}}
encode: {{codebook_dtype: int8, raw_dtype: int8}}
""")
    recipe = load_recipe(recipe_file)
    report = Pipeline(recipe, tmp_path / "run", image_task("cifar10", data_root, subset=512),
                      log=lambda _m: None).run()
    s = report["summary"]
    assert s["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert s["same_predictions"] == "512/512" and s["quantized_score"] == s["decoded_score"]
    layers = report["stages"]["quantize"]["layers"]
    assert any(v["clusters"] < 64 for v in layers.values())  # the penalty dropped clusters
    assert 2.0 < s["huffman_avg_bits"] <= 2.5 + 0.05  # the budget (+ the classifier's zeros)
    sens = report["stages"]["quantize"]["sensitivity"]
    assert set(sens) == set(layers) and all(v > 0 for v in sens.values())
    stores = {e["store"] for e in dzip.read_container(tmp_path / "run" / "model.dzip")[0]["tensors"]
              if "store" in e}
    assert stores == {"int8"}  # BatchNorm and the classifier bias on 8-bit grids
    books = {e["codebook_dtype"] for e in dzip.read_container(tmp_path / "run" / "model.dzip")[0][
        "tensors"] if "codebook_dtype" in e}
    assert books == {"int8"}
    phases = [r["phase"] for r in report["stages"]["quantize"]["history"]]
    assert phases == ["qat", "centroids"]
    trained = report["training_seconds"]
    assert trained["prune"] > 0 and trained["quantize"] > 0 and trained["encode"] is None
    assert "| training |" in (tmp_path / "run" / "report.md").read_text()


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, data_root, start_model):
    """An uninterrupted smoke run: (recipe, task, the bytes of its model.dzip)."""
    recipe = load_recipe("recipes/smoke.yaml")
    recipe.model = str(start_model)
    data = image_task("cifar10", data_root, subset=256)
    out = tmp_path_factory.mktemp("clean")
    Pipeline(recipe, out, data, log=lambda _m: None).run()
    return recipe, data, (out / "model.dzip").read_bytes()


@pytest.mark.parametrize("stop_at", ["prune", "quantize", "encode", "verify"])
def test_resumed_run_writes_the_same_bytes(tmp_path, clean_run, monkeypatch, stop_at):
    """Interrupted before any stage and resumed, a run writes exactly the file an
    uninterrupted run writes (pruned parameters come back in another order otherwise)."""
    recipe, data, clean = clean_run
    original = getattr(Pipeline, stop_at)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, stop_at, boom)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(recipe, tmp_path / "resumed", data, log=lambda _m: None).run()
    monkeypatch.setattr(Pipeline, stop_at, original)
    written = tmp_path / "resumed" / "model.dzip"
    before = written.stat().st_mtime_ns if written.exists() else None
    state = json.loads((tmp_path / "resumed" / "state.json").read_text())
    assert stop_at not in state["stages"]  # the interrupted stage had not finished
    report = Pipeline(recipe, tmp_path / "resumed", data, log=lambda _m: None).run()
    assert written.read_bytes() == clean
    assert not list((tmp_path / "resumed").rglob("*.tmp"))
    assert report["summary"]["identical_outputs"]  # the resumed verify ran on the file
    if before is not None:  # written before the interrupt: kept, not written again
        assert written.stat().st_mtime_ns == before
