"""The README's own Python example runs as printed, on a small data set of a user's: the
names it leaves to the reader (MyNet, the loaders, mynet.pt) are made here, the code is
the README's."""

import re
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deepzip

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (found,) = [b for b in blocks if containing in b]
    return found


class MyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_the_compress_example_runs_as_printed(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8000, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # a task a small MLP gets ~99% right
    train_loader = DataLoader(TensorDataset(x[:4000], y[:4000]), batch_size=128, shuffle=True,
                              generator=g)
    test_loader = DataLoader(TensorDataset(x[4000:], y[4000:]), batch_size=500)
    torch.manual_seed(0)
    trained = MyNet()
    deepzip.fit(trained, train_loader, deepzip.TrainConfig(epochs=15, lr=0.1, precision="fp32",
                                                           eval_every=0))
    monkeypatch.chdir(tmp_path)
    from deepzip import models

    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # it registers MyNet
    torch.save(trained.state_dict(), "mynet.pt")
    code = _block("deepzip.compress(model, (train_loader, test_loader)")
    scope = {"MyNet": MyNet, "train_loader": train_loader, "test_loader": test_loader}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    summary = scope["result"].report["summary"]
    assert summary["validation_examples"] == 2000  # half of the 4,000: 5,000 were asked
    assert summary["baseline_score"] - summary["decoded_score"] <= 0.01
    assert summary["real_ratio"] > 5
    assert 0.97 < scope["acc"] <= 1.0  # the example's last evaluation, of the loaded file
    assert (tmp_path / "runs" / "mynet" / "model.dzip").is_file()


def test_every_python_block_of_the_readme_is_run_here():
    """Each of the README's Python blocks is one of those the tests below and above run:
    a new block must get its test."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    tested = ["def make_task():", "deepzip.compress(model, (train_loader, test_loader)",
              "deepzip.prune_(model, deepzip.PruneConfig("]
    assert len(blocks) == len(tested)
    assert all(sum(key in b for b in blocks) == 1 for key in tested)


def test_the_task_example_makes_a_task(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x[:, :2].sum(1, keepdim=True)
    scope = {"train_loader": DataLoader(TensorDataset(x[:192], y[:192]), batch_size=64),
             "test_loader": DataLoader(TensorDataset(x[192:], y[192:]), batch_size=64)}
    exec(compile(_block("def make_task():"), str(README), "exec"), scope)  # noqa: S102
    task = scope["make_task"]()
    assert isinstance(task, deepzip.Task) and task.name == "my-sensor"
    assert not task.metric.higher_is_better
    model = nn.Linear(8, 1)
    task.check(model, scope["test_loader"])  # model, loss and metric fit together


def test_the_python_api_example_runs_as_printed(tmp_path, monkeypatch):
    """The API walk-through, on 256 synthetic CIFAR-sized images instead of CIFAR-10 (the
    block names the data folder; the test hands it a small split of the same form)."""
    from deepzip import data

    g = torch.Generator().manual_seed(0)
    split = data.ImageSplit(torch.randint(0, 256, (256, 3, 32, 32), generator=g,
                                          dtype=torch.uint8),
                            torch.randint(0, 10, (256,), generator=g))
    monkeypatch.setattr(data, "load_cifar10", lambda root=None, train=True: split)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_block("deepzip.prune_(model, deepzip.PruneConfig("), str(README), "exec"),
         scope)  # noqa: S102 - our own README
    assert (tmp_path / "resnet20.dzip").is_file()
    assert deepzip.info("resnet20.dzip").real_ratio > 3
    # the file stores float16 values and folded BatchNorm: close to the model, not equal
    result = deepzip.verify(scope["model"], scope["small"], scope["test"])
    assert result["max_abs_diff"] < 0.1 and result["same_predictions"] >= 0.95 * 256
