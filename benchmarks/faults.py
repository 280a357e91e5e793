"""Bit flips and their protection: silent corruptions with and without range restriction, checksum
detection, and what each protection costs in latency.

For ``digits-lenet5`` and ``digits32-resnet`` (fp32, test split of ``digits32``):

* **Silent data corruption (SDC)**: campaigns of single bit flips in weights, one random input per
  trial, counted when the top-1 class changes (95% Wilson intervals): all 32 bits and the 8 exponent
  bits, each run unprotected and with range restriction (Ranger: activations clipped to the range
  profiled on the train split, per layer and per channel). The same seeded faults and inputs are used
  in every run (paired). Targets: >= 5x fewer SDCs with range restriction, clean test accuracy
  unchanged within 0.1 points. Also, for information: exponent-bit flips in activations, and all-bit
  flips in the int8 storage of ``digits-lenet5`` after dynamic int8 quantization.
* **Checksum detection**: random single-bit flips (every bit position, every state tensor) and random
  multi-bit bursts, each checked against CRC-32 checksums taken from the saved ``.slim`` artifact, then
  repaired from it. Target 100% (RADAR anchor: 96%).
* **Overhead**: latency of each protection relative to the bare model, batch 1 and 64, 1 thread;
  each protection on its own copy of the model (same weights), timed call by call interleaved with the
  bare model (order flipped every pair), 5 warm-up calls, 30 calls each per round, ratio of medians,
  reported ratio = median over 7 rounds (per-round ratios in the JSON). The cascade (dynamic-int8 copy first,
  fp32 original below 0.9
  confidence) is reported with its accuracy, fallback rate and latency relative to each model alone.

Seeded (seed 0). Writes ``benchmarks/results/faults.json``.

Run: ``python benchmarks/faults.py [--models digits-lenet5 digits32-resnet] [--trials-all 6000]
[--sections overhead cascade]`` (``--sections`` re-measures only those, keeping the rest of the JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SLIMGUARD_QUIET", "1")
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))

import slimguard as sg  # noqa: E402
from slimguard import data as sgdata  # noqa: E402
from slimguard.core.outputs import write_json_atomic  # noqa: E402
from slimguard.guard.contract import Contract  # noqa: E402
from slimguard.guard.faults import FaultCampaignConfig, flip_bit_, run_campaign, wilson  # noqa: E402
from slimguard.guard.guard import Guard  # noqa: E402
from slimguard.guard.monitor import Monitor  # noqa: E402
from slimguard.guard.ood import make_detector  # noqa: E402
from slimguard.guard.protect import Cascade, RangeRestriction, RangeRestrictionConfig, WeightChecksums  # noqa: E402
from slimguard.models import zoo  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "faults.json"
SEED = 0
TARGET_REDUCTION = 5.0
SECTIONS = ("sdc", "int8", "checksums", "overhead", "cascade")


def accuracy(model: torch.nn.Module, split: Any) -> float:
    with torch.no_grad():
        return float((model(split.x).argmax(-1) == split.y).float().mean())


def campaign_row(result: Any) -> dict[str, Any]:
    d = result.to_dict()
    return {k: d[k] for k in ("trials", "sdc", "sdc_rate", "ci95", "nonfinite_outputs", "by_field", "by_bit",
                              "by_layer")}


def reduction(base: dict[str, Any], prot: dict[str, Any]) -> dict[str, Any]:
    """How many times fewer SDCs; with zero protected SDCs the ratio is a lower bound (SDC counted as 1)."""
    return {"ratio": base["sdc"] / max(prot["sdc"], 1), "lower_bound": prot["sdc"] == 0,
            "met": base["sdc"] >= TARGET_REDUCTION * max(prot["sdc"], 1)}


def sdc_section(model: torch.nn.Module, data: Any, trials: dict[str, int]) -> dict[str, Any]:
    protections = {
        "range_layer": RangeRestriction(RangeRestrictionConfig(granularity="layer")).profile(model, data.train.x),
        "range_channel": RangeRestriction(RangeRestrictionConfig(granularity="channel")).profile(model, data.train.x),
    }
    out: dict[str, Any] = {"clean_accuracy": {"unprotected": accuracy(model, data.test)}}
    for name, rr in protections.items():
        rr.attach(model)
        out["clean_accuracy"][name] = accuracy(model, data.test)
        rr.detach()
    out["clean_accuracy_change_points"] = {
        k: (v - out["clean_accuracy"]["unprotected"]) * 100 for k, v in out["clean_accuracy"].items()}
    campaigns = {
        "weights_all_bits": FaultCampaignConfig(trials=trials["all"], bits="all", seed=SEED),
        "weights_exponent_bits": FaultCampaignConfig(trials=trials["exponent"], bits="exponent", seed=SEED),
        "activations_exponent_bits": FaultCampaignConfig(trials=trials["activations"], target="activations",
                                                         bits="exponent", seed=SEED),
    }
    for cname, cfg in campaigns.items():
        rows = {"unprotected": campaign_row(run_campaign(model, data.test.x, cfg))}
        for pname, rr in protections.items():
            rr.attach(model)
            try:
                rows[pname] = campaign_row(run_campaign(model, data.test.x, cfg))
            finally:
                rr.detach()
        rows["reduction"] = {p: reduction(rows["unprotected"], rows[p]) for p in protections}
        out[cname] = rows
    return out


def int8_section(model: torch.nn.Module, data: Any, trials: int) -> dict[str, Any]:
    q = copy.deepcopy(model)
    sg.quantize_(q, sg.Int8DynamicConfig())
    rr = RangeRestriction(RangeRestrictionConfig(granularity="channel")).profile(q, data.train.x)
    cfg = FaultCampaignConfig(trials=trials, bits="all", seed=SEED,
                              layers=[n for n, m in q.named_modules() if hasattr(m, "weight_int8")])
    rows = {"clean_accuracy": accuracy(q, data.test), "unprotected": campaign_row(run_campaign(q, data.test.x, cfg))}
    rr.attach(q)
    rows["clean_accuracy_range_channel"] = accuracy(q, data.test)
    rows["range_channel"] = campaign_row(run_campaign(q, data.test.x, cfg))
    rr.detach()
    rows["reduction"] = reduction(rows["unprotected"], rows["range_channel"])
    rows["note"] = "flips in the int8 storage of the Linear layers (conv layers stay fp32)"
    return rows


def checksum_section(model: torch.nn.Module, single: int, bursts: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        path = sg.save(model, Path(d) / "model.slim")
        sums = WeightChecksums.from_artifact(path)
        state = model.state_dict()
        names = [k for k, v in state.items() if v.dtype == torch.float32 and v.numel() > 0]  # weights, BN stats
        sizes = torch.tensor([state[k].numel() for k in names], dtype=torch.float64)
        g = torch.Generator().manual_seed(SEED)
        detected_single = 0
        for _ in range(single):
            name = names[int(torch.multinomial(sizes, 1, generator=g))]
            t = state[name]
            idx, bit = int(torch.randint(t.numel(), (1,), generator=g)), int(torch.randint(32, (1,), generator=g))
            flip_bit_(t, idx, bit)
            detected_single += sums.verify(model) == [name]
            flip_bit_(t, idx, bit)
        detected_burst = repaired = 0
        for _ in range(bursts):
            name = names[int(torch.multinomial(sizes, 1, generator=g))]
            t = state[name]
            k = int(torch.randint(2, 9, (1,), generator=g))
            flips = {(int(torch.randint(t.numel(), (1,), generator=g)), int(torch.randint(32, (1,), generator=g)))
                     for _ in range(k)}
            for idx, bit in flips:
                flip_bit_(t, idx, bit)
            detected_burst += sums.verify(model) == [name]
            sums.repair(model)  # from the artifact
            repaired += sums.verify(model) == []
    return {"single_bit_flips": single, "single_detected": detected_single,
            "single_detection_rate": detected_single / single, "single_ci95": list(wilson(detected_single, single)),
            "multi_bit_bursts": bursts, "burst_detected": detected_burst,
            "burst_detection_rate": detected_burst / bursts,
            "repaired_from_artifact": repaired, "tensors": len(names),
            "target": 1.0, "met": detected_single == single and detected_burst == bursts}


def paired_ratio(base: Any, cand: Any, rounds: int, calls: int = 30,
                 warmup: int = 5) -> tuple[list[float], list[float]]:
    """Latency ratio cand/base: in each round, ``calls`` single calls of each, interleaved one by one
    (order flipped every pair), ratio of the two medians; returns (per-round ratios, base medians in ms).
    Interleaving call by call cancels the slow swings of a shared machine's load."""
    for _ in range(warmup):
        base()
        cand()
    ratios, base_ms = [], []
    for _ in range(rounds):
        tb, tc = [], []
        for i in range(calls):
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                (base if which == 0 else cand)()
                (tb if which == 0 else tc).append(time.perf_counter() - t0)
        ratios.append(statistics.median(tc) / statistics.median(tb))
        base_ms.append(statistics.median(tb) * 1e3)
    return ratios, base_ms


