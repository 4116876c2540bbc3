"""Sequence tasks are first-class: token ids stay integers, (batch, time, vocab) logits
are scored per token with padding left out, perplexity ships, and a language model with
its output layer tied to its embedding goes through deepzip.compress and deepzip run
with the embedding pruned and shared (examples/tiny_lm.py, synthetic data)."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import deepzip
from deepzip.cli import main
from deepzip.task import IGNORE_INDEX, Accuracy, Perplexity, class_scores, classification_loss

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import tiny_lm  # noqa: E402


def _per_token(model, loader):
    """Per-token accuracy computed the plain way, for comparison."""
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            pred = model(x).argmax(-1)
            live = y != IGNORE_INDEX
            right += int(((pred == y) & live).sum())
            total += int(live.sum())
    return right / total


def test_class_scores_read_every_layout():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11)  # (batch, time, vocab)
    y = torch.randint(11, (4, 7))
    y[0, 3:] = IGNORE_INDEX
    ref = F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1))
    assert torch.allclose(classification_loss(logits, y), ref)
    assert torch.allclose(classification_loss(logits.transpose(1, 2), y), ref)  # (N, C, T)
    flat = torch.randn(5, 3)
    t = torch.randint(3, (5,))
    assert torch.equal(classification_loss(flat, t), F.cross_entropy(flat, t))
    acc = Accuracy()
    acc.reset()
    acc.update(logits, y)
    live = y != IGNORE_INDEX
    assert acc.compute() == pytest.approx(
        float(((logits.argmax(-1) == y) & live).sum()) / int(live.sum()))
    ppl = Perplexity()
    ppl.reset()
    ppl.update(logits, y)
    assert ppl.compute() == pytest.approx(math.exp(float(ref)), rel=1e-5)
    o, tt = class_scores(logits, y)
    assert o.shape == (28, 11) and tt.shape == (28,)


def test_a_tied_language_model_through_compress(tmp_path):
    model = tiny_lm.train(str(tmp_path / "lm.pt"), epochs=4)
    task = tiny_lm.make_task()
    truth = _per_token(model, task.eval)
    assert 0.4 < truth < 0.8
    loss, value = deepzip.evaluate(model, task.eval)
    assert value == pytest.approx(truth)  # the default metric is per token
    assert deepzip.evaluate(model, task.eval, metric=Perplexity()).value == pytest.approx(
        math.exp(loss), rel=0.02)
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(LM_RECIPE)
    result = deepzip.compress(model, task, str(recipe), out=tmp_path / "run", log=print)
    s = result["summary"]
    assert s["task"] == "tiny-lm" and s["baseline_score"] == pytest.approx(truth)
    assert s["decoded_score"] == pytest.approx(_per_token(result.model, task.eval))
    assert truth - 0.1 < s["decoded_score"] <= 1.0
    assert result.model.head.weight is result.model.embed.weight  # re-tied
    rows = {r.name: r for r in deepzip.dzip_torch.info(result.path, tiny_lm.TinyLM()).tensors}
    assert rows["head.weight"].encoding == "alias of embed.weight"
    assert rows["embed.weight"].encoding in ("sparse", "dense")  # pruned and shared
    assert rows["embed.weight"].nonzero < 0.7 * rows["embed.weight"].params


def test_a_language_model_through_the_cli_from_its_folder(tmp_path, monkeypatch, capsys):
    tiny_lm.train(str(tmp_path / "lm.pt"), epochs=2)
    (tmp_path / "lm.yaml").write_text(LM_RECIPE)
    monkeypatch.chdir(EXAMPLES)  # entry points are found from the current folder
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(EXAMPLES))])
    sys.modules.pop("tiny_lm", None)
    argv = ["run", str(tmp_path / "lm.yaml"), "--model", str(tmp_path / "lm.pt"),
            "--arch", "tiny_lm:TinyLM", "--task", "tiny_lm:make_task", "-o",
            str(tmp_path / "run")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # the summary line gives the per-token accuracy in percent, baseline and decoded
    assert re.search(r"^tiny-lm: \d{1,3}\.\d\d% -> \d{1,3}\.\d\d% \(decoded \.dzip\)", out,
                     re.MULTILINE)
    s = json.loads((tmp_path / "run" / "report.json").read_text())["summary"]
    assert 0.3 < s["baseline_score"] < 0.9 and s["task"] == "tiny-lm"
    assert main(["eval", str(tmp_path / "run" / "model.dzip"), "--arch", "tiny_lm:TinyLM",
                 "--task", "tiny_lm:make_task", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["test_acc"] == pytest.approx(s["decoded_score"])


LM_RECIPE = """
name: tiny-lm
description: the tiny language model, pruned to 50% and shared at 4 bits
prune:
  schedule: iterative
  steps: [{method: percentile, amount: 0.5, epochs: 1}]
  train: {lr: 0.01, batch_size: 64, precision: fp32, channels_last: false}
quantize:
  bits: 4
  epochs: 1
  train: {lr: 0.002, batch_size: 64, precision: fp32, channels_last: false}
encode: {raw_dtype: float32, codebook_dtype: float32}
"""


def test_the_stdlib_language_model_and_its_corpus(tmp_path):
    """examples/stdlib_lm.py: files split by a hash of their path (tests left out), byte
    windows, a GPT whose output layer is its embedding and whose attention and MLP are
    Linear layers that SparseGPT reconstructs; it trains with AdamW."""
    import stdlib_lm

    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text("never read\n" * 100)
    parts = {s: stdlib_lm.corpus(s, tmp_path) for s in stdlib_lm.SPLITS}
    assert sum(len(p) for p in parts.values()) == sum(
        len((tmp_path / f"m{i}.py").read_bytes()) for i in range(40)) + sum(
        p.count(b"\n\ndef") for p in parts.values())  # the joins, and no test file
    assert all(parts.values()) and b"never read" not in b"".join(parts.values())
    x, y = stdlib_lm.windows(parts["train"])[0]
    assert x.shape == (stdlib_lm.CONTEXT,) and torch.equal(x[1:], y[:-1])
    torch.manual_seed(0)
    model = stdlib_lm.StdlibGPT(d=32, layers=1, heads=2, context=16)
    assert model.head.weight is model.embed.weight
    tokens = torch.randint(256, (8, 16))
    assert model(tokens).shape == (8, 16, 256)
    sparsity = deepzip.prune_(model, deepzip.PruneConfig("sparsegpt", 0.5, exclude=["embed"]),
                              calibration=[(tokens, None)], bake=True)
    assert sorted(sparsity) == ["blocks.0.fc", "blocks.0.out", "blocks.0.proj", "blocks.0.qkv"]
    assert all(v == pytest.approx(0.5) for v in sparsity.values())
    history = deepzip.fit(model, [(tokens, torch.roll(tokens, -1, 1))], deepzip.TrainConfig(
        epochs=2, lr=1e-3, optimizer="adamw", weight_decay=0.1, precision="fp32",
        eval_every=0))
    assert history[1]["train_loss"] < history[0]["train_loss"]
    with pytest.raises(deepzip.DeepzipError, match="optimizer"):
        deepzip.TrainConfig(optimizer="lion")
