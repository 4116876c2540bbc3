"""Two CPU processes with gloo train exactly what one process does (DDP + sharding)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from deepzip import TrainConfig, fit
from deepzip.data import BatchLoader
from deepzip.prune import PruneConfig, prune_

CFG = dict(epochs=2, lr=0.05, batch_size=32, precision="fp32", channels_last=False)


def small_cnn() -> nn.Module:
    """No BatchNorm: per-rank batch statistics would differ from one process' by design."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


def train(split, ranks=1, out=None):
    """Rank and world size come from the process group, if there is one."""
    model = small_cnn()
    prune_(model, PruneConfig("global", 0.5))
    loader = BatchLoader(split, CFG["batch_size"] // ranks, train=True, seed=3)
    fit(model, loader, TrainConfig(**{k: v for k, v in CFG.items() if k != "batch_size"}),
        out_dir=out, resume=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, world, split, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    state = train(split, world, out=os.path.join(tmp, "run"))
    torch.save(state, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path, cifar_train):
    split = cifar_train.subset(640)
    single = train(split)
    mp.spawn(_worker, args=(2, split, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for k, v in single.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # replicas stay identical
        if k.endswith("weight.0.mask"):
            assert torch.equal(ranks[0][k], v), k  # same masks as one process
        else:
            assert torch.allclose(ranks[0][k], v, atol=1e-5, rtol=1e-4), k
    assert (tmp_path / "run" / "checkpoint.pt").is_file()  # written once, by rank 0
    assert not any(p.name.startswith(".") for p in (tmp_path / "run").iterdir())


def test_loader_shards_are_disjoint_and_cover_the_global_batch(cifar_test):
    split = cifar_test.subset(256)
    one = [y for _, y in BatchLoader(split, 64, train=True, seed=1)]
    parts = [[y for _, y in BatchLoader(split, 32, train=True, seed=1, rank=r, world_size=2)]
             for r in range(2)]
    assert len(parts[0]) == len(one) == 4
    for i, y in enumerate(one):
        assert torch.equal(torch.cat([parts[0][i], parts[1][i]]), y)
    with pytest.raises(Exception, match="rank"):
        BatchLoader(split, 32, train=True, rank=2, world_size=2)