def overhead_section(model: torch.nn.Module, data: Any, rounds: int = 7) -> dict[str, Any]:
    """Each protection on its own copy of the model (same weights), timed against the bare model."""
    def protected(attach: Any) -> torch.nn.Module:
        m = copy.deepcopy(model)
        attach(m)
        return m

    rr = RangeRestriction(RangeRestrictionConfig(granularity="channel")).profile(model, data.train.x)
    m_rr = protected(rr.attach)
    m_sum_all = protected(lambda m: WeightChecksums.from_model(m).attach(m))
    m_sum_rr = protected(lambda m: WeightChecksums.from_model(m).attach(m, tensors_per_call=1))
    contract = Contract.infer(data.train)
    m_guard = copy.deepcopy(model)
    det = make_detector("energy", m_guard).fit(data.train).calibrate(data.val)
    guard = Guard(m_guard, contract=contract, detector=det, monitor=Monitor.from_model(m_guard, data.val))
    out: dict[str, Any] = {}
    for batch in (1, 64):
        x = data.test.x[:batch]

        def call(m: torch.nn.Module, x: torch.Tensor = x) -> Any:
            with torch.no_grad():
                return m(x)

        def with_contract(x: torch.Tensor = x) -> Any:
            contract.validate(x)
            return call(model, x)

        variants: dict[str, Any] = {
            "range_restriction_channel": lambda: call(m_rr),
            "checksums_every_call_all_tensors": lambda: call(m_sum_all),
            "checksums_round_robin_1_tensor": lambda: call(m_sum_rr),
            "contract_check": with_contract,
            "guard_contract_energy_monitor": lambda x=x: guard(x),
        }
        row: dict[str, Any] = {}
        base_all: list[float] = []
        for name, fn in variants.items():
            ratios, base_ms = paired_ratio(lambda: call(model), fn, rounds)
            base_all += base_ms
            row[name] = {"latency_ratio": statistics.median(ratios), "rounds": ratios,
                         "spread": max(ratios) / min(ratios)}  # > 1.5: too noisy to quote
        out[f"batch_{batch}"] = {"bare_ms_median": statistics.median(base_all), **row}
    return out


