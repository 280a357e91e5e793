"""Gradual (AGP) unstructured pruning of ``digits-mlp`` (LeNet-300-100 shape) to 90% sparsity, over 5 seeds.

The ``agp`` recipe step fine-tunes through the one training loop while the sparsity rises on the cubic
schedule of Zhu & Gupta (2017); masks stay applied throughout. The settings (sparsity 0.9, 40 epochs,
lr 1e-3, global scope) are fixed in advance: nothing is chosen by looking at test data. For each seed
(0..4: its own data split and its own trained zoo model):
  * test accuracy before and after, the pruned model measured loaded back from its ``.slim`` file, with
    Wilson intervals and the paired delta (bootstrap over the shared test examples);
  * overall and per-layer sparsity of the Linear weights (the masks survive save/load);
  * bytes of the fp32 ``.slim`` and of the pruned ``.slim`` (sparse codec chosen automatically).
The headline accuracy drop is the mean over seeds with a Student-t 95% interval (target: <= 0.5 points).

Run: ``python benchmarks/prune_mlp.py [--seeds 5] [--epochs 40]``
Writes ``benchmarks/results/prune_mlp.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))
os.environ.setdefault("SLIMGUARD_QUIET", "1")
import slimguard as sg  # noqa: E402
from _schema import accuracy_row, claim, correct, environment, over_seeds, target, write_results  # noqa: E402
from slimguard.core.masks import sparsity  # noqa: E402
from slimguard.runtime.stats import paired_delta  # noqa: E402

THREADS = 2


def run_seed(seed: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    data = sg.data.load("digits", seed=seed)
    base = sg.zoo.load("digits-mlp", seed=seed, progress=False).eval()
    model = copy.deepcopy(base)
    cfg = sg.AGPConfig(sparsity=args.sparsity, scope="global", start=0.0, end=0.6, frequency=10,
                       finetune=sg.FinetuneConfig(epochs=args.epochs, lr=args.lr, patience=0, seed=seed))
    sg.prune_(model, cfg, data=data, progress=False)
    with tempfile.TemporaryDirectory() as d:
        base_path = sg.save(base, Path(d) / "base.slim")
        path = sg.save(model, Path(d) / "agp.slim")
        back = sg.load(path)
        sizes = {"baseline": base_path.stat().st_size, "pruned": path.stat().st_size}
    hits_base, hits_new = correct(base, data.test), correct(back, data.test)
    delta = paired_delta(hits_base, hits_new, seed=seed)
    per_layer = {n: round(float((m.weight == 0).float().mean()), 4) for n, m in back.named_modules()
                 if isinstance(m, nn.Linear)}
    return {"seed": seed, "config": cfg.to_dict()["_data"],
            "accuracy": [accuracy_row("baseline", hits_base), accuracy_row("pruned", hits_new)],
            "accuracy_drop_points": -delta["delta_points"], "paired_delta": delta,
            "sparsity": round(sparsity(back), 4), "sparsity_by_layer": per_layer,
            "file_bytes": sizes, "file_ratio": round(sizes["baseline"] / sizes["pruned"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    seeds = list(range(args.seeds))
    env = environment(THREADS, seed=seeds)
    cases = []
    for seed in seeds:
        cases.append(run_seed(seed, args))
        c = cases[-1]
        print(f"seed {seed}: accuracy {c['accuracy'][0]['accuracy']:.2f} -> {c['accuracy'][1]['accuracy']:.2f} "
              f"(drop {c['accuracy_drop_points']:.2f} points), sparsity {c['sparsity']:.4f}, "
              f"file {c['file_ratio']:.2f}x smaller")
    drop = over_seeds([c["accuracy_drop_points"] for c in cases])
    sparse = min(c["sparsity"] for c in cases)
    ratio = over_seeds([c["file_ratio"] for c in cases])
    n_test = cases[0]["accuracy"][0]["n"]
    targets = [target("sparsity of the Linear weights", ">= 0.9 on every seed", sparse, sparse >= 0.9 - 1e-4),
               target("accuracy drop, mean over seeds", "<= 0.5 points", drop, drop["mean"] <= 0.5)]
    summary = [claim("AGP to 90% sparsity: accuracy drop (points, mean of 5 seeds)", drop["mean"],
                     ci95=drop["ci95"], n=len(seeds)),
               claim("AGP 90%: test examples per seed", n_test, n=n_test),
               claim("AGP 90%: file smaller than fp32 .slim (x)", ratio["mean"], unit="x", ci95=ratio["ci95"],
                     n=len(seeds))]
    out = write_results("prune_mlp", env=env, cases=cases, targets=targets, summary=summary,
                        protocol="5 seeds (data split and zoo model per seed); settings fixed in advance; test "
                                 "touched once per seed; paired bootstrap deltas per seed, t-interval over seeds")
    print(f"accuracy drop {drop['mean']:.2f} points [{drop['ci95'][0]:.2f}, {drop['ci95'][1]:.2f}] over "
          f"{len(seeds)} seeds; file {ratio['mean']:.2f}x smaller; wrote {out}")


if __name__ == "__main__":
    main()
