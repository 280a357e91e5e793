"""Bit flips and their protection: silent corruptions with and without range restriction, checksum
detection, and what each protection costs in latency.

For ``digits-lenet5`` and ``digits32-resnet`` (fp32, test split of ``digits32``):

* **Silent data corruption (SDC)**: campaigns of single bit flips in weights, one random input per
  trial, counted when the top-1 class changes (95% Wilson intervals): all 32 bits and the 8 exponent
  bits, each run unprotected and with range restriction (Ranger: activations clipped to the range
  profiled on the train split, per layer and per channel). The same seeded faults and inputs are used
  in every run (paired). A campaign grows (new seeded chunks, up to ``--max-factor`` times its size)
  until the **conservative** reduction (lower end of the unprotected rate's interval over the upper end of
  the protected rate's) reaches the target, so a quoted reduction is supported by the protected count.
  Targets: >= 5x fewer SDCs with range restriction (conservative bound), clean test accuracy unchanged
  within 0.1 points. Also, for information: exponent-bit flips in activations, and all-bit flips in the
  int8 storage of ``digits-lenet5`` after dynamic int8 quantization.
* **Checksum detection**: random single-bit flips (every bit position, every state tensor) and random
  multi-bit bursts, each checked against CRC-32 checksums taken from the saved ``.slim`` artifact, then
  repaired from it. Target 100% (RADAR anchor: 96%).
* **Overhead**: each protection on its own copy of the model (same weights) against the bare model, batch
  1 and 64, 1 pinned thread, paired interleaved rounds (``compare_speed``: median ratio, 95% interval).
* **Cascade** (dynamic-int8 copy first, the fp32 original below a confidence threshold chosen on
  validation): test accuracy of each, fallback rate, speed against each model alone.

Seeded (seed 0). Writes ``benchmarks/results/faults.json``.

Run: ``python benchmarks/faults.py [--models digits-lenet5 digits32-resnet] [--trials-all 6000]``
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
from _schema import accuracy_row, claim, correct, environment, target, write_results  # noqa: E402
from slimguard import data as sgdata  # noqa: E402
from slimguard.guard.contract import Contract  # noqa: E402
from slimguard.guard.faults import FaultCampaignConfig, flip_bit_, run_campaign  # noqa: E402
from slimguard.guard.guard import Guard  # noqa: E402
from slimguard.guard.monitor import Monitor  # noqa: E402
from slimguard.guard.ood import make_detector  # noqa: E402
from slimguard.guard.protect import Cascade, RangeRestriction, RangeRestrictionConfig, WeightChecksums  # noqa: E402
from slimguard.models import zoo  # noqa: E402
from slimguard.runtime.measure import compare_speed  # noqa: E402
from slimguard.runtime.stats import wilson  # noqa: E402

SEED = 0
TARGET_REDUCTION = 5.0


def accuracy(model: torch.nn.Module, split: Any) -> float:
    with torch.no_grad():
        return float((model(split.x).argmax(-1) == split.y).float().mean())


def campaign_row(result: Any) -> dict[str, Any]:
    d = result.to_dict()
    return {k: d[k] for k in ("trials", "sdc", "sdc_rate", "ci95", "nonfinite_outputs", "by_field", "by_bit",
                              "by_layer")}


def reduction(base: dict[str, Any], prot: dict[str, Any]) -> dict[str, Any]:
    """How many times fewer SDCs: the point estimate (rates; with zero protected SDCs, counted as 1) and the
    conservative bound (lower end of the unprotected rate's 95% interval over the upper end of the protected
    one's), which is what a claim may quote; the target is met when the conservative bound reaches it."""
    point = base["sdc_rate"] / max(prot["sdc_rate"], 1 / prot["trials"])
    bound = base["ci95"][0] / prot["ci95"][1] if prot["ci95"][1] > 0 else float("inf")
    return {"ratio": round(point, 2), "conservative_bound": round(bound, 2), "met": bound >= TARGET_REDUCTION}


def sized_campaign(model: torch.nn.Module, x: torch.Tensor, protections: dict[str, Any], chunk: int,
                   max_trials: int, **options: Any) -> dict[str, Any]:
    """Run the same seeded faults without and with each protection, in chunks of ``chunk`` trials (new seed
    each chunk), until every protection's conservative reduction bound reaches the target or ``max_trials``
    is spent: a campaign large enough for the protected rate's upper bound to support the claim."""
    counts = {name: [0, 0] for name in ("unprotected", *protections)}
    first: dict[str, Any] = {}
    trials = 0
    while trials < max_trials:
        cfg = FaultCampaignConfig(trials=chunk, seed=SEED + trials // chunk, **options)
        for name in counts:
            rr = protections.get(name)
            if rr is not None:
                rr.attach(model)
            try:
                res = campaign_row(run_campaign(model, x, cfg))
            finally:
                if rr is not None:
                    rr.detach()
            counts[name][0] += res["sdc"]
            counts[name][1] += res["trials"]
            first.setdefault(name, res)
        trials += chunk
        rows = {n: {"trials": t, "sdc": k, "sdc_rate": k / t, "ci95": list(wilson(k, t))} for n, (k, t) in
                counts.items()}
        red = {p: reduction(rows["unprotected"], rows[p]) for p in protections}
        if all(r["met"] for r in red.values()) or rows["unprotected"]["sdc"] == 0:
            break
    rows["reduction"] = red
    rows["detail_first_chunk"] = first
    return rows


def sdc_section(model: torch.nn.Module, data: Any, trials: dict[str, int], max_factor: int) -> dict[str, Any]:
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
    campaigns = {"weights_all_bits": ("all", {"bits": "all"}),
                 "weights_exponent_bits": ("exponent", {"bits": "exponent"}),
                 "activations_exponent_bits": ("activations", {"target": "activations", "bits": "exponent"})}
    for cname, (key, options) in campaigns.items():
        out[cname] = sized_campaign(model, data.test.x, protections, trials[key], trials[key] * max_factor,
                                    **options)
    return out


def int8_section(model: torch.nn.Module, data: Any, trials: int) -> dict[str, Any]:
    q = copy.deepcopy(model)
    sg.quantize_(q, sg.Int8DynamicConfig())
    rr = RangeRestriction(RangeRestrictionConfig(granularity="channel")).profile(q, data.train.x)
    layers = [n for n, m in q.named_modules() if hasattr(m, "weight_int8")]
    rows = {"clean_accuracy": accuracy(q, data.test)}
    rr.attach(q)
    rows["clean_accuracy_range_channel"] = accuracy(q, data.test)
    rr.detach()
    rows.update(sized_campaign(q, data.test.x, {"range_channel": rr}, trials, trials, bits="all", layers=layers))
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


def overhead_section(model: torch.nn.Module, data: Any, rounds: int = 20) -> dict[str, Any]:
    """Each protection on its own copy of the model (same weights), against the bare model: paired
    interleaved rounds (``compare_speed``), 1 pinned thread. A ratio below 1 is the protection's cost."""
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

        def with_contract(x: torch.Tensor = x) -> Any:
            contract.validate(x)
            return model(x)

        variants: dict[str, Any] = {
            "bare": lambda x=x: model(x),
            "range_restriction_channel": lambda x=x: m_rr(x),
            "checksums_every_call_all_tensors": lambda x=x: m_sum_all(x),
            "checksums_round_robin_1_tensor": lambda x=x: m_sum_rr(x),
            "contract_check": with_contract,
            "guard_contract_energy_monitor": lambda x=x: guard(x),
        }
        cmp = compare_speed(variants, baseline="bare", threads=1, rounds=rounds,
                            calls_per_round=20 if batch == 1 else 5, batch_size=batch)
        out[f"batch_{batch}"] = {name: cmp.to_dict(name) for name in variants if name != "bare"}
    return out


def cascade_section(model: torch.nn.Module, data: Any, rounds: int = 20) -> dict[str, Any]:
    """The cascade as a protection: dynamic-int8 copy first, the fp32 original for rows below a confidence
    threshold. The threshold is chosen on validation: the lowest of a grid whose cascade accuracy is within
    0.1 points of the fp32 model's. Then test accuracy of each (Wilson intervals), the fallback rate, and
    speed against each model alone at batch 64 (paired rounds)."""
    small = copy.deepcopy(model)
    sg.quantize_(small, sg.Int8DynamicConfig())
    grid = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
    val_large = accuracy(model, data.val)
    val = {t: accuracy(Cascade(small, model, threshold=t), data.val) for t in grid}
    threshold = next((t for t in grid if val[t] >= val_large - 0.001), grid[-1])
    cas = Cascade(small, model, threshold=threshold)
    hits = {"small_int8": correct(small, data.test), "large_fp32": correct(model, data.test),
            "cascade": correct(cas, data.test)}
    cas.rows = cas.fallback_rows = 0
    x = data.test.x[:64]
    cmp = compare_speed({"small_int8": small, "large_fp32": model, "cascade": cas}, x, baseline="cascade", threads=1,
                        rounds=rounds, calls_per_round=5)
    return {"threshold": threshold, "threshold_chosen_on": "validation", "val_accuracy_by_threshold": val,
            "test": [accuracy_row(k, v) for k, v in hits.items()], "fallback_rate_batch_64": cas.fallback_rate,
            "speed_cascade_over_small": cmp.to_dict("small_int8"),
            "speed_cascade_over_large": cmp.to_dict("large_fp32"), "batch": 64}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits-lenet5", "digits32-resnet"])
    ap.add_argument("--trials-all", type=int, default=6000)
    ap.add_argument("--trials-exponent", type=int, default=3000)
    ap.add_argument("--trials-activations", type=int, default=2000)
    ap.add_argument("--max-factor", type=int, default=4, help="campaigns grow up to this many times their size")
    ap.add_argument("--checksum-flips", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    trials = {"all": args.trials_all, "exponent": args.trials_exponent, "activations": args.trials_activations}
    env = environment(1, seed=SEED, trials=trials, max_factor=args.max_factor)
    cases, targets, summary = [], [], []
    for name in args.models:
        model = zoo.load(name, seed=SEED, progress=False).eval()
        data = sgdata.load(zoo.ZOO.get(name).data, seed=SEED)
        r: dict[str, Any] = {"model": name, "data": data.name, "params": sum(p.numel() for p in model.parameters())}
        r["sdc"] = sdc_section(model, data, trials, args.max_factor)
        if name == "digits-lenet5":
            r["int8_weights"] = int8_section(model, data, args.trials_all)
        r["checksums"] = checksum_section(model, args.checksum_flips, args.checksum_flips // 4)
        r["overhead"] = overhead_section(model, data)
        r["cascade"] = cascade_section(model, data)
        cases.append(r)
        s = r["sdc"]
        for c in ("weights_all_bits", "weights_exponent_bits"):
            red = s[c]["reduction"]["range_channel"]
            k, n = s[c]["range_channel"]["sdc"], s[c]["range_channel"]["trials"]
            targets.append(target(f"{name}: range restriction, {c.replace('_', ' ')}",
                                  f">= {TARGET_REDUCTION:g}x fewer SDCs (conservative bound)", red, red["met"]))
            summary.append(claim(f"{name}: range restriction, fewer silent corruptions ({c.replace('_', ' ')}; "
                                 f"{s[c]['unprotected']['sdc']} -> {k} of {n} flips; conservative bound)",
                                 red["conservative_bound"], unit="x", n=n))
        change = max(abs(v) for v in s["clean_accuracy_change_points"].values())
        targets.append(target(f"{name}: clean accuracy with range restriction", "unchanged within 0.1 points",
                              round(change, 3), change <= 0.1))
        c = r["checksums"]
        targets.append(target(f"{name}: checksums detect single flips and bursts", "100%",
                              f"{c['single_detected']}/{c['single_bit_flips']}, "
                              f"{c['burst_detected']}/{c['multi_bit_bursts']}", c["met"]))
        summary.append(claim(f"{name}: checksums detect single bit flips (%)", 100 * c["single_detection_rate"],
                             unit="%", ci95=[100 * v for v in c["single_ci95"]], n=c["single_bit_flips"]))
        print(f"{name}: " + "; ".join(f"{t['name']}: {t['got']}" for t in targets[-4:]))
    out = write_results("faults", env=env, cases=cases, targets=targets, summary=summary,
                        protocol="seeded paired bit-flip campaigns grown until the conservative reduction bound "
                                 "(lower CI unprotected / upper CI protected) supports the target or the trial cap; "
                                 "Wilson intervals; overhead by paired interleaved rounds, 1 thread; cascade "
                                 "threshold chosen on validation")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
