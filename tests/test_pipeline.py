import dataclasses
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
    assert report["summary"]["baseline_score"] == pipe.ctx.score(ref, spec)
    assert pipe.ctx.loss(Distill()).teacher.state_dict()["conv1.weight"].equal(
        ref.state_dict()["conv1.weight"])


@pytest.mark.slow
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


def test_a_file_swapped_before_verify_stops_the_run(tmp_path, clean_run, monkeypatch):
    """verify checks the file the encode stage wrote: one changed in between (another
    run's, a user's) ends the run with one line, not "outputs identical: False"."""
    from deepzip.errors import DeepzipError

    recipe, data, clean = clean_run
    original = Pipeline.verify

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "verify", boom)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(recipe, tmp_path / "run", data, log=lambda _m: None).run()
    monkeypatch.setattr(Pipeline, "verify", original)
    written = tmp_path / "run" / "model.dzip"
    swapped = bytearray(written.read_bytes())
    swapped[-1] ^= 1
    written.write_bytes(bytes(swapped))
    with pytest.raises(DeepzipError, match="not the file this run wrote"):
        Pipeline(recipe, tmp_path / "run", data, log=lambda _m: None).run()


class _Watched:
    """A test loader that records, at its first batch, which of the run's files exist."""

    def __init__(self, loader, out):
        self.loader, self.out, self.first = loader, out, None

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.first is None:
            self.first = sorted(p.name for p in self.out.iterdir())
        return iter(self.loader)


def test_a_run_with_validation_data_reads_the_test_set_only_in_its_final_evaluation(
        tmp_path):
    """Decisions (training-time evaluations, the baseline check, a sensitivity scan, the
    scores stages record) read the validation data; the test loader's first batch comes
    after the file is written, in the final evaluation, and the report says so."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from deepzip import Task
    from deepzip.api import compress
    from deepzip.recipe import AGPStage, PruneStage, QuantizeStage, Recipe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    part = lambda a, b: DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=64)  # noqa: E731
    out = tmp_path / "run"
    out.mkdir()
    test = _Watched(part(320, 384), out)
    task = Task.from_loaders(part(0, 256), test, val=part(256, 320))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    recipe = Recipe(name="val", validation=64, prune=PruneStage(
        schedule="agp", agp=AGPStage(final=0.5, epochs=2, end_epoch=1, frequency=1,
                                     sensitivity_max_drop=0.5)),
        quantize=QuantizeStage(bits=3, epochs=1))
    result = compress(model, task, recipe, out=out, log=lambda _: None)
    assert test.first is not None and "model.dzip" in test.first  # after encode
    st = result.report["stages"]
    assert "val_score" in st["baseline"] and "score" in st["baseline"]  # both, named
    history = st["prune"]["history"]
    assert all("val_acc" in r and "test_acc" not in r for r in history)
    s = result.report["summary"]
    assert s["decisions_on"] == "validation" and s["validation_examples"] == 64
    assert "read only by the final evaluation" in (out / "report.md").read_text()


def test_a_recipe_asking_for_validation_needs_a_task_that_holds_some_out(tmp_path):
    from torch import nn

    from deepzip.api import compress
    from deepzip.recipe import Recipe

    loader = [(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(DeepzipError, match="cannot hold 10 validation examples out of its "
                       "test loader .* pass Task.from_loaders"):
        compress(nn.Linear(8, 3), (loader, loader), Recipe(validation=10,
                 validation_from="test"), out=tmp_path / "r")


def test_a_pair_of_dataloaders_gets_its_validation_data_held_out_by_the_recipe(tmp_path):
    """validation: N with validation_from: test holds N examples of a user's own test
    DataLoader out (a fixed seed), so max_loss and the budget recipe work on any model and
    data; the report is read on the rest."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from deepzip.api import compress
    from deepzip.recipe import PruneStage, QuantizeStage, Recipe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(448, 8, generator=g)
    y = (x[:, 0] > 0).long()
    train = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=64, shuffle=True)
    test = DataLoader(TensorDataset(x[256:], y[256:]), batch_size=64)
    recipe = Recipe(name="pair", validation=96, validation_from="test", max_loss=5.0,
                    prune=PruneStage(schedule="none"),
                    quantize=QuantizeStage(bits=4, entropy_weight=20, probe_epochs=0))
    report = compress(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)),
                      (train, test), recipe, out=tmp_path / "run", log=lambda _: None).report
    assert report["summary"]["validation_examples"] == 96
    assert "96 of the user's test examples held out" in report["summary"]["validation_data"]
    assert report["stages"]["verify"]["examples"] == 192 - 96


