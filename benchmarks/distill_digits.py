"""Distillation on digits32: a student with >= 4x fewer parameters than ``digits32-resnet`` (LeNet-5 at
0.3 width: conv6-conv15-fc150), trained by distillation from the ResNet vs. on labels alone (same
architecture, initialisation, epochs and optimizer).

Selection on validation only: the distillation settings (temperature, alpha) are chosen from a small grid by
**validation** accuracy on seed 0; then, for each of 5 seeds (its own data split, its own trained teacher),
both students are trained and scored once on test. Reported: each model's test accuracy with a Wilson
interval, the distilled-minus-labels gain per seed (paired on the same test examples, bootstrap interval),
and the mean gain over seeds with a Student-t 95% interval.
Targets: distilled student within 0.5 points of the teacher (mean over seeds) and better than labels-only
(the lower end of the interval of the mean gain above 0).

Run: ``.venv/bin/python benchmarks/distill_digits.py [--seeds 5]`` (writes ``benchmarks/results/distill_digits.json``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))
os.environ.setdefault("SLIMGUARD_QUIET", "1")

import torch  # noqa: E402

import slimguard as sg  # noqa: E402
from _schema import accuracy_row, claim, correct, environment, over_seeds, target, write_results  # noqa: E402
from slimguard.runtime.measure import count_params  # noqa: E402
from slimguard.runtime.stats import paired_delta  # noqa: E402
from slimguard.train.loop import FinetuneConfig, finetune  # noqa: E402

STUDENT, STUDENT_KWARGS = "digits-lenet5", {"width": 0.3}
EPOCHS, LR, WD, BATCH = 40, 3e-3, 0.0, 64
GRID = {"temperature": (2.0, 4.0), "alpha": (0.5, 0.9)}


def train_student(method: str, teacher: Any, data: Any, seed: int, kd: dict[str, float]) -> Any:
    student = sg.zoo.create(STUDENT, seed=seed, **STUDENT_KWARGS)
    ft = FinetuneConfig(epochs=EPOCHS, lr=LR, weight_decay=WD, batch_size=BATCH, seed=seed, patience=0)
    if method == "labels":
        finetune(student, data, ft, progress=False)
    else:
        sg.distill(teacher, student, data, sg.DistillConfig(finetune=ft, **kd), progress=False)
    return student.eval()


def _pct(model: Any, split: Any) -> float:
    hits = correct(model, split)
    return 100 * sum(hits) / len(hits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)  # no timing here; one thread wastes nothing on a shared machine
    t0 = time.time()
    seeds = list(range(args.seeds))
    env = environment(1, seed=seeds)
    data0 = sg.data.load("digits32", seed=0)
    teacher0 = sg.zoo.load("digits32-resnet", seed=0, progress=False).eval()
    selection, trained = [], {}
    for temperature, alpha in itertools.product(GRID["temperature"], GRID["alpha"]):
        kd = {"temperature": temperature, "alpha": alpha}
        student = trained[(temperature, alpha)] = train_student("distilled", teacher0, data0, 0, kd)
        selection.append({**kd, "val_accuracy": round(_pct(student, data0.val), 3)})
        print(f"selection T={temperature} alpha={alpha}: val {selection[-1]['val_accuracy']:.2f}", file=sys.stderr)
    best = max(selection, key=lambda r: r["val_accuracy"])  # first listed wins ties
    kd = {"temperature": best["temperature"], "alpha": best["alpha"]}
    cases = []
    for seed in seeds:
        data = sg.data.load("digits32", seed=seed)
        teacher = sg.zoo.load("digits32-resnet", seed=seed, progress=False).eval()
        hits = {"teacher": correct(teacher, data.test)}
        for method in ("labels", "distilled"):
            reuse = method == "distilled" and seed == 0  # the selection already trained this very student
            student = trained[(kd["temperature"], kd["alpha"])] if reuse else train_student(method, teacher, data,
                                                                                            seed, kd)
            hits[method] = correct(student, data.test)
        gain = paired_delta(hits["labels"], hits["distilled"], seed=seed)
        gap = paired_delta(hits["distilled"], hits["teacher"], seed=seed)
        cases.append({"seed": seed, "test": [accuracy_row(k, v) for k, v in hits.items()],
                      "gain_over_labels_points": gain["delta_points"], "gain_paired": gain,
                      "gap_to_teacher_points": gap["delta_points"], "gap_paired": gap})
        print(f"seed {seed}: " + ", ".join(f"{r['model']} {r['accuracy']:.2f}" for r in cases[-1]["test"]),
              file=sys.stderr)
    teacher_params = count_params(teacher0)
    student_params = count_params(sg.zoo.create(STUDENT, **STUDENT_KWARGS))
    gain = over_seeds([c["gain_over_labels_points"] for c in cases])
    gap = over_seeds([c["gap_to_teacher_points"] for c in cases])
    acc = {m: over_seeds([next(r["accuracy"] for r in c["test"] if r["model"] == m) for c in cases])
           for m in ("teacher", "labels", "distilled")}
    reduction = teacher_params / student_params
    targets = [target("student parameters", ">= 4x fewer than the teacher", round(reduction, 2), reduction >= 4),
               target("distilled student's gap to the teacher, mean over seeds", "<= 0.5 points", gap,
                      gap["mean"] <= 0.5),
               target("distilled better than labels-only", "lower end of the 95% interval of the mean gain > 0",
                      gain, gain["ci95"][0] > 0)]
    summary = [claim(f"distilled student ({reduction:.1f}x fewer parameters): test accuracy (mean of 5 seeds)",
                     acc["distilled"]["mean"], unit="%", ci95=acc["distilled"]["ci95"], n=len(seeds)),
               claim("distilled minus labels-only student (points, mean of 5 seeds)", gain["mean"],
                     ci95=gain["ci95"], n=len(seeds)),
               claim("teacher minus distilled student (points, mean of 5 seeds)", gap["mean"], ci95=gap["ci95"],
                     n=len(seeds))]
    out = write_results("distill_digits", env=env, cases=cases, targets=targets, summary=summary,
                        selection={"on": "validation, seed 0", "grid": selection, "chosen": kd},
                        models={"teacher": {"model": "digits32-resnet", "params": teacher_params},
                                "student": {"model": STUDENT, **STUDENT_KWARGS, "params": student_params}},
                        training={"epochs": EPOCHS, "lr": LR, "weight_decay": WD, "batch_size": BATCH},
                        accuracy_over_seeds=acc, wall_seconds=round(time.time() - t0, 1),
                        protocol="settings chosen on validation (seed 0); 5 seeds, test touched once per seed; "
                                 "paired bootstrap per seed, t-interval over seeds")
    for m, r in acc.items():
        print(f"{m:10s} {r['mean']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]")
    print(f"gain over labels {gain['mean']:+.2f} [{gain['ci95'][0]:+.2f}, {gain['ci95'][1]:+.2f}]; gap to teacher "
          f"{gap['mean']:+.2f}; wrote {out}")


if __name__ == "__main__":
    main()
