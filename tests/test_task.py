"""The task seam: any model and data set through training, evaluation and the pipeline."""

import json

import pytest
import torch
import torch.nn.functional as F
from regression_task import RegressionMLP, make_task
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deepzip
from deepzip import (
    DeepzipError,
    FunctionMetric,
    MeanSquaredError,
    Task,
    TrainConfig,
    evaluate,
    fit,
)
from deepzip.checkpoint import ModelSpec, save_checkpoint
from deepzip.cli import main
from deepzip.task import Accuracy, resolve_task

TINY = """
name: tiny
prune:
  schedule: agp
  agp: {final: 0.8, epochs: 3, start_epoch: 0, end_epoch: 2, frequency: 8,
        global_threshold: true}
  train: {lr: 0.02, precision: fp32, channels_last: false}
  distill: {alpha: 0.5, temperature: 2.0}
quantize:
  bits: 4
  epochs: 2
  train: {lr: 0.002, precision: fp32, channels_last: false}
  distill: {alpha: 0.5, temperature: 2.0}
encode: {codebook_dtype: float16}
"""


def trained_regression_model(task: Task) -> nn.Module:
    torch.manual_seed(0)
    model = RegressionMLP()
    fit(model, task.train, TrainConfig(epochs=15, lr=0.05, precision="fp32",
                                       channels_last=False, weight_decay=0),
        loss_fn=lambda out, y, _x: F.mse_loss(out, y), metric=MeanSquaredError())
    return model


def test_metrics_stream_and_declare_direction():
    out = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    acc = Accuracy()
    acc.reset()
    acc.update(out[:2], torch.tensor([0, 0]))
    acc.update(out[2:], torch.tensor([0]))
    assert acc.compute() == pytest.approx(2 / 3) and acc.higher_is_better
    mse = MeanSquaredError()
    mse.reset()
    mse.update(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]]))
    assert mse.compute() == pytest.approx(2.5) and not mse.higher_is_better
    mse.reset()
    with pytest.raises(DeepzipError, match="no examples"):
        mse.compute()


def test_regression_evaluates_with_its_own_metric_and_loss():
    task = make_task()
    model = trained_regression_model(task)
    loss, value = evaluate(model, task.eval, metric=task.metric, loss_fn=task.loss)
    assert value == pytest.approx(loss, rel=1e-5)  # one output: MSE loss == MSE metric
    assert value < 0.2  # learned, not the ~0.9 variance of the targets
    hist = fit(model, task.train, TrainConfig(epochs=1, lr=0.01, precision="fp32",
                                              channels_last=False),
               test_loader=task.eval, metric=task.metric, eval_loss=task.loss,
               loss_fn=lambda o, y, _x: task.loss(o, y))
    assert {"train_mse", "test_mse", "test_loss"} <= set(hist[0]) and "train_acc" not in hist[0]
    fm = FunctionMetric(lambda m, loader: -1.0, name="neg", higher_is_better=True)
    assert evaluate(model, task.eval, metric=fm).value == -1.0


def test_one_batch_check_names_the_broken_part():
    task = make_task()
    bad = Task.from_loaders(task.train, task.eval, metric=MeanSquaredError(),
                            loss=lambda out, y: out.sum(dim=5))
    with pytest.raises(DeepzipError, match="one batch through the loss"):
        bad.check(RegressionMLP(), bad.eval)
    with pytest.raises(DeepzipError, match="one batch of .* through the model"):
        task.check(RegressionMLP(inputs=3), task.eval)


def test_task_entry_points_are_checked(tmp_path):
    assert resolve_task("regression_task:make_task", subset=128).name == "synthetic-regression"
    for name, match in [("nosuchmodule_xyz:f", "cannot import"),
                        ("regression_task:nothing", "has no"),
                        ("regression_task:RegressionMLP", "not a deepzip.task.Task"),
                        ("imagenet", "unknown task")]:
        with pytest.raises(DeepzipError, match=match):
            resolve_task(name)