def cascade_section(model: torch.nn.Module, data: Any, threshold: float = 0.9, rounds: int = 7) -> dict[str, Any]:
    """The cascade as a protection: dynamic-int8 copy first, the fp32 original for rows below ``threshold``
    confidence. Accuracy of each and latency ratios on the test split (batch 64), alternated rounds."""
    small = copy.deepcopy(model)
    sg.quantize_(small, sg.Int8DynamicConfig())
    cas = Cascade(small, model, threshold=threshold)
    acc = {"small_int8": accuracy(small, data.test), "large_fp32": accuracy(model, data.test),
           "cascade": accuracy(cas, data.test)}
    cas.rows = cas.fallback_rows = 0
    x = data.test.x[:64]

    def run(m: torch.nn.Module) -> Any:
        with torch.no_grad():
            return m(x)

    vs_small, _ = paired_ratio(lambda: run(small), lambda: run(cas), rounds)
    vs_large, _ = paired_ratio(lambda: run(model), lambda: run(cas), rounds)
    return {"threshold": threshold, "accuracy": acc, "fallback_rate_batch_64": cas.fallback_rate,
            "latency_ratio_vs_small": statistics.median(vs_small),
            "latency_ratio_vs_large": statistics.median(vs_large),
            "batch": 64}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits-lenet5", "digits32-resnet"])
    ap.add_argument("--trials-all", type=int, default=6000)
    ap.add_argument("--trials-exponent", type=int, default=3000)
    ap.add_argument("--trials-activations", type=int, default=2000)
    ap.add_argument("--checksum-flips", type=int, default=2000)
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                    help="measure only these (the others are kept from the existing JSON)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    trials = {"all": args.trials_all, "exponent": args.trials_exponent, "activations": args.trials_activations}
    results: dict[str, Any] = {"seed": SEED, "threads": 1, "torch": torch.__version__, "machine": platform.machine(),
                               "trials": trials, "models": {}}
    partial = set(args.sections) != set(SECTIONS)
    if partial and OUT.exists():  # re-measure some sections, keep the others from the last full run
        previous = json.loads(OUT.read_text())
        results["models"] = previous.get("models", {})
        results["trials"] = previous.get("trials", trials)
    for name in args.models:
        model = zoo.load(name, seed=SEED, progress=False).eval()
        data = sgdata.load(zoo.ZOO.get(name).data, seed=SEED)
        r: dict[str, Any] = results["models"].get(name, {})
        r.update({"data": data.name, "params": sum(p.numel() for p in model.parameters())})
        if "sdc" in args.sections:
            r["sdc"] = sdc_section(model, data, trials)
        if "int8" in args.sections and name == "digits-lenet5":
            r["int8_weights"] = int8_section(model, data, args.trials_all)
        if "checksums" in args.sections:
            r["checksums"] = checksum_section(model, args.checksum_flips, args.checksum_flips // 4)
        if "overhead" in args.sections:
            r["overhead"] = overhead_section(model, data)
        if "cascade" in args.sections:
            r["cascade"] = cascade_section(model, data)
        results["models"][name] = r
        write_json_atomic(OUT, results)  # partial results survive an interruption
    write_json_atomic(OUT, results)
    for name, r in results["models"].items():
        s = r["sdc"]
        print(f"\n{name}: clean accuracy {s['clean_accuracy']}")
        print(f"  {'campaign':28s} {'protection':15s} {'SDC':>6s} {'rate':>8s} {'95% CI':>18s} {'fewer':>7s}")
        for c in ("weights_all_bits", "weights_exponent_bits", "activations_exponent_bits"):
            for p in ("unprotected", "range_layer", "range_channel"):
                row = s[c][p]
                red = "" if p == "unprotected" else (
                    f"{'>=' if s[c]['reduction'][p]['lower_bound'] else ''}{s[c]['reduction'][p]['ratio']:.1f}x")
                print(f"  {c:28s} {p:15s} {row['sdc']:6d} {row['sdc_rate']:8.4f} "
                      f"[{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}] {red:>7s}")
        if "int8_weights" in r:
            q = r["int8_weights"]
            print(f"  int8 storage, all bits: {q['unprotected']['sdc']} -> {q['range_channel']['sdc']} SDC "
                  f"of {q['unprotected']['trials']}")
        c = r["checksums"]
        print(f"  checksums: {c['single_detected']}/{c['single_bit_flips']} single flips, "
              f"{c['burst_detected']}/{c['multi_bit_bursts']} bursts detected; {c['repaired_from_artifact']} repaired")
        for b in ("batch_1", "batch_64"):
            o = r["overhead"][b]
            print(f"  overhead {b}: " + ", ".join(f"{k} {v['latency_ratio']:.2f}x" for k, v in o.items()
                                                   if isinstance(v, dict)))
        k = r["cascade"]
        print(f"  cascade int8 -> fp32 (confidence < {k['threshold']}): accuracy {k['accuracy']}, fallback "
              f"{k['fallback_rate_batch_64']:.3f}, latency {k['latency_ratio_vs_small']:.2f}x of int8, "
              f"{k['latency_ratio_vs_large']:.2f}x of fp32")
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
