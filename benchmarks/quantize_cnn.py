"""Static int8 on ``digits32-resnet``: accuracy kept (5 seeds) and speed on ONNX Runtime and in PyTorch.

For each seed (0..4: its own data split and trained zoo model):
  * static int8 (BN folded, ReLU fused, int8 weights per channel, uint8 activations) calibrated on the
    ``calib`` split with each of four methods (percentile, minmax, mse, entropy);
  * the calibration method is **chosen on the validation split** (ONNX Runtime accuracy, ties to the first
    listed); only the chosen model is then scored on test, once, with a Wilson interval and the paired delta
    against fp32 on the same examples.
Speed (seed 0's models, 2 pinned threads, batch 1 and 64): paired interleaved rounds
(``compare_speed``) of ORT int8 against ORT fp32 (same runtime) and against PyTorch fp32 eager, and of
PyTorch's own int8 path (``torch._int_mm``) against PyTorch fp32. Also checked: ORT picked int8 kernels.
Targets: accuracy drop <= 0.3 points (mean over seeds), ORT int8 >= 1.5x PyTorch fp32 at batch 64.

Run: ``python benchmarks/quantize_cnn.py [--seeds 5] [--rounds 30]``
Writes ``benchmarks/results/quantize_cnn.json``.
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
os.environ.setdefault("SLIMGUARD_QUIET", "1")
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))
import slimguard as sg  # noqa: E402
from _schema import accuracy_row, claim, correct, environment, over_seeds, target, write_results  # noqa: E402
from slimguard.runtime.measure import compare_speed  # noqa: E402
from slimguard.runtime.onnx import OrtModel, check_int8_kernels, export_onnx  # noqa: E402
from slimguard.runtime.stats import paired_delta  # noqa: E402

THREADS = 2
METHODS = ("percentile", "minmax", "mse", "entropy")


def _acc(model: Any, split: Any) -> float:
    hits = correct(model, split)
    return 100 * sum(hits) / len(hits)


def run_seed(seed: int, tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    torch.manual_seed(seed)
    data = sg.data.load("digits32", seed=seed)
    fp32 = sg.zoo.load("digits32-resnet", seed=seed, progress=False).eval()
    export_onnx(fp32, data.test.x[:1], tmp / f"fp32-{seed}.onnx")
    rows, models = {}, {}
    for method in METHODS:
        q = copy.deepcopy(fp32)
        rep = sg.quantize_(q, sg.Int8StaticConfig(calibration=method), calib=data.calib, progress=False)
        path = tmp / f"int8-{method}-{seed}.onnx"
        export_onnx(q, data.test.x[:1], path)
        ort_q = OrtModel(path, num_threads=THREADS)
        rows[method] = {"val_accuracy_ort": round(_acc(ort_q, data.val), 3), "kept_float": rep["kept_float"],
                        "quantized_layers": len(rep["quantized"])}
        models[method] = (q, ort_q)
    chosen = max(METHODS, key=lambda m: (rows[m]["val_accuracy_ort"], -METHODS.index(m)))
    q, ort_q = models[chosen]
    hits_fp32, hits_int8 = correct(fp32, data.test), correct(ort_q, data.test)
    delta = paired_delta(hits_fp32, hits_int8, seed=seed)
    with tempfile.TemporaryDirectory() as d:
        sizes = {"fp32": sg.save(fp32, Path(d) / "a.slim").stat().st_size,
                 "int8": sg.save(q, Path(d) / "b.slim").stat().st_size}
    with torch.no_grad():
        x = data.test.x[:256]
        agree = float((ort_q(x).argmax(1) == q(x).argmax(1)).float().mean())
    case = {"seed": seed, "val_accuracy_fp32": round(_acc(fp32, data.val), 3), "calibration_on_val": rows,
            "chosen_calibration": chosen,
            "test": [accuracy_row("fp32", hits_fp32), accuracy_row(f"int8 ORT ({chosen})", hits_int8)],
            "accuracy_drop_points": -delta["delta_points"], "paired_delta": delta, "file_bytes": sizes,
            "ort_vs_torch_int8_argmax_agreement": agree}
    ort_fp32 = OrtModel(tmp / f"fp32-{seed}.onnx", num_threads=THREADS)
    return case, {"fp32": fp32, "ort_fp32": ort_fp32, "ort_int8": ort_q, "torch_int8": q, "data": data}


def speed(m: dict[str, Any], rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for bs in (1, 64):
        x = m["data"].test.x[:bs].contiguous()
        calls = 20 if bs == 1 else 3
        cands = {"torch_fp32": m["fp32"], "ort_fp32": m["ort_fp32"], "ort_int8": m["ort_int8"],
                 "torch_int8": m["torch_int8"]}
        vs_torch = compare_speed(cands, x, baseline="torch_fp32", threads=THREADS, rounds=rounds,
                                 calls_per_round=calls)
        vs_ort = compare_speed({"ort_fp32": m["ort_fp32"], "ort_int8": m["ort_int8"]}, x, baseline="ort_fp32",
                               threads=THREADS, rounds=rounds, calls_per_round=calls)
        out[f"batch_{bs}"] = {"ort_int8_vs_torch_fp32": vs_torch.to_dict("ort_int8"),
                              "torch_int8_vs_torch_fp32": vs_torch.to_dict("torch_int8"),
                              "ort_fp32_vs_torch_fp32": vs_torch.to_dict("ort_fp32"),
                              "ort_int8_vs_ort_fp32": vs_ort.to_dict()}
        for k, v in out[f"batch_{bs}"].items():
            print(f"  batch {bs:>2} {k:>26}: {v['verdict']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    seeds = list(range(args.seeds))
    env = environment(THREADS, seed=seeds, runtime="onnxruntime CPU (QDQ -> QLinearConv/QGemm) and PyTorch")
    tmp = Path(tempfile.mkdtemp(prefix="sg-qcnn-"))
    cases, timing, kernels = [], {}, {}
    for seed in seeds:
        case, models = run_seed(seed, tmp)
        cases.append(case)
        print(f"seed {seed}: calibration {case['chosen_calibration']} (chosen on val); test "
              f"{case['test'][0]['accuracy']:.2f} -> {case['test'][1]['accuracy']:.2f}")
        if seed == seeds[0]:
            kernels = check_int8_kernels(models["ort_int8"])
            timing = speed(models, args.rounds)
    drop = over_seeds([c["accuracy_drop_points"] for c in cases])
    b64 = timing["batch_64"]
    ort64, same64, t64 = b64["ort_int8_vs_torch_fp32"], b64["ort_int8_vs_ort_fp32"], b64["torch_int8_vs_torch_fp32"]
    size = cases[0]["file_bytes"]["fp32"] / cases[0]["file_bytes"]["int8"]
    targets = [target("accuracy drop, mean over seeds (ORT int8)", "<= 0.3 points", drop, drop["mean"] <= 0.3),
               target("ORT int8 vs PyTorch fp32, batch 64", ">= 1.5x (lower end of the 95% interval)",
                      {"ratio": round(ort64["ratio"], 3), "ci95": [round(v, 3) for v in ort64["ci95"]]},
                      ort64["ci95"][0] >= 1.5),
               target("ORT int8 kernels chosen", "QLinearConv/QGemm or equivalent in the optimized graph",
                      kernels.get("int8_ops"), bool(kernels.get("int8_ops")))]
    summary = [claim("static int8 (ORT): accuracy drop (points, mean of 5 seeds; calibration chosen on val)",
                     drop["mean"], ci95=drop["ci95"], n=len(seeds)),
               claim("static int8 on ORT vs PyTorch fp32, batch 64 (x)", ort64["ratio"], unit="x",
                     ci95=ort64["ci95"], n=ort64["rounds"]),
               claim("static int8 on ORT vs ORT fp32, batch 64 (x)", same64["ratio"], unit="x", ci95=same64["ci95"],
                     n=same64["rounds"]),
               claim("static int8 in PyTorch (_int_mm) vs PyTorch fp32, batch 64 (x)", t64["ratio"], unit="x",
                     ci95=t64["ci95"], n=t64["rounds"]),
               claim("static int8: file smaller than fp32 .slim (x)", size, unit="x")]
    out = write_results("quantize_cnn", env=env, cases=cases, targets=targets, summary=summary, speed=timing,
                        int8_kernels=kernels,
                        protocol="calibration method chosen on validation; test touched once per seed (5 seeds); "
                                 "speed by paired interleaved rounds, 2 pinned threads")
    print(f"accuracy drop {drop['mean']:.2f} [{drop['ci95'][0]:.2f}, {drop['ci95'][1]:.2f}] points; "
          f"ORT int8 vs torch fp32 at 64: {ort64['verdict']}; wrote {out}")


if __name__ == "__main__":
    main()
