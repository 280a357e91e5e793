"""OOD detection on digits: AUROC and FPR at 95% TPR of every built-in detector, far- and near-OOD.

For ``digits-lenet5`` and ``digits32-resnet`` (both on ``digits32``; ``--models`` can add ``digits-mlp``
on ``digits``): each detector is fitted on the train split, its threshold calibrated on the validation
split (95% TPR), and the in-distribution *test* split is scored against the test split of
``digits32-ood`` (far-OOD: grey patches of scikit-learn's sample photos and noise) and
``digits32-ood-near`` (near-OOD: occluded, noisy, inverted and blended digits). AUROC and FPR95 are
computed by ``slimguard.guard.ood`` (rank statistic; checked against scikit-learn in the tests).
Target: AUROC >= 0.98 on far-OOD for the best detector. Anchor: OpenOOD v1.5, CIFAR-10 ResNet-18.

Seeded (seed 0), 1 thread. Writes ``benchmarks/results/ood_digits.json``.

Run: ``python benchmarks/ood_digits.py [--models digits-lenet5 digits32-resnet]``
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SLIMGUARD_QUIET", "1")
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))

from slimguard import data as sgdata  # noqa: E402
from slimguard.core.outputs import write_json_atomic  # noqa: E402
from slimguard.guard.ood import auroc, detector_names, fpr_at_tpr, make_detector  # noqa: E402
from slimguard.models import zoo  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "ood_digits.json"
SEED = 0
TPR = 0.95
TARGET_AUROC = 0.98


def run_model(name: str) -> dict[str, Any]:
    model = zoo.load(name, seed=SEED, progress=False)
    dname = zoo.ZOO.get(name).data
    data = sgdata.load(dname, seed=SEED)
    oods = {"far": sgdata.load(f"{dname}-ood", seed=SEED).test,
            "near": sgdata.load(f"{dname}-ood-near", seed=SEED).test}
    with torch.no_grad():
        acc = float((model(data.test.x).argmax(-1) == data.test.y).float().mean())
    rows: dict[str, Any] = {}
    for det_name in detector_names():
        t0 = time.perf_counter()
        det = make_detector(det_name, model).fit(data.train).calibrate(data.val, TPR)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        s_id = det.score(data.test)
        row: dict[str, Any] = {"threshold": det.threshold}
        for kind, split in oods.items():
            s_ood = det.score(split)
            row[kind] = {"auroc": auroc(s_id, s_ood), "fpr95": fpr_at_tpr(s_id, s_ood, TPR),
                         "ood_flagged_at_val_threshold": float((s_ood > det.threshold).double().mean())}
        row["id_test_flagged_at_val_threshold"] = float((s_id > det.threshold).double().mean())
        n_scored = len(data.test) + sum(len(s) for s in oods.values())
        row["fit_calibrate_s"] = fit_s
        row["score_ms_per_example"] = (time.perf_counter() - t0) * 1e3 / n_scored
        rows[det_name] = row
    best_far = max(rows, key=lambda k: rows[k]["far"]["auroc"])
    best_near = max(rows, key=lambda k: rows[k]["near"]["auroc"])
    return {"data": dname, "test_accuracy": acc, "n_test": len(data.test), "n_far": len(oods["far"]),
            "n_near": len(oods["near"]), "detectors": rows,
            "best_far": {"detector": best_far, "auroc": rows[best_far]["far"]["auroc"],
                         "target": TARGET_AUROC, "met": rows[best_far]["far"]["auroc"] >= TARGET_AUROC},
            "best_near": {"detector": best_near, "auroc": rows[best_near]["near"]["auroc"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits-lenet5", "digits32-resnet"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    results = {"seed": SEED, "tpr": TPR, "threads": 1, "torch": torch.__version__,
               "machine": platform.machine(), "models": {}}
    for name in args.models:
        results["models"][name] = run_model(name)
    write_json_atomic(OUT, results)
    for name, r in results["models"].items():
        print(f"\n{name} on {r['data']} (test acc {r['test_accuracy']:.4f}; {r['n_test']} ID, "
              f"{r['n_far']} far, {r['n_near']} near)")
        print(f"  {'detector':12s} {'far AUROC':>10s} {'far FPR95':>10s} {'near AUROC':>11s} {'near FPR95':>11s}")
        for det, row in r["detectors"].items():
            print(f"  {det:12s} {row['far']['auroc']:10.4f} {row['far']['fpr95']:10.4f} "
                  f"{row['near']['auroc']:11.4f} {row['near']['fpr95']:11.4f}")
        b = r["best_far"]
        print(f"  best far-OOD: {b['detector']} AUROC {b['auroc']:.4f} (target >= {TARGET_AUROC}: "
              f"{'met' if b['met'] else 'MISSED'})")
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