@pytest.mark.parametrize("source", ["train", "test"])
def test_deepzip_run_holds_out_validation_data_on_request(tmp_path, data_root, start_model,
                                                          source):
    out = tmp_path / "run"
    assert main(["run", "smoke", "--model", str(start_model), "--subset", "256",
                 "--validation", "1000", "--validation-from", source,
                 "--data-dir", str(data_root), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["decisions_on"] == "validation"
    assert report["summary"]["validation_examples"] == 256  # the first N of --subset
    held = {"train": "training images held out", "test": "test images held out"}[source]
    assert held in report["summary"]["validation_data"]
    assert held in (out / "report.md").read_text()
    assert all("val_acc" in r for r in report["stages"]["prune"]["history"] if
               any(k.endswith("_acc") and not k.startswith("train") for k in r))


def _tiny_classification(out):
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from deepzip import Task

    g = torch.Generator().manual_seed(0)
    x = torch.randn(640, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    part = lambda a, b: DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=64)  # noqa: E731
    test = _Watched(part(512, 640), out)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    from deepzip import TrainConfig, fit

    fit(model, part(0, 384), TrainConfig(epochs=15, lr=0.1, precision="fp32", eval_every=0))
    return model, Task.from_loaders(part(0, 384), test, val=part(384, 512)), test


def test_max_loss_finds_the_smallest_file_within_the_budget_on_validation_data(tmp_path):
    """The search's probes bisect the sharing budget; the run writes the smallest budget
    that passed, confirmed by the full stage on validation data, and reads the test set
    only at the end; a looser budget gives a file no bigger."""
    from deepzip.api import compress
    from deepzip.recipe import PruneStage, QuantizeStage, Recipe

    sizes = {}
    for max_loss in (2.0, 20.0):
        out = tmp_path / f"run{max_loss}"
        out.mkdir()
        model, task, test = _tiny_classification(out)
        recipe = Recipe(name="budget", max_loss=max_loss, prune=PruneStage(schedule="none"),
                        quantize=QuantizeStage(bits=6, entropy_weight=50, epochs=1,
                                               probe_epochs=1, train={"lr": 0.01}))
        result = compress(model, task, recipe, out=out, log=lambda _: None)
        q = result.report["stages"]["quantize"]
        budget = q["budget"]
        probes = budget["probes"]
        assert probes[0]["target_bits"] == 6.0 and probes[0]["within"]  # 6 bits: no loss
        assert len(probes) == 7 and budget["max_loss"] == max_loss
        first = budget["confirmed"][0]
        assert first["target_bits"] == min(p["target_bits"] for p in probes if p["within"])
        assert budget["confirmed"][-1]["target_bits"] == q["target_bits"]
        if first["within"]:
            assert len(budget["confirmed"]) == 1 and first["loss"] <= max_loss
        assert "model.dzip" in test.first  # the test set: only the final evaluation
        sizes[max_loss] = result.report["summary"]["file_bytes"]
    assert sizes[20.0] <= sizes[2.0]


def test_max_loss_with_search_from_chooses_the_sparsity_on_validation_data(tmp_path):
    """The sparsity search tries the recipe's final sparsity first, then bisects towards
    search_from; the full stage prunes to the highest sparsity whose probe stayed within
    loss_share of max_loss, the report shows the probes, the test set waits for the end,
    and a resumed run keeps the search."""
    from deepzip.api import compress
    from deepzip.recipe import AGPStage, PruneStage, QuantizeStage, Recipe

    out = tmp_path / "run"
    out.mkdir()
    model, task, test = _tiny_classification(out)
    recipe = Recipe(name="search", max_loss=4.0, prune=PruneStage(
        schedule="agp", agp=AGPStage(final=0.97, epochs=4, end_epoch=2, frequency=1,
                                     search_from=0.3, probe_epochs=2, search_steps=2),
        loss_share=0.5, train={"lr": 0.05, "precision": "fp32"}),
        quantize=QuantizeStage(bits=6, entropy_weight=50, epochs=1, probe_epochs=0))
    result = compress(model, task, recipe, out=out, log=lambda _: None)
    prune = result.report["stages"]["prune"]
    search = prune["search"]
    probes = search["probes"]
    assert probes[0]["sparsity"] == 0.97 and search["limit"] == 2.0
    assert 0.3 <= search["chosen"] <= 0.97
    passed = [p["sparsity"] for p in probes if p["within"]]
    assert search["chosen"] == (max(passed) if passed else 0.3)
    assert prune["sparsity"] == pytest.approx(search["chosen"], abs=0.02)
    assert "The sparsity search" in (out / "report.md").read_text()
    assert "model.dzip" in test.first
    assert not (out / "prune" / "probes").exists()
    assert json.loads((out / "prune" / "search.json").read_text())["chosen"] == search["chosen"]
    with pytest.raises(DeepzipError, match="different recipe"):  # the search read max_loss
        compress(model, task, dataclasses.replace(recipe, max_loss=3.0), out=out,
                 log=lambda _: None)


def test_search_from_needs_max_loss():
    from deepzip.recipe import AGPStage, PruneStage, Recipe

    with pytest.raises(DeepzipError, match="search_from needs max_loss"):
        Recipe(prune=PruneStage(schedule="agp", agp=AGPStage(search_from=0.5))).validate()


def test_margin_se_holds_each_loss_plus_its_standard_error_against_the_budget(tmp_path):
    """With margin_se, every probe and confirmation adds that many standard errors of its
    loss (paired over the validation examples) before the comparison; the report shows
    the margins."""
    from deepzip.api import compress
    from deepzip.recipe import PruneStage, QuantizeStage, Recipe

    out = tmp_path / "run"
    out.mkdir()
    model, task, _ = _tiny_classification(out)
    recipe = Recipe(name="margin", max_loss=5.0, margin_se=1.0, prune=PruneStage(
        schedule="none"), quantize=QuantizeStage(bits=6, entropy_weight=50, epochs=1,
                                                probe_epochs=0, train={"lr": 0.01}))
    budget = compress(model, task, recipe, out=out, log=lambda _: None
                      ).report["stages"]["quantize"]["budget"]
    rows = budget["probes"] + budget["confirmed"]
    assert budget["margin_se"] == 1.0 and any(r["margin"] > 0 for r in rows)
    assert all(r["within"] == (r["loss"] + r["margin"] <= 5.0) for r in rows)
    assert "standard errors more" in (out / "report.md").read_text()
    with pytest.raises(DeepzipError, match="margin_se"):
        Recipe(margin_se=1.0).validate()


def test_the_sparsity_search_leaves_the_margin_to_the_final_confirmation(tmp_path):
    """With margin_se, a sparsity probe may spend loss_share of what its margin leaves of
    max_loss (not its loss plus the margin against the share), so the margin is counted
    once, by the confirmation after the sharing, whatever the share."""
    from deepzip.api import compress
    from deepzip.recipe import AGPStage, PruneStage, QuantizeStage, Recipe

    out = tmp_path / "run"
    out.mkdir()
    model, task, _ = _tiny_classification(out)
    recipe = Recipe(name="search", max_loss=4.0, margin_se=1.0, prune=PruneStage(
        schedule="agp", agp=AGPStage(final=0.97, epochs=2, end_epoch=1, frequency=1,
                                     search_from=0.3, probe_epochs=1, search_steps=1),
        loss_share=0.5, train={"lr": 0.05, "precision": "fp32"}),
        quantize=QuantizeStage(bits=6, entropy_weight=50, epochs=1, probe_epochs=0))
    compress(model, task, recipe, out=out, log=lambda _: None)
    search = json.loads((out / "prune" / "search.json").read_text())
    assert any(p["margin"] > 0 for p in search["probes"])
    for p in search["probes"]:
        assert p["limit"] == pytest.approx(0.5 * (4.0 - p["margin"]))
        assert p["within"] == (p["loss"] <= p["limit"])
    assert "what the model's margin" in " ".join((out / "report.md").read_text().split())


def _steps_recipe(amounts, **prune):
    """One-epoch global pruning steps to ``amounts`` under max_loss 10 with a margin of one
    standard error, then entropy-constrained sharing: the step policies' test recipe."""
    from deepzip.recipe import PruneStage, PruneStep, QuantizeStage, Recipe

    return Recipe(name="steps", max_loss=10.0, margin_se=1.0, prune=PruneStage(
        schedule="iterative", train={"lr": 0.05, "precision": "fp32"},
        steps=[PruneStep("global", a, 1) for a in amounts], **prune),
        quantize=QuantizeStage(bits=6, entropy_weight=50, epochs=1, probe_epochs=0))


def test_stop_over_budget_keeps_the_last_pruning_step_within_its_part_of_max_loss(
        tmp_path):
    """Iterative pruning with stop_over_budget scores each step's retrained model on
    validation data; the first over loss_share of what its margin leaves of max_loss is
    undone, no later step runs, and the stage delivers the step before it."""
    from deepzip.api import compress

    out = tmp_path / "run"
    out.mkdir()
    model, task, test = _tiny_classification(out)
    recipe = _steps_recipe([0.3, 0.995, 0.999], stop_over_budget=True)
    log: list[str] = []
    prune = compress(model, task, recipe, out=out, log=log.append).report["stages"]["prune"]
    rows = prune["search"]["probes"]
    assert [r["step"] for r in rows] == [1, 2] and prune["search"]["kept_step"] == 1
    assert rows[0]["within"] and not rows[1]["within"] and rows[0]["margin"] > 0
    for r in rows:
        assert r["limit"] == pytest.approx(0.5 * (10.0 - r["margin"]))
        assert r["within"] == (r["loss"] <= r["limit"])
    assert prune["sparsity"] == pytest.approx(rows[0]["sparsity"]) == pytest.approx(0.3, abs=0.01)
    assert not any("step 3/3" in line for line in log)
    assert "step 1 kept" in (out / "report.md").read_text()
    assert "model.dzip" in test.first
    with pytest.raises(DeepzipError, match="different recipe"):  # the steps read max_loss
        compress(model, task, dataclasses.replace(recipe, max_loss=9.0), out=out,
                 log=lambda _: None)
    with pytest.raises(DeepzipError, match="stop_over_budget needs"):
        dataclasses.replace(recipe, max_loss=None, margin_se=0.0).validate()


def _keep_steps_run(tmp_path):
    """The tiny task through keep_steps to 30, 60, 99.9 and 99.95%: (its folder, the
    report's stages, the watched test loader, the log)."""
    from deepzip.api import compress

    out = tmp_path / "run"
    out.mkdir()
    model, task, test = _tiny_classification(out)
    recipe = _steps_recipe([0.3, 0.6, 0.999, 0.9995], keep_steps=True)
    log: list[str] = []
    return out, compress(model, task, recipe, out=out, log=log.append).report["stages"], \
        test, log


def test_keep_steps_chooses_the_step_and_the_sharing_budget_together(tmp_path):
    """prune.keep_steps prunes through every step (stopping once one is over the whole
    budget less its margin), keeps each step's model, smooths the losses against sparsity
    and chooses the smallest file predicted within max_loss among the candidate steps and
    probed budgets; the margin is paid once, by the file that ships."""
    from deepzip import decide

    out, stages, test, _ = _keep_steps_run(tmp_path)
    search, budget = stages["prune"]["search"], stages["quantize"]["budget"]
    rows = search["steps"]
    assert [r["step"] for r in rows] == [1, 2, 3]  # step 3 is hopeless: step 4 never runs
    assert rows[2]["loss"] - rows[2]["margin"] > 10.0
    assert [r["fit"] for r in rows] == decide.monotone([r["loss"] for r in rows])
    assert search["candidates"] == [r["step"] for r in rows if r["fit"] + r["margin"] <= 10]
    assert search["top_step"] == max(search["candidates"]) == 2
    assert all((out / "prune" / f"step{i}" / "model.pt").is_file() for i in (1, 2, 3))
    table = decide.from_rows(budget["options"])
    assert {o.step for o in table} == {1, 2} and all(o.measured == (o.step == 2) for o in table)
    chosen = decide.choose(table, 10.0)
    assert (budget["chosen_step"], budget["chosen"]) == (chosen.step, chosen.bits)
    assert budget["confirmed"][0]["step"] == chosen.step and budget["confirmed"][-1]["within"]
    assert stages["encode"]["file_bytes"] == pytest.approx(chosen.bytes, rel=0.05)
    # what the report says of the pruned model is the shipped step's, not the searched one's
    assert stages["quantize"]["step"] == chosen.step
    assert stages["quantize"]["sparsity"] == pytest.approx(
        rows[chosen.step - 1]["sparsity"], abs=0.02)
    assert "model.dzip" in test.first
    report = " ".join((out / "report.md").read_text().split())
    assert "paid once" in report and f"step {chosen.step} at" in report


def test_keep_steps_searches_the_next_step_down_when_the_sparsest_is_over_at_the_cap(
        tmp_path, monkeypatch):
    """Where even the cap is over the budget on the sparsest candidate, nothing sparser
    can pass there and no other step can be predicted from that probe: the budget search
    moves to the next candidate down, and the run ships that step, shared within the
    budget, not the step its own probe said was over."""
    from deepzip import decide, stages
    from deepzip.prune import sparsity_of

    real = stages.search_budget

    def noisy_above_half(model, *args, margin, **kwargs):  # step 2 (60%) scores too noisy
        if sparsity_of(model) > 0.5:
            margin = lambda _: 100.0  # noqa: E731
        return real(model, *args, margin=margin, **kwargs)

    monkeypatch.setattr(stages, "search_budget", noisy_above_half)
    out, st, _, log = _keep_steps_run(tmp_path)
    assert st["prune"]["search"]["top_step"] == 2
    budget = st["quantize"]["budget"]
    on2 = [p for p in budget["probes"] if p["step"] == 2]
    assert len(on2) == 1 and on2[0]["target_bits"] == 6 and not on2[0]["within"]
    assert any(p["within"] for p in budget["probes"] if p["step"] == 1)
    assert budget["searched_step"] == 1 and budget["chosen_step"] == 1
    assert st["quantize"]["step"] == 1 and budget["confirmed"][-1]["within"]
    table = decide.from_rows(budget["options"])
    assert {o.step for o in table} == {1, 2}
    assert all(o.measured and not o.within(10.0) for o in table if o.step == 2)
    assert any("step 2 is over the budget at the cap" in line for line in log)
    report = " ".join((out / "report.md").read_text().split())
    assert "the budget was searched on step 1" in report


def test_max_loss_needs_validation_data(tmp_path):
    from torch import nn

    from deepzip.api import compress
    from deepzip.recipe import QuantizeStage, Recipe

    loader = [(torch.randn(4, 8), torch.zeros(4, dtype=torch.long))]
    recipe = Recipe(max_loss=1.0, quantize=QuantizeStage(entropy_weight=50))
    with pytest.raises(DeepzipError, match="validation"):
        compress(nn.Linear(8, 3), (loader, loader), recipe, out=tmp_path / "r")


def test_an_interrupted_budget_search_is_not_run_again(tmp_path, monkeypatch):
    from deepzip import stages
    from deepzip.api import compress
    from deepzip.recipe import PruneStage, QuantizeStage, Recipe

    out = tmp_path / "run"
    out.mkdir()
    model, task, _ = _tiny_classification(out)
    recipe = Recipe(name="budget", max_loss=5.0, prune=PruneStage(schedule="none"),
                    quantize=QuantizeStage(bits=6, entropy_weight=50, epochs=1))
    calls, real = [], stages.share

    def share(*a, **kw):
        calls.append(kw.get("out_dir"))
        if len(calls) == 8:  # 7 probes, then the full stage: interrupted
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(stages, "share", share)
    with pytest.raises(KeyboardInterrupt):
        compress(model, task, recipe, out=out, log=lambda _: None)
    assert (out / "quantize" / "budget.json").is_file()
    calls.clear()
    result = compress(model, task, recipe, out=out, log=lambda _: None)
    assert len(calls) == 1  # the full stage only: the search was kept
    assert result.report["stages"]["quantize"]["target_bits"] == json.loads(
        (out / "quantize" / "budget.json").read_text())["chosen"]


def test_max_loss_over_budget_at_the_cap_is_not_retried(tmp_path):
    """When even the bit cap loses more than max_loss (the pruning alone is over budget),
    the full stage runs once at the cap and then without sharing (float16 weights), which
    is what ships; over even so, the report shows it over."""
    from deepzip.api import compress
    from deepzip.recipe import PruneStage, PruneStep, QuantizeStage, Recipe

    out = tmp_path / "run"
    out.mkdir()
    model, task, _ = _tiny_classification(out)
    recipe = Recipe(name="cap", max_loss=0.0, prune=PruneStage(
        steps=[PruneStep("percentile", 0.97, 0)]), quantize=QuantizeStage(
        bits=6, entropy_weight=50, epochs=0, probe_epochs=0))
    budget = compress(model, task, recipe, out=out, log=lambda _: None).report[
        "stages"]["quantize"]["budget"]
    assert len(budget["probes"]) == 1 and not budget["probes"][0]["within"]
    assert [c["target_bits"] for c in budget["confirmed"]] == [6.0, None]
    assert budget["confirmed"][1]["raw_dtype"] == "float16"
    assert not budget["confirmed"][1]["within"]
    assert "**over**" in (out / "report.md").read_text()
