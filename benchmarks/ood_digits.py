"""OOD detection on digits: AUROC and FPR at 95% TPR of every built-in detector, far- and near-OOD.

For ``digits-lenet5`` and ``digits32-resnet`` (both on ``digits32``; ``--models`` can add ``digits-mlp``
on ``digits``): each detector is fitted on the train split, its threshold calibrated on the validation
split (95% TPR), and the in-distribution *test* split is scored against the test split of
``digits32-ood`` (far-OOD: grey patches of scikit-learn's sample photos and noise) and
``digits32-ood-near`` (near-OOD: occluded, noisy, inverted and blended digits). AUROC and FPR95 are
computed by ``slimguard.guard.ood`` (rank statistic; checked against scikit-learn in the tests).
Target: AUROC >= 0.98 on far-OOD for the best detector. Anchor: OpenOOD v1.5, CIFAR-10 ResNet-18.

The headline detector is **chosen on validation** (AUROC of ID val against the OOD sets' val splits), then
scored once on test, with a bootstrap interval per seed and the mean over 5 seeds (each its own split and
trained model) with a Student-t interval. Every detector's test numbers are kept in the cases.
1 thread. Writes ``benchmarks/results/ood_digits.json``.

Run: ``python benchmarks/ood_digits.py [--models digits-lenet5 digits32-resnet]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("SLIMGUARD_QUIET", "1")
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))

from _schema import claim, environment, over_seeds, target, write_results  # noqa: E402
from slimguard import data as sgdata  # noqa: E402
from slimguard.guard.ood import auroc, detector_names, fpr_at_tpr, make_detector  # noqa: E402
from slimguard.models import zoo  # noqa: E402

TPR = 0.95
TARGET_AUROC = 0.98


def auroc_ci(s_id: torch.Tensor, s_ood: torch.Tensor, seed: int, resamples: int = 500) -> list[float]:
    """95% percentile-bootstrap interval of the AUROC (both sets resampled)."""
    g = torch.Generator().manual_seed(seed)
    stats = []
    for _ in range(resamples):
        i = torch.randint(len(s_id), (len(s_id),), generator=g)
        j = torch.randint(len(s_ood), (len(s_ood),), generator=g)
        stats.append(auroc(s_id[i], s_ood[j]))
    stats.sort()
    return [round(stats[int(0.025 * resamples)], 4), round(stats[int(0.975 * resamples) - 1], 4)]


def run_model(name: str, seed: int) -> dict[str, Any]:
    model = zoo.load(name, seed=seed, progress=False)
    dname = zoo.ZOO.get(name).data
    data = sgdata.load(dname, seed=seed)
    oods = {kind: sgdata.load(f"{dname}-ood{suffix}", seed=seed) for kind, suffix in (("far", ""),
                                                                                       ("near", "-near"))}
    rows: dict[str, Any] = {}
    for det_name in detector_names():
        t0 = time.perf_counter()
        det = make_detector(det_name, model).fit(data.train).calibrate(data.val, TPR)
        fit_s = time.perf_counter() - t0
        v_id, t_id = det.score(data.val), det.score(data.test)
        row: dict[str, Any] = {"threshold": det.threshold, "fit_calibrate_s": round(fit_s, 3)}
        for kind, bundle in oods.items():
            v_ood, t_ood = det.score(bundle.val), det.score(bundle.test)
            row[kind] = {"val_auroc": auroc(v_id, v_ood), "test_auroc": auroc(t_id, t_ood),
                         "test_fpr95": fpr_at_tpr(t_id, t_ood, TPR),
                         "test_ood_flagged_at_val_threshold": float((t_ood > det.threshold).double().mean()),
                         "_scores": (t_id, t_ood)}
        row["id_test_flagged_at_val_threshold"] = float((t_id > det.threshold).double().mean())
        rows[det_name] = row
    chosen = {}
    for kind in oods:
        best = max(rows, key=lambda k: rows[k][kind]["val_auroc"])  # chosen on validation only
        t_id, t_ood = rows[best][kind]["_scores"]
        chosen[kind] = {"detector": best, "val_auroc": rows[best][kind]["val_auroc"],
                        "test_auroc": rows[best][kind]["test_auroc"], "test_auroc_ci95": auroc_ci(t_id, t_ood, seed),
                        "n_id": len(t_id), "n_ood": len(t_ood)}
    for row in rows.values():
        for kind in oods:
            del row[kind]["_scores"]
    return {"model": name, "seed": seed, "data": dname, "n_test": len(data.test), "detectors": rows,
            "chosen_on_val": chosen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits-lenet5", "digits32-resnet"])
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    env = environment(1, seed=seeds, tpr=TPR)
    cases, targets, summary = [], [], []
    for name in args.models:
        runs = [run_model(name, seed) for seed in seeds]
        cases += runs
        for kind in ("far", "near"):
            auc = over_seeds([r["chosen_on_val"][kind]["test_auroc"] for r in runs], digits=4)
            picks = sorted({r["chosen_on_val"][kind]["detector"] for r in runs})
            n_ood = runs[0]["chosen_on_val"][kind]["n_ood"]
            summary.append(claim(f"{name}, {kind}-OOD: test AUROC of the detector chosen on val "
                                 f"({'/'.join(picks)}, mean of {len(seeds)} seeds)", auc["mean"], ci95=auc["ci95"],
                                 n=len(seeds), digits=4))
            if kind == "far":
                targets.append(target(f"{name}: far-OOD AUROC, detector chosen on val", f">= {TARGET_AUROC}",
                                      auc, auc["mean"] >= TARGET_AUROC))
            print(f"{name} {kind}: {'/'.join(picks)} AUROC {auc['mean']:.4f} [{auc['ci95'][0]:.4f}, "
                  f"{auc['ci95'][1]:.4f}] over {len(seeds)} seeds ({runs[0]['n_test']} ID, {n_ood} OOD test each)")
    out = write_results("ood_digits", env=env, cases=cases, targets=targets, summary=summary,
                        protocol="detectors fitted on train, thresholds at 95% TPR on ID validation, the detector "
                                 "chosen by validation AUROC (ID val vs OOD val); test scored once; 5 seeds")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
