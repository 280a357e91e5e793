"""Structured pruning that is really faster: ``digits32-resnet`` with 50% of channels removed.

Measures, with seed 0 and 2 torch threads:
  * test accuracy of the trained zoo model and of the pruned + fine-tuned one (target drop <= 1 point);
  * parameters, MACs per example and ``.slim`` bytes of both;
  * latency on PyTorch eager at batch 1 and batch 64: baseline and pruned model alternated in every
    round, warm-up first, each round timing a block of calls; the speed ratio is the median over rounds
    of the per-round ratio (target >= 1.8x at batch 64);
  * that the pruned model saved as ``.slim`` loads back with the same predictions.

``ChannelPruningConfig(ratio=0.5, round_to=8, importance="l1")`` removes half of every coupled channel group
(residual stages are pruned together), then the one training loop fine-tunes.

Run: ``python benchmarks/prune_resnet.py [--epochs 12] [--rounds 15]``
Writes ``benchmarks/results/prune_resnet.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))
os.environ.setdefault("SLIMGUARD_QUIET", "1")
import slimguard as sg  # noqa: E402
from slimguard.core.outputs import write_json_atomic  # noqa: E402
from slimguard.runtime.measure import count_macs, count_params  # noqa: E402
from slimguard.train.loop import accuracy  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "prune_resnet.json"
SEED = 0
THREADS = 2


@torch.no_grad()
def alternate(fns: dict[str, Callable[[], Any]], rounds: int = 15, inner: int = 5,
              warmup: int = 3) -> dict[str, Any]:
    """Time each function ``inner`` calls per round, alternating the functions within every round.

    Returns per-function median ms per call and, against the first function, the median per-round ratio.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    per: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            for _ in range(inner):
                fns[n]()
            per[n].append((time.perf_counter() - t0) * 1e3 / inner)
    base = names[0]
    out: dict[str, Any] = {"rounds": rounds, "calls_per_round": inner}
    for n in names:
        out[f"{n}_ms_median"] = statistics.median(per[n])
        if n != base:
            ratios = [b / c for b, c in zip(per[base], per[n], strict=True)]
            out[f"speedup_{n}"] = statistics.median(ratios)
            out[f"speedup_{n}_min_max"] = [min(ratios), max(ratios)]
    return out


def file_bytes(model: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as d:
        return sg.save(model, Path(d) / "m.slim").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    data = sg.data.load("digits32", seed=SEED)
    base = sg.zoo.load("digits32-resnet", seed=SEED, progress=False).eval()
    model = copy.deepcopy(base)
    cfg = sg.ChannelPruningConfig(ratio=args.ratio, round_to=8, importance="l1")
    t0 = time.perf_counter()
    pruned_info = sg.prune_(model, cfg, example_inputs=data.example)
    prune_s = time.perf_counter() - t0
    acc_pruned_no_ft = accuracy(model, data.test)
    sg.finetune(model, data, sg.FinetuneConfig(epochs=args.epochs, lr=args.lr, weight_decay=5e-4, patience=0,
                                                seed=SEED), progress=False)
    model.eval()
    with tempfile.TemporaryDirectory() as d:
        back = sg.load(sg.save(model, Path(d) / "p.slim"))
    same = bool(torch.equal(back(data.test.x[:256]).argmax(-1), model(data.test.x[:256]).argmax(-1)))
    acc_base, acc_pruned = accuracy(base, data.test), accuracy(back, data.test)

    latency: dict[str, Any] = {}
    for batch in (1, 64):
        x = data.test.x[:batch].contiguous()
        latency[f"batch_{batch}"] = alternate({"baseline": lambda x=x: base(x), "pruned": lambda x=x: back(x)},
                                              rounds=args.rounds, inner=20 if batch == 1 else 5)
    example = data.test.x[:1]
    result = {
        "model": "digits32-resnet", "data": "digits32", "seed": SEED, "threads": THREADS,
        "runtime": f"PyTorch {torch.__version__} eager, CPU",
        "config": cfg.to_dict()["_data"], "finetune_epochs": args.epochs,
        "channels": {g["modules"][0]: g["channels"] for g in pruned_info["groups"]},
        "params": {"baseline": count_params(base), "pruned": count_params(back)},
        "macs_per_example": {"baseline": count_macs(base, example), "pruned": count_macs(back, example)},
        "file_bytes": {"baseline": file_bytes(base), "pruned": file_bytes(back)},
        "accuracy": {"baseline": acc_base, "pruned_before_finetune": acc_pruned_no_ft, "pruned": acc_pruned},
        "accuracy_drop_points": (acc_base - acc_pruned) * 100,
        "latency": latency,
        "speedup_batch_1": latency["batch_1"]["speedup_pruned"],
        "speedup_batch_64": latency["batch_64"]["speedup_pruned"],
        "reloaded_predictions_identical": same,
        "prune_seconds": prune_s,
        "targets": {"speedup_batch_64": ">= 1.8", "accuracy_drop_points": "<= 1.0"},
    }
    result["macs_ratio"] = result["macs_per_example"]["baseline"] / result["macs_per_example"]["pruned"]
    write_json_atomic(OUT, result)
    rows = [("accuracy", acc_base, acc_pruned), ("params", *result["params"].values()),
            ("MACs/example", *result["macs_per_example"].values()), ("file bytes", *result["file_bytes"].values()),
            ("ms batch 1", latency["batch_1"]["baseline_ms_median"], latency["batch_1"]["pruned_ms_median"]),
            ("ms batch 64", latency["batch_64"]["baseline_ms_median"], latency["batch_64"]["pruned_ms_median"])]
    for name, a, b in rows:
        print(f"{name:14s} {a:>14.4f} {b:>14.4f}")
    print(f"speedup batch 1: {result['speedup_batch_1']:.2f}x  batch 64: {result['speedup_batch_64']:.2f}x  "
          f"MACs {result['macs_ratio']:.2f}x  accuracy drop {result['accuracy_drop_points']:.2f} points")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
