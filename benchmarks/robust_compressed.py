"""Robustness before and after compression, on digits32-resnet.

Five models, each scored by the robustness scorecard (clean accuracy, FGSM / PGD / APGD over an eps
grid, corruptions at five severities):

1. ``original``: the zoo model.
2. ``pruned``: channel pruning (50% of channels, structural) + clean fine-tuning.
3. ``int8``: static int8 PTQ (attacked through its fake-quant twin, examples transferred; both reported).
4. ``adv-trained``: the original adversarially trained (PGD-AT) at the middle eps: the reference.
5. ``robust-compressed``: ``adv-trained`` -> the same channel pruning -> adversarial fine-tuning
   (robustness-aware compression).

Target: ``robust-compressed`` keeps >= 90% of the PGD accuracy of ``adv-trained`` at the middle eps. That
headline is measured on **every test example of two seeds** (2 x 360 = 720 attacked examples; each seed its
own split, zoo model, adversarial training and compression), as PGD-10 L-inf accuracy with Wilson intervals
and the kept fraction with a paired bootstrap interval (examples resampled with both models' results). The
full scorecards (FGSM / PGD / APGD over the eps grid, corruptions) run on a seeded subset of seed 0's test
split (``--examples``), for information.

Usage:
    .venv/bin/python benchmarks/robust_compressed.py [--examples 100] [--headline-seeds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))
os.environ.setdefault("SLIMGUARD_QUIET", "1")

import slimguard as sg  # noqa: E402
from _schema import accuracy_row, claim, environment, target, write_results  # noqa: E402
from slimguard.artifact import file_size  # noqa: E402
from slimguard.models import zoo  # noqa: E402
from slimguard.robust import AdversarialFinetuneConfig, adversarial_finetune, scorecard  # noqa: E402
from slimguard.robust.scorecard import Scorecard  # noqa: E402
from slimguard.runtime.measure import count_params  # noqa: E402
from slimguard.train.loop import FinetuneConfig, finetune  # noqa: E402

EPS = (0.01, 0.03, 0.05)  # fractions of the [0, 1] pixel range; digits32-resnet falls to ~1% at 0.03
MIDDLE = EPS[1]


def _prune(model: torch.nn.Module, data: Any) -> dict[str, Any]:
    """50% channel pruning when the structured pruner is there, else 70% global magnitude pruning."""
    try:
        from slimguard.prune.structured import ChannelPruningConfig

        cfg: Any = ChannelPruningConfig(ratio=0.5)
    except ImportError:  # the structured pruner is a separate subsystem
        cfg = sg.MagnitudePruningConfig(sparsity=0.7)
    sg.prune_(model, cfg, example_inputs=data.example, data=data)
    return cfg.to_dict()


def _quantize(model: torch.nn.Module, data: Any) -> dict[str, Any]:
    """Static int8 (conv + linear) when available, else dynamic int8 (linear layers only)."""
    try:
        from slimguard.quantize.static import Int8StaticConfig

        cfg: Any = Int8StaticConfig(calibration="percentile")
    except ImportError:
        cfg = sg.Int8DynamicConfig()
    sg.quantize_(model, cfg, calib=data.calib, data=data)
    return cfg.to_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=100, help="test examples attacked (seeded subset)")
    ap.add_argument("--corruption-examples", type=int, default=200, help="test examples corrupted")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--adv-epochs", type=int, default=4, help="epochs of adversarial training")
    ap.add_argument("--adv-ft-epochs", type=int, default=3, help="epochs of adversarial fine-tuning after pruning")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--headline-seeds", type=int, default=2, help="seeds whose whole test split is attacked")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)

    data = sg.data.load("digits32", seed=args.seed)
    t0 = time.perf_counter()
    original = zoo.load("digits32-resnet", seed=args.seed, progress=False)
    lap("load original", t0)

    t0 = time.perf_counter()
    pruned = copy.deepcopy(original)
    prune_cfg = _prune(pruned, data)
    finetune(pruned, data, FinetuneConfig(epochs=3, lr=1e-3, seed=args.seed, patience=0), progress=False)
    lap("prune + fine-tune", t0)

    t0 = time.perf_counter()
    int8 = copy.deepcopy(original)
    quant_cfg = _quantize(int8, data)
    lap("quantize", t0)

    adv_cfg = AdversarialFinetuneConfig(method="pgd-at", eps=MIDDLE, steps=3, select="robust", val_examples=128,
                                  finetune=FinetuneConfig(epochs=args.adv_epochs, lr=1e-3, seed=args.seed,
                                                          patience=0))
    t0 = time.perf_counter()
    adv = copy.deepcopy(original)
    adversarial_finetune(adv, data, adv_cfg, progress=False)
    lap("adversarial training", t0)

    t0 = time.perf_counter()
    robust = copy.deepcopy(adv)
    _prune(robust, data)
    ft_cfg = dataclass_replace(adv_cfg, epochs=args.adv_ft_epochs)
    adversarial_finetune(robust, data, ft_cfg, progress=False)
    lap("robustness-aware compression (prune + adversarial fine-tune)", t0)

    models = {"original": original, "pruned": pruned, "int8": int8, "adv-trained": adv,
              "robust-compressed": robust}
    results: dict[str, dict[str, Any]] = {}
    settings: dict[str, Any] = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        card = scorecard(model, data, eps=EPS, attack_examples=args.examples,
                         corruption_examples=args.corruption_examples, pgd_steps=10, apgd_steps=10,
                         seed=args.seed, progress=False)
        results[name] = card.models["model"]
        results[name]["params"] = count_params(model)
        results[name]["file_bytes"] = file_size(model)
        settings = card.settings
        lap(f"scorecard {name}", t0)

    headline = {args.seed: pgd_hits({"adv-trained": adv, "robust-compressed": robust}, data, args.seed)}
    for seed in range(args.seed + 1, args.seed + args.headline_seeds):
        t0 = time.perf_counter()
        data_s = sg.data.load("digits32", seed=seed)
        adv_s = copy.deepcopy(zoo.load("digits32-resnet", seed=seed, progress=False))
        adversarial_finetune(adv_s, data_s, dataclass_replace(adv_cfg, seed=seed), progress=False)
        robust_s = copy.deepcopy(adv_s)
        _prune(robust_s, data_s)
        adversarial_finetune(robust_s, data_s, dataclass_replace(ft_cfg, seed=seed), progress=False)
        headline[seed] = pgd_hits({"adv-trained": adv_s, "robust-compressed": robust_s}, data_s, seed)
        lap(f"headline seed {seed}", t0)
    ref_hits = [h for seed in headline for h in headline[seed]["adv-trained"]]
    got_hits = [h for seed in headline for h in headline[seed]["robust-compressed"]]
    kept, kept_ci = kept_fraction(ref_hits, got_hits)
    n = len(ref_hits)
    label = f"pgd-linf eps={MIDDLE:g}"
    apgd = f"apgd-ce+dlr-linf eps={MIDDLE:g}"
    rows = [accuracy_row(f"{k}, PGD-10 eps={MIDDLE:g}", [h for seed in headline for h in headline[seed][k]])
            for k in ("adv-trained", "robust-compressed")]
    scorecard_summary = {
        "examples": args.examples,
        "pgd_accuracy_at_middle_eps": {k: v["attacks"][label]["accuracy"] for k, v in results.items()},
        "apgd_accuracy_at_middle_eps": {k: v["attacks"][apgd]["accuracy"] for k, v in results.items()},
        "clean_accuracy": {k: v["clean_accuracy"] for k, v in results.items()},
        "int8_twin_pgd_accuracy_at_middle_eps": results["int8"]["attacks"][label].get("twin_accuracy"),
    }
    settings.update({
        "model": "zoo:digits32-resnet", "data": "digits32", "threads": args.threads, "seed": args.seed,
        "prune": prune_cfg, "quantize": quant_cfg, "adversarial_training": adv_cfg.to_dict(),
        "robust_compression_finetune": ft_cfg.to_dict(),
        "note": f"headline: PGD-10 (L-inf) at eps={MIDDLE:g} on all test examples of seeds "
                f"{sorted(headline)} ({n} attacked); scorecards on a seeded subset of {args.examples} of seed "
                f"{args.seed}'s {len(data.test)} test examples, corruptions on {args.corruption_examples}; "
                f"adv-trained: {args.adv_epochs} epochs of PGD-AT from the original; robust-compressed: that "
                f"model, pruned, then {args.adv_ft_epochs} epochs of PGD-AT fine-tuning",
    })
    timings["total"] = round(time.perf_counter() - t_start, 1)
    env = environment(args.threads, seed=sorted(headline))
    targets = [target("robust-compressed keeps the adversarially trained model's PGD accuracy",
                      ">= 0.90 (point estimate; interval reported)", {"kept": round(kept, 4), "ci95": kept_ci, "n": n},
                      kept >= 0.90)]
    summary = [claim(f"robust-compressed (50% channels) keeps this fraction of adv-trained PGD-10 accuracy at "
                     f"eps={MIDDLE:g}", kept, ci95=kept_ci, n=n, digits=3),
               claim("adv-trained PGD-10 accuracy (%)", rows[0]["accuracy"], unit="%", ci95=rows[0]["ci95"], n=n),
               claim("robust-compressed PGD-10 accuracy (%)", rows[1]["accuracy"], unit="%", ci95=rows[1]["ci95"],
                     n=n)]
    out = write_results("robust_compressed", env=env, cases=[{"headline": rows, "scorecards": results}],
                        targets=targets, summary=summary, settings=settings, scorecard_summary=scorecard_summary,
                        timings_s=timings,
                        protocol="headline on every test example of 2 seeds (paired bootstrap of the kept fraction); "
                                 "scorecards on a seeded subset for information")
    print(Scorecard(results, settings).table())
    print(f"\nrobust-compressed keeps {kept:.1%} [{kept_ci[0]:.1%}, {kept_ci[1]:.1%}] of adv-trained PGD accuracy "
          f"at eps={MIDDLE:g} over {n} attacked examples; target >= 90%: {'met' if kept >= 0.9 else 'MISSED'}")
    print(f"total {timings['total']} s; written {out}")


def pgd_hits(models: dict[str, torch.nn.Module], data: Any, seed: int) -> dict[str, list[bool]]:
    """Per test example, whether each model still classifies it right under PGD-10 at the middle eps."""
    from slimguard.robust.attacks import PGD

    out = {}
    for name, model in models.items():
        model.eval()
        x_adv = PGD(eps=MIDDLE, steps=10, relative=True, seed=seed)(model, data.test.x, data.test.y)
        with torch.no_grad():
            out[name] = [bool(v) for v in (model(x_adv).argmax(-1) == data.test.y).tolist()]
    return out


def kept_fraction(ref: list[bool], got: list[bool], resamples: int = 2000) -> tuple[float, list[float]]:
    """``accuracy(got) / accuracy(ref)`` and its paired percentile-bootstrap 95% interval."""
    g = torch.Generator().manual_seed(0)
    r, c = torch.tensor(ref, dtype=torch.float64), torch.tensor(got, dtype=torch.float64)
    stats = []
    for _ in range(resamples):
        i = torch.randint(len(r), (len(r),), generator=g)
        stats.append(float(c[i].mean() / r[i].mean()) if r[i].sum() > 0 else 0.0)
    stats.sort()
    return float(c.mean() / r.mean()), [round(stats[int(0.025 * resamples)], 4),
                                        round(stats[int(0.975 * resamples) - 1], 4)]


def dataclass_replace(cfg: AdversarialFinetuneConfig, epochs: int | None = None,
                      seed: int | None = None) -> AdversarialFinetuneConfig:
    """The same adversarial config with a different number of epochs and/or seed."""
    import dataclasses

    changes = {k: v for k, v in (("epochs", epochs), ("seed", seed)) if v is not None}
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, **changes))


if __name__ == "__main__":
    main()
