"""Memory by design: the non-training stages on a 20M-parameter model stay within the
model's own fp32 size of extra memory (peak resident set beyond what was resident before
each stage, from the kernel's high-water mark). ``bench/scale.py`` measures the same on
VGG-16, GPT-2, ViT-B/16 and a 1.1B-parameter decoder."""

import gc
import os

import pytest
import torch
from torch import nn

from deepzip import dzip_torch
from deepzip.prune import PruneConfig, prune_
from deepzip.quantize import QuantizeConfig, quantize_

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                reason="needs Linux's resettable peak resident set")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _peak_beyond(fn) -> int:
    gc.collect()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return _status("VmHWM") - before


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2048, 4096)
        self.b = nn.Linear(4096, 2048)
        self.c = nn.Linear(2048, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_prune_share_save_and_load_stay_within_the_models_size(tmp_path):
    torch.manual_seed(0)
    model = Wide()
    size = 4 * sum(p.numel() for p in model.parameters())
    assert size > 80e6  # 20M parameters
    slack = 48 << 20  # the interpreter's own churn
    peaks = {
        "prune": _peak_beyond(lambda: prune_(model, PruneConfig("global", 0.9), bake=True)),
        "share": _peak_beyond(lambda: quantize_(model, QuantizeConfig(bits=4))),
        "save": _peak_beyond(lambda: dzip_torch.save(model, tmp_path / "w.dzip")),
    }
    model = None
    gc.collect()
    fresh = Wide()
    peaks["load"] = _peak_beyond(lambda: dzip_torch.load(tmp_path / "w.dzip", fresh))
    over = {k: f"{v / size:.2f}x" for k, v in peaks.items() if v > size + slack}
    assert not over, f"peak memory beyond the model ({size / 2**20:.0f} MiB): {over}"
    assert (tmp_path / "w.dzip").stat().st_size < size / 30
