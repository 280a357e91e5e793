"""Static int8 on ``digits32-resnet``: accuracy kept and latency on ONNX Runtime.

Measures:
  * test accuracy of the fp32 model and of the static int8 model (BN folded, ReLU fused, int8 weights per
    channel, uint8 activations; calibration on the ``calib`` split, never the test split), in PyTorch and
    on ONNX Runtime (QDQ export -> ``QLinearConv`` / ``QGemm``), for each calibration method;
  * which int8 kernels ORT chose (checked in its optimized graph);
  * latency ratios in one run (alternated, warm-up 10, median of 21 repeats, 2 threads, batch 1 and 64):
    ORT int8 vs ORT fp32 and vs PyTorch fp32 eager (target >= 1.5x), accuracy drop target <= 0.3 points;
  * bytes of the fp32 and int8 ``.slim`` files.

PyTorch eager at 2 threads is also timed at 1 thread: on a machine whose cores are shared with other
jobs, OpenMP's 2-thread barriers can make eager PyTorch far slower than its arithmetic would suggest.

Runtime used: ONNX Runtime (CPU) for the int8 model, since PyTorch executes the static int8 layers as
exact float emulation. Seed 0. Writes ``benchmarks/results/quantize_cnn.json``.

Run: ``python benchmarks/quantize_cnn.py``
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("SLIMGUARD_QUIET", "1")
# the same zoo cache as the other benchmarks and the tests, so every benchmark scores the same trained model
os.environ.setdefault("SLIMGUARD_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "zoo"))
import slimguard as sg
from slimguard.core.outputs import write_json_atomic
from slimguard.runtime.measure import threads
from slimguard.runtime.onnx import OrtModel, check_int8_kernels, export_onnx
from slimguard.train.loop import accuracy

OUT = Path(__file__).parent / "results" / "quantize_cnn.json"
THREADS = 2


def timed(fns: dict[str, Any], x: torch.Tensor, warmup: int = 10, repeats: int = 21) -> dict[str, float]:
    """Median ms per call of each function, calls alternated round by round on the same input."""
    with torch.no_grad():
        for _ in range(warmup):
            for f in fns.values():
                f(x)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f(x)
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    data = sg.data.load("digits32", seed=0)
    fp32 = sg.zoo.load("digits32-resnet", progress=False).eval()
    tmp = Path(tempfile.mkdtemp(prefix="sg-qcnn-"))
    result: dict[str, Any] = {"model": "digits32-resnet", "data": "digits32", "seed": 0, "threads": THREADS,
                              "runtime": "onnxruntime CPU (int8 QDQ -> QLinearConv/QGemm)"}
    acc_fp32 = accuracy(fp32, data.test)
    result["accuracy_fp32"] = acc_fp32
    export_onnx(fp32, data.test.x[:1], tmp / "fp32.onnx")
    ort_fp32 = OrtModel(tmp / "fp32.onnx", num_threads=THREADS)
    calib_rows = {}
    best = None
    for method in ("percentile", "minmax", "mse", "entropy"):
        q = copy.deepcopy(fp32)
        rep = sg.quantize_(q, sg.Int8StaticConfig(calibration=method), calib=data.calib, progress=False)
        export_onnx(q, data.test.x[:1], tmp / f"int8-{method}.onnx")
        ort_q = OrtModel(tmp / f"int8-{method}.onnx", num_threads=THREADS)
        row = {"accuracy_torch": accuracy(q, data.test), "accuracy_ort": accuracy(ort_q, data.test),
               "kept_float": rep["kept_float"], "quantized_layers": len(rep["quantized"])}
        row["accuracy_drop_points"] = (acc_fp32 - row["accuracy_ort"]) * 100
        calib_rows[method] = row
        if best is None or row["accuracy_ort"] > calib_rows[best[0]]["accuracy_ort"]:
            best = (method, q, ort_q)
    assert best is not None
    method, q, ort_q = best
    result["calibration"] = calib_rows
    result["chosen_calibration"] = method
    result["accuracy_int8_ort"] = calib_rows[method]["accuracy_ort"]
    result["accuracy_drop_points"] = calib_rows[method]["accuracy_drop_points"]
    result["int8_kernels"] = check_int8_kernels(ort_q)
    with torch.no_grad():
        x = data.test.x[:256]
        result["ort_vs_torch_int8_argmax_agreement"] = float((ort_q(x).argmax(1) == q(x).argmax(1)).float().mean())
    sg.save(fp32, tmp / "fp32.slim")
    sg.save(q, tmp / "int8.slim")
    result["bytes_fp32_slim"] = (tmp / "fp32.slim").stat().st_size
    result["bytes_int8_slim"] = (tmp / "int8.slim").stat().st_size
    result["latency"] = {}
    def torch_1thread(x: torch.Tensor) -> torch.Tensor:
        with threads(1):
            return fp32(x)

    for bs in (1, 64):
        ms = timed({"torch_fp32": fp32, "torch_fp32_1thread": torch_1thread, "ort_fp32": ort_fp32,
                    "ort_int8": ort_q}, data.test.x[:bs])
        result["latency"][f"batch{bs}"] = {
            "ms": ms, "speedup_int8_vs_ort_fp32": ms["ort_fp32"] / ms["ort_int8"],
            "speedup_int8_vs_torch_fp32": ms["torch_fp32"] / ms["ort_int8"],
            "speedup_int8_vs_torch_fp32_1thread": ms["torch_fp32_1thread"] / ms["ort_int8"]}
    result["targets"] = {"accuracy_drop_points_max": 0.3, "speedup_min": 1.5}
    write_json_atomic(OUT, result)
    print(f"digits32-resnet static int8 ({method} calibration): accuracy {acc_fp32:.4f} -> "
          f"{result['accuracy_int8_ort']:.4f} (drop {result['accuracy_drop_points']:.2f} pts)")
    print(f"int8 kernels: {result['int8_kernels']['int8_ops']}")
    print(f"{'batch':>6} {'torch fp32 ms':>14} {'ORT fp32 ms':>12} {'ORT int8 ms':>12} {'vs ORT fp32':>12} "
          f"{'vs torch fp32':>14}")
    for k, v in result["latency"].items():
        print(f"{k:>6} {v['ms']['torch_fp32']:>14.2f} {v['ms']['ort_fp32']:>12.2f} {v['ms']['ort_int8']:>12.2f} "
              f"{v['speedup_int8_vs_ort_fp32']:>11.2f}x {v['speedup_int8_vs_torch_fp32']:>13.2f}x")
    print(f"size: {result['bytes_fp32_slim']:,} -> {result['bytes_int8_slim']:,} bytes; wrote {OUT}")


if __name__ == "__main__":
    main()
