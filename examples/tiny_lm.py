"""A tiny language model and its data: deepzip's sequence-task example, no download.

``TinyLM`` is an Embedding + LSTM model whose output layer is tied to its token embedding
(as GPT-2's is) and returns logits ``(batch, time, vocab)``; ``make_task`` returns a
:class:`deepzip.Task` of synthetic text: sequences from a fixed random Markov chain over
32 tokens in which each token has three successors (70/20/10%, 10% noise), so a model can
learn it, with
the targets of some sequences' tails padded (``IGNORE_INDEX``). Accuracy is per token.

    python -c "import tiny_lm; tiny_lm.train('lm.pt')"    # a baseline, in seconds
    deepzip run my-recipe.yaml --model lm.pt --arch tiny_lm:TinyLM --task tiny_lm:make_task

(run from this folder: entry points are found from the current folder, as ``python -m``
finds modules).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import deepzip
from deepzip.task import IGNORE_INDEX

VOCAB = 32
LENGTH = 24


class TinyLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, d: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT-2's output layer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(tokens))
        return self.head(h)


def sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-token targets) of ``n`` sequences; a quarter have padded tails."""
    chain = torch.Generator().manual_seed(1234)  # the same language for every split
    successors = torch.randint(VOCAB, (VOCAB, 3), generator=chain)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.empty(n, LENGTH + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(VOCAB, (n,), generator=g)
    for t in range(LENGTH):
        pick = torch.multinomial(torch.tensor([0.7, 0.2, 0.1]).expand(n, 3), 1,
                                 generator=g).squeeze(1)
        noise = torch.rand(n, generator=g) < 0.1
        nxt = successors[tokens[:, t], pick]
        tokens[:, t + 1] = torch.where(noise, torch.randint(VOCAB, (n,), generator=g), nxt)
    x, y = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    padded = torch.arange(n) % 4 == 0
    y[padded, LENGTH // 2:] = IGNORE_INDEX
    return x, y


def make_task(**_: object) -> deepzip.Task:
    train = TensorDataset(*sequences(2048, seed=0))
    test = TensorDataset(*sequences(512, seed=1))
    return deepzip.Task.from_loaders(
        DataLoader(train, batch_size=64, shuffle=True,
                   generator=torch.Generator().manual_seed(0)),
        DataLoader(test, batch_size=256), name="tiny-lm",
        description="tiny-lm: 512 synthetic sequences, per-token accuracy")


def train(path: str, epochs: int = 4) -> nn.Module:
    """A baseline to compress, saved as a plain checkpoint."""
    torch.manual_seed(0)
    model = TinyLM()
    task = make_task()
    deepzip.fit(model, task.train, deepzip.TrainConfig(epochs=epochs, lr=0.05,
                                                       weight_decay=0.0, precision="fp32"))
    torch.save({"state_dict": model.state_dict()}, path)
    return model
