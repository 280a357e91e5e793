"""Robustness before and after compression, on digits32-resnet.

Five models, each scored by the robustness scorecard (clean accuracy, FGSM / PGD / APGD over an eps
grid, corruptions at five severities):

1. ``original``: the zoo model.
2. ``pruned``: channel pruning (50% of channels, structural) + clean fine-tuning.
3. ``int8``: static int8 PTQ (attacked through its fake-quant twin, examples transferred; both reported).
4. ``adv-trained``: the original adversarially trained (PGD-AT) at the middle eps: the reference.
5. ``robust-compressed``: ``adv-trained`` -> the same channel pruning -> adversarial fine-tuning
   (robustness-aware compression).

Target: ``robust-compressed`` keeps >= 90% of the PGD accuracy of ``adv-trained`` at the middle eps.
Attacks run on a seeded subset of the test split (stated in the JSON) to stay within a few minutes on two
shared CPU cores.

Usage:
    .venv/bin/python benchmarks/robust_compressed.py [--examples 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))
os.environ.setdefault("SLIMGUARD_QUIET", "1")

import slimguard as sg  # noqa: E402
from slimguard.artifact import file_size  # noqa: E402
from slimguard.core.outputs import write_json_atomic  # noqa: E402
from slimguard.models import zoo  # noqa: E402
from slimguard.robust import AdversarialFinetuneConfig, adversarial_finetune, scorecard  # noqa: E402
from slimguard.robust.scorecard import Scorecard  # noqa: E402
from slimguard.runtime.measure import count_params  # noqa: E402
from slimguard.train.loop import FinetuneConfig, finetune  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "robust_compressed.json"
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

    label = f"pgd-linf eps={MIDDLE:g}"
    apgd = f"apgd-ce+dlr-linf eps={MIDDLE:g}"
    ref, got = results["adv-trained"]["attacks"][label]["accuracy"], results["robust-compressed"]["attacks"][label][
        "accuracy"]
    kept = got / ref if ref else 0.0
    summary = {
        "middle_eps": MIDDLE,
        "pgd_accuracy_at_middle_eps": {k: v["attacks"][label]["accuracy"] for k, v in results.items()},
        "apgd_accuracy_at_middle_eps": {k: v["attacks"][apgd]["accuracy"] for k, v in results.items()},
        "clean_accuracy": {k: v["clean_accuracy"] for k, v in results.items()},
        "int8_twin_pgd_accuracy_at_middle_eps": results["int8"]["attacks"][label].get("twin_accuracy"),
        "robust_accuracy_kept": kept,
        "target": ">= 0.90 of the adversarially trained uncompressed model's PGD accuracy at the middle eps",
        "target_met": kept >= 0.90,
    }
    settings.update({
        "model": "zoo:digits32-resnet", "data": "digits32", "threads": args.threads, "seed": args.seed,
        "prune": prune_cfg, "quantize": quant_cfg, "adversarial_training": adv_cfg.to_dict(),
        "robust_compression_finetune": ft_cfg.to_dict(),
        "note": f"attacks on a seeded subset of {args.examples} of {len(data.test)} test examples; corruptions "
                f"on {args.corruption_examples}; robust accuracy is PGD-10 (L-inf) at the middle eps; "
                f"adv-trained: {args.adv_epochs} epochs of PGD-AT from the original; robust-compressed: that "
                f"model, pruned, then {args.adv_ft_epochs} epochs of PGD-AT fine-tuning",
    })
    timings["total"] = round(time.perf_counter() - t_start, 1)
    out = {"summary": summary, "models": results, "settings": settings, "timings_s": timings,
           "versions": {"torch": torch.__version__, "slimguard": sg.__version__}}
    write_json_atomic(OUT, out)
    print(Scorecard(results, settings).table())
    print(f"\nrobust-compressed keeps {kept:.1%} of adv-trained PGD accuracy at eps={MIDDLE:g} "
          f"({got:.3f} vs {ref:.3f}); target >= 90%: {'met' if kept >= 0.9 else 'MISSED'}")
    print(f"total {timings['total']} s; written {OUT.relative_to(ROOT)}")


def dataclass_replace(cfg: AdversarialFinetuneConfig, epochs: int) -> AdversarialFinetuneConfig:
    """The same adversarial config with a different number of epochs."""
    import dataclasses

    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, epochs=epochs))


if __name__ == "__main__":
    main()
