"""Deep Compression end to end: prune -> fine-tune -> share weights -> fine-tune centroids -> Huffman code.

Measures, for ``digits-mlp`` (LeNet-300-100 shape) and ``digits-lenet5``:
  * bytes of the fp32 ``.slim`` (the zoo model as saved) and of the compressed ``.slim`` (whole files,
    manifest and zip overhead included), and their ratio (target >= 40x, Han et al. ICLR 2016);
  * test accuracy of both, the compressed one measured on the model *loaded back from the file*
    (target: drop <= 0.5 points), and that the loaded model predicts exactly as the saved one;
  * the per-layer table of the paper (weights, kept %, cluster bits, index bits/weight, position
    bits/weight, bytes);
  * decode speed: loading the coded artifact vs the fp32 artifact (ratio measured in one run, alternated,
    warm-up, median of 7), and Huffman decode throughput.

Fine-tuning runs through the one training loop with a distillation loss from the original model.
Seeded (seed 0), 1 thread. Writes ``benchmarks/results/deep_compression.json``.

Run: ``python benchmarks/deep_compression.py [--models digits-mlp digits-lenet5]``
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

os.environ.setdefault("SLIMGUARD_QUIET", "1")
import slimguard as sg
from slimguard.codec.base import codec
from slimguard.core.outputs import write_json_atomic
from slimguard.train.loop import accuracy

OUT = Path(__file__).parent / "results" / "deep_compression.json"
SEED = 0

# final sparsity per layer (by module name), pruning steps, fine-tuning epochs per step, sharing bits
SETTINGS: dict[str, dict[str, Any]] = {
    "digits-mlp": {
        "sparsity": {"2": 0.94, "4": 0.97, "6": 0.5},
        "prune_steps": 8, "epochs": 30, "lr": 1e-3,
        "sharing": {"bits": 3, "bias_bits": 4},
        "centroid_epochs": 30, "centroid_lr": 3e-4,
    },
    "digits-lenet5": {
        "sparsity": {"1": 0.4, "4": 0.85, "8": 0.915, "10": 0.7},
        "prune_steps": 10, "epochs": 8, "lr": 3e-4,
        "sharing": {"bits": 5, "bits_by_type": {"conv": 6, "linear": 3}, "bias_bits": 5},
        "centroid_epochs": 10, "centroid_lr": 2e-5,
    },
}


def kd_loss(teacher: torch.nn.Module, alpha: float = 0.7, temperature: float = 2.0):
    """Cross-entropy plus distillation from the uncompressed model (Hinton et al. 2015)."""

    def loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = model(x)
        with torch.no_grad():
            t = teacher(x)
        kl = F.kl_div(F.log_softmax(out / temperature, -1), F.log_softmax(t / temperature, -1),
                      log_target=True, reduction="batchmean")
        return (1 - alpha) * F.cross_entropy(out, y) + alpha * temperature**2 * kl

    return loss


def per_layer_table(model: torch.nn.Module) -> list[dict[str, Any]]:
    rows = []
    for r in sg.inspect_model(model)["tensors"]:
        if r["codec"] != "huffman" and r["params"] < 64:
            continue
        rows.append({k: r.get(k) for k in ("tensor", "params", "nonzero", "kept_percent", "codec", "bits",
                                           "index_bits_per_weight", "position_bits_per_weight",
                                           "bits_per_kept_weight", "stored_bytes", "compression")})
    return rows


def _median_time(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_speed(coded: Path, fp32: Path, repeats: int = 7) -> dict[str, Any]:
    """Load time of the coded vs the fp32 artifact (alternated, warm-up, median), and decode throughput."""
    from slimguard.artifact.slim import _open, decode_tensors

    sg.load(coded), sg.load(fp32)  # warm-up
    t_coded, t_fp32 = [], []
    for _ in range(repeats):
        t_coded.append(_median_time(lambda: sg.load(coded), 1))
        t_fp32.append(_median_time(lambda: sg.load(fp32), 1))
    manifest, blobs = _open(coded)
    weights = sum(int(torch.tensor(m["shape"]).prod()) for m in manifest["tensors"].values()
                  if m.get("codec") == "huffman")
    t_decode = _median_time(lambda: decode_tensors(manifest, blobs["tensors.safetensors"]), repeats)
    return {"load_ms_coded": 1e3 * statistics.median(t_coded), "load_ms_fp32": 1e3 * statistics.median(t_fp32),
            "load_time_ratio_coded_over_fp32": statistics.median(t_coded) / statistics.median(t_fp32),
            "decode_ms_all_tensors": 1e3 * t_decode, "decoded_weights": weights,
            "decode_weights_per_s": weights / t_decode, "repeats": repeats}


def run(name: str, workdir: Path) -> dict[str, Any]:
    cfg = SETTINGS[name]
    torch.manual_seed(SEED)
    from slimguard.models import zoo

    original = zoo.load(name, seed=SEED, progress=False)
    data = sg.data.load(zoo.ZOO.get(name).data, seed=SEED)
    fp32_path = sg.save(original, workdir / f"{name}-fp32.slim")
    base_acc = accuracy(original, data.test)
    teacher = copy.deepcopy(original).eval()
    loss = kd_loss(teacher)
    model = copy.deepcopy(original)
    stages = []
    t0 = time.time()
    steps = cfg["prune_steps"]
    for k in range(1, steps + 1):
        # iterative pruning, each step removing the same fraction of the remaining weights (density
        # falls geometrically to its target), with fine-tuning in between (Han et al. 2015)
        overrides = {layer: round(1 - (1 - s) ** (k / steps), 6) for layer, s in cfg["sparsity"].items()}
        sg.prune_(model, sg.MagnitudePruningConfig(sparsity=0.0, scope="layer", overrides=overrides))
        sg.finetune(model, data, sg.FinetuneConfig(epochs=cfg["epochs"], lr=cfg["lr"], patience=0, seed=SEED),
                    loss_fn=loss, progress=False)
        stages.append({"stage": f"prune step {k}/{steps}", "sparsity": overrides,
                       "test_accuracy": accuracy(model, data.test)})
        logging.info("%s: %s", name, stages[-1])
    pruned_acc = accuracy(model, data.test)
    sg.cluster_(model, sg.WeightSharingConfig(**cfg["sharing"]))
    stages.append({"stage": "weight sharing", "test_accuracy": accuracy(model, data.test)})
    sg.finetune(model, data, sg.FinetuneConfig(epochs=cfg["centroid_epochs"], lr=cfg["centroid_lr"], patience=0,
                                               seed=SEED), loss_fn=loss, progress=False)
    stages.append({"stage": "centroid fine-tuning", "test_accuracy": accuracy(model, data.test)})
    sg.cluster_(model, sg.HuffmanCodingConfig())
    stages.append({"stage": "huffman coding (fp16 codebooks)", "test_accuracy": accuracy(model, data.test)})
    train_s = time.time() - t0
    coded_path = sg.save(model, workdir / f"{name}-deep.slim")
    loaded = sg.load(coded_path)
    model.eval()
    with torch.no_grad():
        exact = bool(torch.equal(loaded(data.test.x), model(data.test.x)))
    acc = accuracy(loaded, data.test)
    fp32_bytes, coded_bytes = fp32_path.stat().st_size, coded_path.stat().st_size
    return {
        "model": name, "data": zoo.ZOO.get(name).data, "seed": SEED, "settings": cfg,
        "fp32_file_bytes": fp32_bytes, "compressed_file_bytes": coded_bytes,
        "ratio": fp32_bytes / coded_bytes, "target_ratio": 40.0, "ratio_ok": fp32_bytes / coded_bytes >= 40.0,
        "fp32_accuracy": base_acc, "pruned_accuracy": pruned_acc, "compressed_accuracy": acc,
        "accuracy_drop_points": 100 * (base_acc - acc), "accuracy_ok": 100 * (base_acc - acc) <= 0.5,
        "loaded_predicts_exactly": exact, "test_examples": len(data.test), "stages": stages,
        "train_seconds": train_s,
        "layers": per_layer_table(loaded), "decode": decode_speed(coded_path, fp32_path),
        "huffman_codec": codec("huffman").name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            results.append(run(name, Path(d)))
    write_json_atomic(OUT, {"benchmark": "deep_compression", "threads": 1, "results": results})
    print(f"{'model':15} {'fp32 B':>9} {'coded B':>8} {'ratio':>7} {'acc fp32':>9} {'acc coded':>9} {'drop':>6}")
    for r in results:
        print(f"{r['model']:15} {r['fp32_file_bytes']:9d} {r['compressed_file_bytes']:8d} {r['ratio']:7.1f} "
              f"{100 * r['fp32_accuracy']:9.2f} {100 * r['compressed_accuracy']:9.2f} "
              f"{r['accuracy_drop_points']:6.2f}")
        for row in r["layers"]:
            print(f"    {row['tensor']:10} kept {row['kept_percent']}% bits {row['bits']} "
                  f"bytes {row['stored_bytes']}")


if __name__ == "__main__":
    main()
