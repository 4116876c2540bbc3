"""Lab 3: k-means weight sharing of ResNet-20 at 3-6 bits and with five initializations,
each with and without centroid training; from the shipped baseline and from a pruned model.

    python examples/assignment/lab3_quantize.py --data-dir ../shared/data \\
        [--pruned runs/seed/prune/model.pt] [--epochs 2]

Writes examples/assignment/results/lab3/{README.md, lab3.json, weights_*.png}; each
configuration's result is kept in its runs/ folder so an interrupted run resumes.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from common import cached, command_line, parser, write_json, write_text

from deepzip.checkpoint import load_checkpoint
from deepzip.codecs import nonzero_huffman_bits
from deepzip.data import BatchLoader, load_cifar10
from deepzip.loading import pretrained
from deepzip.prune import prunable, sparsity_of
from deepzip.qat import CENTROID_TRAINING, train_centroids
from deepzip.quantize import INITS, QuantizeConfig, codebooks, dequantize_, quantize_
from deepzip.render import markdown_table, plot_weight_sharing
from deepzip.train import evaluate

SEED_BITS = {3: 0.8639, 4: 0.9036, 5: 0.9121, 6: 0.912}  # student, linear init
SEED_INIT = {"linear": 0.9133, "kmeans++": 0.9135, "random": 0.9121}  # student, bits unstated


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--pruned", default=None, help="also run from this pruned checkpoint")
    p.add_argument("--epochs", type=int, default=2, help="centroid training epochs")
    p.add_argument("--init-bits", default="3,5", help="bit widths of the init comparison")
    args = p.parse_args()
    out = Path(args.out) / "lab3"
    cfg = dataclasses.replace(CENTROID_TRAINING, epochs=args.epochs)
    init_bits = [int(b) for b in args.init_bits.split(",")]
    starts = {"baseline": pretrained("resnet20")}
    if args.pruned:
        starts["pruned"] = load_checkpoint(args.pruned)
    split = load_cifar10(args.data_dir, train=True)
    test_split = load_cifar10(args.data_dir, train=False)
    tables = {}
    for start, (model0, spec) in starts.items():
        test = BatchLoader(test_split, 500, mean=spec.mean, std=spec.std)
        base_acc = evaluate(model0, test)[1]

        def one(bits: int, init: str, model0=model0, spec=spec, test=test, start=start):
            model = copy.deepcopy(model0)
            layers = quantize_(model, QuantizeConfig(bits=bits, init=init))
            acc = evaluate(model, test)[1]
            w = {n: cb.codebook.detach().clone() for n, cb in codebooks(model).items()}
            train = BatchLoader(split, cfg.batch_size, train=True, mean=spec.mean,
                                std=spec.std, seed=cfg.seed, channels_last=cfg.channels_last)
            train_centroids(model, train, cfg, desc=f"{start} {bits}b {init}")
            trained = evaluate(model, test)[1]
            moved = max(float((cb.codebook.detach() - w[n]).abs().max())
                        for n, cb in codebooks(model).items())
            dequantize_(model)
            weights = [t.weight.detach() for t in prunable(model)]
            hbits = sum(nonzero_huffman_bits(w.flatten().numpy()) for w in weights)
            nz = sum(int((w != 0).sum()) for w in weights)
            return {"start": start, "bits": bits, "init": init, "acc_kmeans": acc,
                    "acc_trained": trained, "kmeans_error": sum(v["error"]
                                                                for v in layers.values()),
                    "huffman_avg": hbits / nz, "max_centroid_shift": moved}

        def run(bits: int, init: str, start=start, one=one):
            return cached(out / "runs" / f"{start}-{bits}b-{init}.json",
                          lambda: one(bits, init))

        bit_rows = [{**run(b, "linear"), "seed_acc": SEED_BITS[b] if start == "baseline"
                     else "-"} for b in (3, 4, 5, 6)]
        init_rows = [{**run(b, i), "seed_acc": SEED_INIT.get(i, "-") if start == "baseline"
                      and b == 5 else "-"} for b in init_bits for i in INITS]
        tables[start] = {"base_acc": base_acc, "sparsity": sparsity_of(model0),
                         "bits": bit_rows, "inits": init_rows}
        for bits in (3, 5):  # the assignment's plot: first conv and last linear layer
            model = copy.deepcopy(model0)
            before = {n: m.weight.detach().clone() for n, m in model.named_modules()
                      if n in ("conv1", "linear")}
            quantize_(model, QuantizeConfig(bits=bits))
            books = codebooks(model)
            mods = dict(model.named_modules())
            plot_weight_sharing([(n, before[n], mods[n].weight, books[n].codebook)
                                 for n in ("conv1", "linear")],
                                out / f"weights_{start}_{bits}bit.png",
                                title=f"{start} ResNet-20, {bits}-bit linear-init k-means")
    write_json(out / "lab3.json", {"command": command_line(), "epochs": args.epochs,
                                   "tables": tables})
    write_text(out / "README.md", render(tables, cfg, command_line()))
    print(f"wrote {out}")


def render(tables, cfg, command: str) -> str:
    cols = ["bits", "acc_kmeans", "acc_trained", "seed_acc", "kmeans_error", "huffman_avg"]
    icols = ["bits", "init", "acc_kmeans", "acc_trained", "seed_acc", "kmeans_error"]
    parts = [f"""# Lab 3: k-means weight sharing and trained centroids

Made by `{command}`. Every Conv and Linear layer is clustered separately over its nonzero
weights (zeros stay zero and are no cluster); `acc_kmeans` right after clustering,
`acc_trained` after {cfg.epochs} epochs of centroid training (each centroid's gradient is
the sum of its weights' gradients; indices and masks fixed; lr {cfg.lr}, {cfg.schedule},
no weight decay; BatchNorm and biases train too). `kmeans_error`: within-cluster squared
error summed over layers. `huffman_avg`: average Huffman code length of the nonzero
weights' cluster indices. Accuracy on the full CIFAR-10 test set, fp32. `seed_acc`: the
assignment's student answers (their own 91.4% baseline; their init table does not state a
bit width and is shown beside 5 bits).
"""]
    for start, t in tables.items():
        head = (f"## From the {start} model (test accuracy {t['base_acc']:.4f}, "
                f"weight sparsity {t['sparsity']:.3f})")
        parts.append(f"""{head}

### By bit width (linear initialization)

{markdown_table(t['bits'], cols)}

### By initialization

{markdown_table(t['inits'], icols)}

![weights at 3 bits](weights_{start}_3bit.png)
![weights at 5 bits](weights_{start}_5bit.png)
""")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