def test_whole_pipeline_through_task_entry_point(tmp_path, capsys):
    """`deepzip run --task module:function` on a model and data set that are neither CIFAR
    nor MNIST, with a lower-is-better metric."""
    task = make_task()
    model = trained_regression_model(task)
    ckpt = tmp_path / "mlp.pt"
    save_checkpoint(model, ModelSpec(arch="regression_task:RegressionMLP", num_classes=None,
                                     mean=(), std=()), ckpt)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    out = tmp_path / "run"
    rc = main(["run", str(recipe), "--model", str(ckpt), "--arch",
               "regression_task:RegressionMLP", "--task", "regression_task:make_task",
               "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert s["task"] == "synthetic-regression" and s["metric"] == "mse"
    assert s["higher_is_better"] is False and s["identical_outputs"] is True
    assert s["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert s["decoded_score"] == s["quantized_score"] < 0.5
    assert "same_predictions" not in report["stages"]["verify"]  # not a classifier
    md = (out / "report.md").read_text()
    assert "synthetic-regression" in md and "lower is better" in md and "CIFAR" not in md
    rc = main(["eval", str(out / "model.dzip"), "--arch", "regression_task:RegressionMLP",
               "--task", "regression_task:make_task", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["test_mse"] == pytest.approx(
        s["decoded_score"])


class Unregistered(nn.Module):
    """A classifier deepzip has never seen, defined by the user, not registered."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(2, 8, 3, padding=1), nn.BatchNorm1d(8),
                                      nn.ReLU(), nn.AdaptiveAvgPool1d(4), nn.Flatten())
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.features(x))


def test_compress_an_unregistered_model_from_python(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(768, 2, 16, generator=g)
    y = (x[:, 0].mean(1) > 0).long() + (x[:, 1].mean(1) > 0.2).long()
    train = DataLoader(TensorDataset(x[:512], y[:512]), batch_size=64, shuffle=True,
                       generator=g)
    test = DataLoader(TensorDataset(x[512:], y[512:]), batch_size=128)
    torch.manual_seed(0)
    model = Unregistered()
    fit(model, train, TrainConfig(epochs=8, lr=0.05, precision="fp32", channels_last=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    logs = []
    report = deepzip.compress(model, (train, test), str(recipe), out=tmp_path / "run",
                              log=logs.append)
    s = report["summary"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert s["identical_outputs"] and s["same_predictions"] == "256/256"
    assert s["baseline_score"] > 0.6 and s["decoded_score"] > s["baseline_score"] - 0.1  # 3 classes
    decoded = deepzip.dzip_torch.load(tmp_path / "run" / "model.dzip", Unregistered())
    assert report.path == tmp_path / "run" / "model.dzip"  # what compress made, handed back
    assert torch.equal(report.model(x[:64]), decoded(x[:64]))
    made = (tmp_path / "run" / "report.md").read_text()
    assert "deepzip.compress(" in made and (tmp_path / "run" / "recipe.yaml").is_file()
    result = deepzip.verify(decoded, tmp_path / "run" / "model.dzip", test)
    assert result["identical"] and result["max_abs_diff"] == 0.0
    again = deepzip.compress(model, (train, test), str(recipe), out=tmp_path / "run",
                             log=logs.append)  # resumes: every stage is done
    assert again["summary"]["decoded_score"] == s["decoded_score"]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "model.dzip")]) == 2
    err = capsys.readouterr().err
    assert "test_task:Unregistered" in err and "--arch" in err and err.count("\n") == 1
    assert main(["decode", str(tmp_path / "run" / "model.dzip"), "-o",
                 str(tmp_path / "back.pt")]) == 0  # a state_dict needs no architecture
    back = Unregistered()
    back.load_state_dict(torch.load(tmp_path / "back.pt", weights_only=True))  # plain
    assert torch.equal(back.eval()(x[:8]), decoded(x[:8]))


USER_MODULE = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import deepzip


class TinyCNN(nn.Module):  # one input channel, as a grey-image model has
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 1, 8, 8, generator=g)
    return TensorDataset(x, (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long())


def make_task(**_):
    return deepzip.Task.from_loaders(DataLoader(_data(0), batch_size=64),
                                     DataLoader(_data(1), batch_size=128), name="grey")
'''


def test_a_one_channel_model_of_the_users_own_through_the_cli(tmp_path, monkeypatch, capsys,
                                                             data_root):
    """The user's module next to them (found from the current folder), their task: the
    file records the task's normalization (none) and name, never CIFAR's 3 channels, and
    evaluates and decodes with no further flags; a missing --task is one line."""
    (tmp_path / "greynet.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("",)])
    torch.manual_seed(0)
    from deepzip.task import load_entry_point

    net = load_entry_point("greynet:TinyCNN", "--arch")  # found from the current folder
    torch.save({"state_dict": net().state_dict()}, tmp_path / "grey.pt")
    (tmp_path / "r.yaml").write_text(TINY)
    flags = ["--arch", "greynet:TinyCNN", "--task", "greynet:make_task"]
    assert main(["run", "r.yaml", "--model", "grey.pt", *flags, "-o", "run"]) == 0
    spec = deepzip.dzip.read_arrays("run/model.dzip")[1]
    assert spec["mean"] == [] and spec["std"] == [] and spec["task"] == "grey"
    assert spec["num_classes"] is None
    capsys.readouterr()
    assert main(["eval", "run/model.dzip", *flags, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_acc"] > 0
    assert main(["decode", "run/model.dzip", "-o", "back.pt"]) == 0
    assert main(["eval", "grey.pt", "--arch", "greynet:TinyCNN", "--subset", "100",
                 "--data-dir", str(data_root)]) == 2  # CIFAR-10 by default: 3 channels
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--task" in err and "1 channels" in err



def test_a_split_holds_out_disjoint_images_the_same_way_every_time():
    import torch

    from deepzip.data import ImageSplit

    n = 1000
    split = ImageSplit(torch.arange(n).view(n, 1, 1, 1).to(torch.uint8), torch.arange(n))
    (keep, out), (keep2, out2) = split.split(100), split.split(100)
    assert len(out) == 100 and len(keep) == 900
    assert torch.equal(out.labels, out2.labels) and torch.equal(keep.labels, keep2.labels)
    assert set(out.labels.tolist()).isdisjoint(keep.labels.tolist())
    assert sorted(out.labels.tolist() + keep.labels.tolist()) == list(range(n))
    assert not torch.equal(split.split(100, seed=1)[1].labels, out.labels)


def test_image_tasks_can_hold_validation_images_out_of_the_test_set(data_root):
    """validation_from="test" (for a model that saw every training image): N test images
    by a fixed seed decide, the task reports on the rest, training keeps every image."""
    import torch

    from deepzip.data import held_out_indices, load_mnist
    from deepzip.task import image_task

    task = image_task("mnist", data_root, validation=4000, validation_from="test")
    assert task.val_size == 4000 and task.eval_size == 6000
    assert "test images held out" in task.val_description
    assert "validation does not hold out" in task.description
    assert sum(len(y) for _, y in task.train_loader(1000, 0)) == 60_000
    full = load_mnist(data_root, train=False)
    report, decide = held_out_indices(len(full), 4000)
    val = torch.cat([y for _, y in task.val_loader()])
    test = torch.cat([y for _, y in task.eval_loader()])
    assert torch.equal(val, full.labels[decide]) and torch.equal(test, full.labels[report])
    with pytest.raises(DeepzipError, match="validation_from"):
        image_task("mnist", data_root, validation=10, validation_from="val")


def test_image_tasks_hold_out_validation_images_from_training_only(data_root):
    """validation=N takes N training images out, by a fixed seed (every run and recipe
    seed gets the same split); training sees the rest; the test set is as before."""
    import torch

    from deepzip.task import image_task

    a = image_task("mnist", data_root, validation=5000)
    b = image_task("mnist", data_root, validation=5000)
    plain = image_task("mnist", data_root)
    assert a.val_size == 5000 and plain.val is None and plain.val_loader() is None
    va, vb = next(iter(a.val_loader())), next(iter(b.val_loader()))
    assert torch.equal(va[0], vb[0]) and torch.equal(va[1], vb[1])
    assert sum(len(y) for _, y in a.train_loader(1000, 0)) == 55_000
    assert a.eval_size == plain.eval_size == 10_000


def test_a_task_of_dataloaders_holds_validation_out_of_either_loader():
    """Task.holding_out: the held-out examples and the rest are disjoint and together the
    loader's dataset, drawn by the shipped tasks' fixed seed; loaders over no sized
    dataset, or a task that has validation data, are refused in one line."""
    from torch.utils.data import DataLoader, TensorDataset

    from deepzip.data import held_out_indices

    x = torch.arange(100, dtype=torch.float32).view(-1, 1)
    train = DataLoader(TensorDataset(x, x.long().view(-1)), batch_size=16, shuffle=True)
    test = DataLoader(TensorDataset(x + 1000, x.long().view(-1)), batch_size=16)
    task = Task.from_loaders(train, test)
    values = lambda loader: sorted(int(v) for b, _ in loader for v in b.view(-1))  # noqa: E731
    held = task.holding_out(30, "test")
    assert held.val_size == 30 and held.eval_size == 70 and held.train is train
    assert values(held.val) == [1000 + i for i in held_out_indices(100, 30)[1].tolist()]
    assert sorted(values(held.val) + values(held.eval)) == values(test)
    assert "30 of the user's test examples" in held.val_description
    from_train = task.holding_out(20, "train")
    assert from_train.eval is test and len(values(from_train.train)) == 80
    order = lambda loader: [int(v) for b, _ in loader for v in b.view(-1)]  # noqa: E731
    assert order(from_train.val) == order(from_train.val)  # one order: paired margins
    assert sorted(values(from_train.val) + values(from_train.train)) == values(train)
    with pytest.raises(DeepzipError, match="holds validation data already"):
        held.holding_out(10)
    with pytest.raises(DeepzipError, match="no batching DataLoader over a sized dataset"):
        Task.from_loaders([(x, x)], [(x, x)]).holding_out(10)
    half = task.holding_out(5000)  # the default recipe's count on a small data set
    assert half.val_size == 50 and half.eval_size == 50
    assert "half of them: 5,000 were asked for" in half.val_description
