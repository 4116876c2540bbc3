"""The public API on architectures other than ResNet-20, with no registration needed."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deepzip import TrainConfig, evaluate, fit
from deepzip.dzip_torch import load, round_to_file_precision_, save
from deepzip.models import get
from deepzip.prune import PruneConfig, bake_, finetune_after_prune, prune_, sparsity_of
from deepzip.qat import train_centroids
from deepzip.quantize import QuantizeConfig, distinct_nonzero, quantize_


class VGGSmall(nn.Module):
    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for w in [32, "M", 64, "M", 128, 128, "M"]:
            if w == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                           nn.ReLU(inplace=True)]
                c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU(),
                                        nn.Linear(256, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class LeNet300100(nn.Module):
    def __init__(self, inputs=64):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 300), nn.ReLU(),
                                 nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))

    def forward(self, x):
        return self.net(x)


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 4 * 4, 120), nn.Linear(120, 84), \
            nn.Linear(84, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class DepthwiseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False),  # depthwise
            nn.BatchNorm2d(32), nn.ReLU6(),
            nn.Conv2d(32, 64, 1, bias=False),  # pointwise
            nn.Conv2d(64, 64, 3, padding=1, groups=4),  # grouped
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.body(x)


CASES = [
    (lambda: get("resnet32"), (3, 32, 32)),
    (lambda: get("resnet56"), (3, 32, 32)),
    (VGGSmall, (3, 32, 32)),
    (LeNet300100, (1, 8, 8)),
    (LeNet5, (1, 28, 28)),
    (DepthwiseNet, (3, 32, 32)),
]


@pytest.mark.parametrize("make,shape", CASES, ids=["resnet32", "resnet56", "vgg", "lenet300100",
                                                   "lenet5", "depthwise"])
def test_prune_quantize_save_load_same_outputs(tmp_path, make, shape):
    torch.manual_seed(0)
    model = make().eval()
    for m in model.modules():  # BatchNorm statistics that matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2)
    prune_(model, PruneConfig("global", 0.7))
    quantize_(model, QuantizeConfig(bits=4, bits_linear=5))
    round_to_file_precision_(model)  # fp16 biases/BatchNorm, as the file stores them
    x = torch.randn(3, *shape)
    ref = model(x)
    report = save(model, tmp_path / "m.dzip")
    back = load(tmp_path / "m.dzip", make())  # only the class is needed
    assert torch.equal(back(x), ref)
    assert all(n <= 32 for n in distinct_nonzero(back).values())
    assert sparsity_of(back) == pytest.approx(0.7, abs=1e-3)
    params = sum(p.numel() for p in make().parameters())
    assert report["file_bytes"] < params * 4 / 5


def test_lenet_300_100_on_digits_keeps_accuracy(tmp_path):
    """Real data: scikit-learn's bundled 8x8 digits, compressed end to end."""
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1400], perm[1400:]
    train = DataLoader(TensorDataset(x[tr], y[tr]), batch_size=50, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(x[te], y[te]), batch_size=200)
    torch.manual_seed(0)
    model = LeNet300100()
    fit(model, train, TrainConfig(epochs=15, lr=0.05, precision="fp32"))
    base = evaluate(model, test)[1]
    assert base > 0.93
    prune_(model, PruneConfig("global", 0.9))
    finetune_after_prune(model, train, TrainConfig(epochs=5, lr=0.02, precision="fp32"))
    bake_(model)
    quantize_(model, QuantizeConfig(bits=4))
    train_centroids(model, train, TrainConfig(epochs=3, lr=0.005, weight_decay=0,
                                              precision="fp32"))
    round_to_file_precision_(model)
    acc = evaluate(model, test)[1]
    report = save(model, tmp_path / "lenet.dzip")
    back = load(tmp_path / "lenet.dzip", LeNet300100())
    assert evaluate(back, test)[1] == acc
    assert acc > base - 0.03
    fp32_bytes = sum(p.numel() for p in LeNet300100().parameters()) * 4
    assert fp32_bytes / report["file_bytes"] > 20
