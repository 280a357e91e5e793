"""Gradual (AGP) unstructured pruning of ``digits-mlp`` (LeNet-300-100 shape) to 90% sparsity or more.

The ``agp`` recipe step fine-tunes through the one training loop while the sparsity rises on the cubic
schedule of Zhu & Gupta (2017); masks stay applied throughout. Measures, with seed 0:
  * test accuracy before and after (target: drop <= 0.5 points), measured on the model loaded back
    from its ``.slim`` file;
  * overall and per-layer sparsity of the Linear weights (the masks survive save/load);
  * bytes of the fp32 ``.slim`` and of the pruned ``.slim`` (sparse codec chosen automatically).

Run: ``python benchmarks/prune_mlp.py [--sparsity 0.9] [--epochs 40]``
Writes ``benchmarks/results/prune_mlp.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))
os.environ.setdefault("SLIMGUARD_QUIET", "1")
import slimguard as sg  # noqa: E402
from slimguard.core.masks import iter_masks, sparsity  # noqa: E402
from slimguard.core.outputs import write_json_atomic  # noqa: E402
from slimguard.train.loop import accuracy  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "prune_mlp.json"
SEED = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--scope", default="global")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    data = sg.data.load("digits", seed=SEED)
    base = sg.zoo.load("digits-mlp", seed=SEED, progress=False).eval()
    model = copy.deepcopy(base)
    cfg = sg.AGPConfig(sparsity=args.sparsity, scope=args.scope, start=0.0, end=0.6, frequency=10,
                            finetune=sg.FinetuneConfig(epochs=args.epochs, lr=args.lr, patience=0, seed=SEED))
    info = sg.prune_(model, cfg, data=data, progress=False)
    with tempfile.TemporaryDirectory() as d:
        base_path = sg.save(base, Path(d) / "base.slim")
        path = sg.save(model, Path(d) / "agp.slim")
        back = sg.load(path)
        sizes = {"baseline": base_path.stat().st_size, "pruned": path.stat().st_size}
    acc_base, acc_pruned = accuracy(base, data.test), accuracy(back, data.test)
    per_layer = {n: float((m.weight == 0).float().mean()) for n, m in back.named_modules() if isinstance(m, nn.Linear)}
    result = {
        "model": "digits-mlp", "data": "digits", "seed": SEED,
        "config": cfg.to_dict()["_data"],
        "accuracy": {"baseline": acc_base, "pruned": acc_pruned},
        "accuracy_drop_points": (acc_base - acc_pruned) * 100,
        "sparsity": sparsity(back), "sparsity_by_layer": per_layer,
        "masks_after_load": sorted(n for n, *_ in iter_masks(back)),
        "file_bytes": sizes, "file_ratio": sizes["baseline"] / sizes["pruned"],
        "schedule_tail": info["schedule"][-5:],
        "targets": {"sparsity": ">= 0.9", "accuracy_drop_points": "<= 0.5"},
    }
    write_json_atomic(OUT, result)
    print(f"accuracy {acc_base:.4f} -> {acc_pruned:.4f} (drop {result['accuracy_drop_points']:.2f} points)")
    print(f"sparsity {result['sparsity']:.4f}  by layer {', '.join(f'{k}: {v:.3f}' for k, v in per_layer.items())}")
    print(f"file bytes {sizes['baseline']:,} -> {sizes['pruned']:,} ({result['file_ratio']:.1f}x)")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
