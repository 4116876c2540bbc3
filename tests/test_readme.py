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
