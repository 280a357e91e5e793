"""Structured pruning that is really faster: ``digits32-resnet`` with 50% of channels removed, over 5 seeds.

``ChannelPruningConfig(ratio=0.5, round_to=8, importance="l1")`` removes half of every coupled channel group
(residual stages are pruned together), then the one training loop fine-tunes (12 epochs, lr 1e-3, fixed in
advance: nothing is chosen on test data). For each seed (0..4: its own split and trained zoo model):
  * test accuracy of the zoo model and of the pruned + fine-tuned model loaded back from ``.slim``, with
    Wilson intervals and the paired delta on the shared test examples;
  * parameters, MACs per example and ``.slim`` bytes;
  * that the reloaded model predicts exactly what the in-memory one does.
Speed (seed 0's models): ``slimguard.runtime.measure.compare_speed`` at batch 1 and 64, paired interleaved
rounds, 2 pinned threads, median ratio with a 95% bootstrap interval (target >= 1.8x at batch 64).

Run: ``python benchmarks/prune_resnet.py [--seeds 5] [--epochs 12] [--rounds 30]``
Writes ``benchmarks/results/prune_resnet.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))
os.environ.setdefault("SLIMGUARD_QUIET", "1")
import slimguard as sg  # noqa: E402
from _schema import accuracy_row, claim, correct, environment, over_seeds, target, write_results  # noqa: E402
from slimguard.runtime.measure import compare_speed, count_macs, count_params  # noqa: E402
from slimguard.runtime.stats import paired_delta  # noqa: E402

THREADS = 2


def file_bytes(model: torch.nn.Module) -> int:
    with tempfile.TemporaryDirectory() as d:
        return sg.save(model, Path(d) / "m.slim").stat().st_size


def run_seed(seed: int, args: argparse.Namespace) -> tuple[dict[str, Any], Any, Any, Any]:
    torch.manual_seed(seed)
    data = sg.data.load("digits32", seed=seed)
    base = sg.zoo.load("digits32-resnet", seed=seed, progress=False).eval()
    model = copy.deepcopy(base)
    cfg = sg.ChannelPruningConfig(ratio=args.ratio, round_to=8, importance="l1")
    sg.prune_(model, cfg, example_inputs=data.example)
    sg.finetune(model, data, sg.FinetuneConfig(epochs=args.epochs, lr=args.lr, weight_decay=5e-4, patience=0,
                                                seed=seed), progress=False)
    model.eval()
    with tempfile.TemporaryDirectory() as d:
        back = sg.load(sg.save(model, Path(d) / "p.slim"))
    with torch.no_grad():
        same = bool(torch.equal(back(data.test.x).argmax(-1), model(data.test.x).argmax(-1)))
    hits_base, hits_new = correct(base, data.test), correct(back, data.test)
    delta = paired_delta(hits_base, hits_new, seed=seed)
    example = data.test.x[:1]
    case = {"seed": seed, "config": cfg.to_dict()["_data"], "finetune_epochs": args.epochs,
            "accuracy": [accuracy_row("baseline", hits_base), accuracy_row("pruned", hits_new)],
            "accuracy_drop_points": -delta["delta_points"], "paired_delta": delta,
            "params": {"baseline": count_params(base), "pruned": count_params(back)},
            "macs_per_example": {"baseline": count_macs(base, example), "pruned": count_macs(back, example)},
            "file_bytes": {"baseline": file_bytes(base), "pruned": file_bytes(back)},
            "reloaded_predictions_identical": same}
    case["macs_ratio"] = round(case["macs_per_example"]["baseline"] / case["macs_per_example"]["pruned"], 3)
    return case, base, back, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    seeds = list(range(args.seeds))
    env = environment(THREADS, seed=seeds)
    cases, speed = [], {}
    for seed in seeds:
        case, base, back, data = run_seed(seed, args)
        cases.append(case)
        print(f"seed {seed}: accuracy {case['accuracy'][0]['accuracy']:.2f} -> {case['accuracy'][1]['accuracy']:.2f}"
              f" (drop {case['accuracy_drop_points']:.2f}), MACs {case['macs_ratio']:.2f}x fewer")
        if seed == seeds[0]:
            for batch in (1, 64):
                x = data.test.x[:batch].contiguous()
                cmp = compare_speed({"baseline": base, "pruned": back}, x, baseline="baseline", threads=THREADS,
                                    rounds=args.rounds, calls_per_round=20 if batch == 1 else 4, seed=seed)
                speed[f"batch_{batch}"] = cmp.to_dict()
                print(f"  batch {batch}: {cmp.verdict}")
    drop = over_seeds([c["accuracy_drop_points"] for c in cases])
    s64, s1 = speed["batch_64"], speed["batch_1"]
    macs = cases[0]["macs_ratio"]
    targets = [target("speed at batch 64 (2 threads, PyTorch eager)", ">= 1.8x (lower end of the 95% interval)",
                      {"ratio": round(s64["ratio"], 3), "ci95": [round(v, 3) for v in s64["ci95"]]},
                      s64["ci95"][0] >= 1.8),
               target("accuracy drop, mean over seeds", "<= 1.0 point", drop, drop["mean"] <= 1.0),
               target("reloaded predictions identical", "every seed", all(c["reloaded_predictions_identical"]
                                                                          for c in cases),
                      all(c["reloaded_predictions_identical"] for c in cases))]
    summary = [claim("50% channels: accuracy drop (points, mean of 5 seeds)", drop["mean"], ci95=drop["ci95"],
                     n=len(seeds)),
               claim("50% channels: fewer MACs (x)", macs, unit="x"),
               claim("50% channels: faster at batch 64 (x)", s64["ratio"], unit="x", ci95=s64["ci95"],
                     n=s64["rounds"]),
               claim("50% channels: faster at batch 1 (x)", s1["ratio"], unit="x", ci95=s1["ci95"], n=s1["rounds"])]
    out = write_results("prune_resnet", env=env, cases=cases, targets=targets, summary=summary, speed=speed,
                        protocol="5 seeds for accuracy (settings fixed in advance, test touched once per seed); "
                                 "speed by paired interleaved rounds (compare_speed), 2 pinned threads")
    print(f"accuracy drop {drop['mean']:.2f} [{drop['ci95'][0]:.2f}, {drop['ci95'][1]:.2f}] points; "
          f"batch 64 {s64['verdict']}; wrote {out}")


if __name__ == "__main__":
    main()
