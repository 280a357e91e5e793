"""Integer kernels of slimguard's quantized Linear layers: the new path against the one it replaced.

Each case runs the *old* path, the *new* path and (for dynamic and static int8) plain float32 ``F.linear``
of one layer on the same input, in paired, interleaved rounds (threads pinned, warm-up first, the order
shuffled every round), and reports per round the ratio ``other time / new time`` (above 1: the new path is
faster): its median, a 95% bootstrap interval of that median, and the spread (min, quartiles, max). The
outputs of the old and new paths are compared too (SQNR in dB).

Cases (weights from a seeded ``nn.Linear``, inputs seeded Gaussian):
  * ``dynamic``: ``DynamicInt8Linear``. Old: fbgemm ``torch.ops.quantized.linear_dynamic`` (deprecated;
    per-batch 7-bit activations). New, default ``activations: row``: per-row int8 activations and
    ``torch._int_mm``; ``dynamic per-tensor`` (``activations: tensor``, like for like with the old kernel):
    one 8-bit scale per input, oneDNN's ``qlinear_pointwise`` with every scale and the bias fused (CPUs with
    VNNI; ``_int_mm`` elsewhere). MiniLM shapes at batch 32 x 128 tokens (4096 rows): 384->384, 384->1536,
    1536->384. The layers reuse the codes of an input they quantized last (sibling layers reading one
    tensor), so every path is timed on two alternating copies of the input. A fourth candidate, ``product``,
    calls the new layer on one tensor whose codes it made (untimed) just before: the product alone, which
    splits the new time into making the codes and the product (``breakdown`` in the JSON).
  * ``model``: all-MiniLM-L6-v2 on 32 docs-text validation texts (the search's timing batch; large
    products) and the zoo's digits-mlp on 64 digits images (64->300->100->10: small products, where the
    count of operators sets the time), with ``int8-dynamic`` in each mode against
    ``torch.ao.quantization.quantize_dynamic`` (the old kernel) and float32; the cosine of MiniLM's
    embeddings to float32's is recorded. Skipped with ``--no-models``.
  * ``static``: ``QuantLinear`` (static int8, min/max calibrated). Old: float emulation (fake-quantized
    input, dequantized weight, float ``F.linear``). New: ``torch._int_mm`` with exact int32 accumulation.
    Same MiniLM shapes.
  * ``weight-only int8`` (one scale per row) and ``int4`` (groups of 64): ``WeightOnlyLinear``. Old: float
    ``F.linear`` with the cached dequantized weight (float speed). New: ``_weight_int8pack_mm`` /
    ``_weight_int4pack_mm_for_cpu`` with bfloat16 activations; above 128 rows both keep the float path.
    Decoder-like shapes 1024->4096 and 4096->1024, decode (M = 1, 8) and prefill (M = 512).
  * ``compiled``: the dynamic and static 384->1536 cases again with the new layer under ``torch.compile``
    (which fuses the elementwise quantize / rescale steps); skipped with ``--no-compile``.
  * ``dynamic alternative`` (``--alternatives``): maintained paths tried in place of the shipped dynamic int8
    one, each against the old kernel and against the shipped path (``cur``): ``onednn::qlinear_pointwise``
    with per-row or per-tensor uint8 activations, ``torch.compile``. Recorded, not
    shipped, and outside the targets.

Targets: no like-for-like case significantly slower than the old path (upper end of the 95% interval
>= 1.0; per-row dynamic int8, more faithful than the kernel it replaced, has the same target on its own; the
weight-only cases above 128 rows run the same float product on both sides, so they are A/A controls of the
machine's noise and have their own target, median within 5% of 1.0); MiniLM's embeddings closer to float32
than the old path's in both modes;
weight-only decode (M <= 8) >= 1.3x, the project's target for int8 weight-only decode against fp32; static
int8 Linear faster than its float emulation and dynamic int8 faster than float32 (medians > 1.0).

Threads: every case runs with ``torch.set_num_threads(2)`` (the protocol), then again with 1 thread as a
control. The machine is shared (other jobs on its 2 cores): a preempted thread stalls every parallel
region it belongs to, which hurts paths made of many small operators more than one fused operator, so
the 1-thread run separates what the kernels cost from what the contention costs. Absolute times are noisy
and recorded only for scale; the JSON says it was measured under load and records the load average.

Allocator: the script runs itself under ``GLIBC_TUNABLES`` that keep freed memory in the process (see
:func:`_pin_allocator`). With glibc's defaults a freed block of a few megabytes may go back to the system and
the next one comes back as page faults, hundreds per call of a 4096-row layer, in numbers that depend on the
whole process's allocation history: the same code measured 0.73x in one run and 1.17x in the next. The JSON
records the page faults each path still pays per call; ``--default-allocator`` measures with the defaults.

Writes ``benchmarks/results/int8_kernels.json``. Runs in about 2-3 minutes.

Run: ``python benchmarks/int8_kernels.py [--rounds 15] [--threads 2,1] [--no-compile] [--no-models]
[--alternatives] [--default-allocator]``
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import random
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("SLIMGUARD_QUIET", "1")
from _schema import claim, environment, write_results
from slimguard.quantize.dynamic import DynamicInt8Linear
from slimguard.quantize.observers import sqnr
from slimguard.quantize.qmodules import QuantLinear, convert_fake_quant, insert_fake_quant
from slimguard.quantize.weight_only import WeightOnlyLinear

OUT = Path(__file__).parent / "results" / "int8_kernels.json"
SEED = 0
MINILM = [(384, 384), (384, 1536), (1536, 384)]
DECODER = [(1024, 4096), (4096, 1024)]
TOKENS = 32 * 128
MIN_MEASURE_S = 0.01  # repeat fast calls within one timing so each measurement spans at least this
BOOTSTRAP = 2000


# ---- the paired protocol -----------------------------------------------------------------------------
def _timed(fn: Callable[[], Any], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _summary(ratios: list[float]) -> dict[str, Any]:
    rng = random.Random(SEED)
    boots = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(BOOTSTRAP))
    q = statistics.quantiles(ratios, n=4)
    return {"median": round(statistics.median(ratios), 3),
            "ci95": [round(boots[int(0.025 * BOOTSTRAP)], 3), round(boots[int(0.975 * BOOTSTRAP) - 1], 3)],
            "spread": {"min": round(min(ratios), 3), "q1": round(q[0], 3), "q3": round(q[2], 3),
                       "max": round(max(ratios), 3)}}


def paired(candidates: dict[str, Callable[[], Any]], rounds: int, warmup: int = 3) -> dict[str, Any]:
    """Interleaved rounds over the same input (order shuffled per round, seeded); per round, the ratio of
    every other candidate's time to ``new``'s time (above 1: ``new`` is faster). A candidate with a ``setup``
    attribute has it called, untimed, before each of its timings; minor page faults are counted per call."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    probe = min(_timed(fn, 1) for fn in candidates.values())
    inner = max(1, min(200, math.ceil(MIN_MEASURE_S / max(probe, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in candidates}
    faults = dict.fromkeys(candidates, 0)
    order = list(candidates)
    rng = random.Random(SEED)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            setup = getattr(candidates[name], "setup", None)  # untimed, right before the timing
            if setup is not None:
                setup()
            f0 = _minor_faults()
            times[name].append(_timed(candidates[name], inner))
            faults[name] += _minor_faults() - f0
    out: dict[str, Any] = {f"{name}_ms_median": round(statistics.median(t) * 1e3, 4) for name, t in times.items()}
    out["page_faults_per_call"] = {name: round(f / (rounds * inner), 1) for name, f in faults.items()}
    for name in candidates:
        if name != "new":
            out[f"ratio_{name}_over_new"] = _summary([a / b for a, b in zip(times[name], times["new"], strict=True)])
    out.update(rounds=rounds, calls_per_measurement=inner)
    return out


# ---- the cases ---------------------------------------------------------------------------------------
Case = tuple[dict[str, Callable[[], Any]], str]


def _linear(k: int, n: int) -> nn.Linear:
    torch.manual_seed(SEED)
    return nn.Linear(k, n).eval()


def _input(m: int, k: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(SEED + 1))


def _maybe_compiled(layer: nn.Module, compiled: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    # torch.compile fuses the quantize and rescale steps around the integer product
    return torch.compile(layer) if compiled else layer


def _alternating(x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Two tensors holding ``x``, handed out in turn. The dynamic layers keep the codes of the last input
    they quantized (sibling layers reading one tensor quantize it once); a layer timed on one tensor over
    and over would skip quantizing, so every path is timed on alternating copies."""
    return itertools.cycle([x, x.clone()]).__next__


def old_dynamic(layer: DynamicInt8Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """The removed fbgemm operator on ``layer``'s own int8 weight (per-batch 7-bit activations)."""
    with warnings.catch_warnings():  # the deprecated path is the baseline being replaced
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(layer.weight_int8, layer.weight_scale.double(),
                                                      torch.zeros(layer.out_features, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qw, None if layer.bias is None else layer.bias.detach())
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)


def dynamic_case(k: int, n: int, compiled: bool = False, activations: str = "row") -> Case:
    from slimguard.quantize.kernels import ONEDNN_INT8

    lin = _linear(k, n)
    layer = DynamicInt8Linear.from_float(lin, activations)
    run = _maybe_compiled(layer, compiled)
    old = old_dynamic(layer)
    x = _input(TOKENS, k)
    x_old, x_new, x_fp32 = _alternating(x), _alternating(x), _alternating(x)
    path = ("per-row int8 x int8 _int_mm" if activations == "row" else
            "per-tensor uint8 x int8 onednn::qlinear_pointwise, scales and bias fused" if ONEDNN_INT8 else
            "per-tensor int8 x int8 _int_mm") + (", torch.compile" if compiled else "")
    candidates = {"old": lambda: old(x_old()), "new": lambda: run(x_new()), "fp32": lambda: lin(x_fp32())}
    if not compiled:  # the same tensor every call, its codes made (untimed) just before: the product alone
        def product() -> torch.Tensor:
            return run(x)

        product.setup = product  # type: ignore[attr-defined]
        candidates["product"] = product
    return candidates, path


def model_case(name: str, activations: str) -> Case:
    """A model with ``int8-dynamic`` in one mode against PyTorch's deprecated ``quantize_dynamic`` (the removed
    kernel) and float32: ``minilm``, all-MiniLM-L6-v2 on 32 docs-text validation texts (the search's timing
    batch; large products), or ``digits-mlp``, the zoo MLP on 64 digits test images (small products)."""
    import slimguard as sg
    from slimguard.evaluate import timing_inputs

    if name == "minilm":
        model = sg.models.load_model("minilm").eval()
        inputs: Any = timing_inputs(sg.data.load("docs-text", seed=SEED).val, 32, reference=model)
    else:
        model = sg.zoo.load(name, seed=SEED, progress=False).eval()
        inputs = {"input": sg.data.load("digits", seed=SEED).test.x[:64]}
    new = copy.deepcopy(model)
    sg.quantize_(new, sg.Int8DynamicConfig(activations=activations))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    path = f"slimguard int8-dynamic, activations: {activations}"
    return {"old": lambda: old(**inputs), "new": lambda: new(**inputs), "fp32": lambda: model(**inputs)}, path


def static_case(k: int, n: int, compiled: bool = False) -> Case:
    lin = _linear(k, n)
    model = nn.Sequential(copy.deepcopy(lin))
    x = _input(TOKENS, k)
    insert_fake_quant(model, ignore=[], weight_bits=8, observer="minmax", fuse_bn=False)
    model[0].fake_quant_enabled = False
    model(x[:1024])
    convert_fake_quant(model)
    layer = model[0]
    assert isinstance(layer, QuantLinear)
    run = _maybe_compiled(layer, compiled)
    path = "uint8 x int8 _int_mm" + (", torch.compile" if compiled else "")
    return {"old": lambda: layer._run(x, F.linear), "new": lambda: run(x), "fp32": lambda: lin(x)}, path


def _row_scales(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = torch.maximum(x.amax(1, keepdim=True), x.amin(1, keepdim=True).neg_()).clamp_min_(1e-30)
    return 127.0 / amax, amax / 127.0


def _onednn(q: torch.Tensor, x_scale: float, packed: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    # uint8 activations with zero point 128 (oneDNN's int8 activations take a reference loop: seconds per call)
    zeros = torch.zeros(w_scale.shape[0], dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise(q, x_scale, 128, packed, w_scale, zeros, bias, 1.0, 0, torch.float32,
                                              "none", [], "")


def alternative_case(alt: str, k: int, n: int) -> Case:
    """One maintained alternative to the shipped dynamic int8 path (``cur``), against the removed kernel (``old``).

    * ``onednn-row``: per-row int8 codes shifted to uint8 (XOR 128, zero point 128), ``onednn::qlinear_pointwise``
      with the weight scale fused; row scale and bias applied after (one ``addcmul``).
    * ``onednn-tensor``: one symmetric scale for the whole input, everything fused into ``qlinear_pointwise``,
      codes made by ``mul``, ``round``, a cast and an XOR (the shipped ``activations: tensor`` makes them in
      one pass and a cast, see :mod:`slimguard.quantize.kernels`).
    * ``compiled``: the shipped functional path under ``torch.compile`` (inductor fuses the elementwise passes).
    """
    from slimguard.quantize.kernels import int8_linear_dynamic

    candidates, _ = dynamic_case(k, n)
    lin = _linear(k, n)
    layer = DynamicInt8Linear.from_float(lin)
    w8, ws, bias = layer.weight_int8, layer.weight_scale, layer.bias.detach()
    nxt = _alternating(_input(TOKENS, k))  # as the shipped path is timed: a cold input every call
    packed = torch.ops.onednn.qlinear_prepack(w8, None)
    fn: Callable[[], Any]
    if alt == "onednn-row":
        def fn() -> torch.Tensor:
            x = nxt()
            inv, row_scale = _row_scales(x)
            q = torch.mul(x, inv).round_().to(torch.int8).view(torch.uint8).bitwise_xor_(128)
            y = _onednn(q, 1.0, packed, ws, None)
            return torch.addcmul(bias, y, row_scale, out=y)
        path = "onednn qlinear_pointwise, per-row uint8 codes, weight scale fused"
    elif alt == "onednn-tensor":
        def fn() -> torch.Tensor:
            x = nxt()
            amax = max(float(x.amax()), -float(x.amin()), 1e-30)
            q = torch.mul(x, 127.0 / amax).round_().to(torch.int8).view(torch.uint8).bitwise_xor_(128)
            return _onednn(q, amax / 127.0, packed, ws, bias)
        path = "onednn qlinear_pointwise, per-tensor uint8, scales and bias fused"
    elif alt == "compiled":
        compiled = torch.compile(lambda t: int8_linear_dynamic(t, w8, ws, bias))
        t0 = time.perf_counter()
        compiled(nxt())
        path = f"_int_mm path under torch.compile (first call {time.perf_counter() - t0:.1f} s)"

        def fn() -> torch.Tensor:
            return compiled(nxt())
    else:
        raise ValueError(alt)
    return {"old": candidates["old"], "new": fn, "current": candidates["new"], "reference": candidates["fp32"]}, path


ALTERNATIVES = ("onednn-row", "onednn-tensor", "compiled")


def weight_only_case(bits: int, k: int, n: int, m: int) -> Case:
    from slimguard.quantize.kernels import WEIGHT_ONLY_MAX_ROWS

    layer = WeightOnlyLinear.from_float(_linear(k, n), bits, 0 if bits == 8 else 64)
    x = _input(m, k)
    path = (f"float (above {WEIGHT_ONLY_MAX_ROWS} rows)" if m > WEIGHT_ONLY_MAX_ROWS
            else f"{layer.kernel()} weight-only kernel, bf16 activations")
    # the old path is float32 F.linear with the cached dequantized weight: it is also the fp32 reference
    return {"old": lambda: F.linear(x, layer.weight_2d(), layer.bias), "new": lambda: layer(x)}, path


@torch.no_grad()
def measure(name: str, build: Callable[[], Case], rounds: int, **info: Any) -> dict[str, Any]:
    candidates, path = build()
    reference = candidates.pop("reference", None)  # float32, for SQNR only (not timed)
    old, new = candidates["old"](), candidates["new"]()
    result = {"case": name, **info, "new_path": path, "sqnr_new_vs_old_db": round(sqnr(old, new), 1)}
    if "fp32" in candidates or reference is not None:  # how close each path is to float32
        ref = (reference or candidates["fp32"])()
        result.update(sqnr_old_vs_fp32_db=round(sqnr(ref, old), 1), sqnr_new_vs_fp32_db=round(sqnr(ref, new), 1))
        if info.get("model") == "minilm":  # sentence embeddings: cosine to float32's, as the embedder is judged
            for side, out in (("old", old), ("new", new)):
                cos = F.cosine_similarity(out, ref, dim=-1)
                result[f"cosine_{side}_vs_fp32"] = {"mean": round(float(cos.mean()), 4),
                                                    "min": round(float(cos.min()), 4)}
    result.update(paired(candidates, rounds))
    if "product_ms_median" in result:  # where the new path's time goes (ratios of medians, for information)
        result["breakdown"] = {
            "product_share_of_new": round(result["ratio_product_over_new"]["median"], 3),
            "codes_share_of_new": round(1 - result["ratio_product_over_new"]["median"], 3),
            "old_over_product_alone": round(result["old_ms_median"] / result["product_ms_median"], 3)}
    return result


def run_cases(threads: int, rounds: int, compiled: bool, t_start: float,
              alternatives: bool = False, models: bool = True) -> list[dict[str, Any]]:
    """Every case at ``threads`` intra-op threads (and the dynamic int8 alternatives when asked)."""
    torch.set_num_threads(threads)
    cases = []

    def add(name: str, build: Callable[[], Case], **info: Any) -> None:
        cases.append(measure(name, build, rounds, threads=threads, **info))

    for k, n in MINILM:
        add(f"dynamic {k}->{n}", lambda k=k, n=n: dynamic_case(k, n), kind="dynamic", rows=TOKENS, k=k, n=n,
            old_path="fbgemm quantized::linear_dynamic", activations="row")
    for k, n in MINILM:
        add(f"dynamic per-tensor {k}->{n}", lambda k=k, n=n: dynamic_case(k, n, activations="tensor"),
            kind="dynamic", rows=TOKENS, k=k, n=n, old_path="fbgemm quantized::linear_dynamic", activations="tensor")
    if models:
        for model, label, rows in (("minilm", "MiniLM", "32 texts"), ("digits-mlp", "digits-mlp", "64 images")):
            for activations in ("row", "tensor"):
                add(f"model {label} dynamic per-{activations}", lambda m=model, a=activations: model_case(m, a),
                    kind="model", model=model, rows=rows, old_path="torch.ao quantize_dynamic (fbgemm)",
                    activations=activations)
    for k, n in MINILM:
        add(f"static {k}->{n}", lambda k=k, n=n: static_case(k, n), kind="static", rows=TOKENS, k=k, n=n,
            old_path="float emulation")
    if compiled:  # one shape each: what torch.compile adds (compiling takes ~20 s per case, once)
        k, n = MINILM[1]
        add(f"dynamic {k}->{n} compiled", lambda: dynamic_case(k, n, True), kind="dynamic (torch.compile)",
            rows=TOKENS, k=k, n=n, old_path="fbgemm quantized::linear_dynamic", activations="row")
        add(f"static {k}->{n} compiled", lambda: static_case(k, n, True), kind="static (torch.compile)",
            rows=TOKENS, k=k, n=n, old_path="float emulation")
    if alternatives:  # maintained paths measured against the removed kernel, not shipped
        for alt in ALTERNATIVES:
            for k, n in MINILM:
                add(f"dynamic {k}->{n} alt {alt}", lambda a=alt, k=k, n=n: alternative_case(a, k, n),
                    kind="dynamic alternative", alternative=alt, rows=TOKENS, k=k, n=n,
                    old_path="fbgemm quantized::linear_dynamic")
    from slimguard.quantize.kernels import WEIGHT_ONLY_MAX_ROWS

    for bits in (8, 4):
        for k, n in DECODER:
            for m in (1, 8, 512):
                # above WEIGHT_ONLY_MAX_ROWS the layer runs the very float product it is compared with: an A/A
                # control, whose interval shows the noise of the machine rather than a difference of paths
                add(f"weight-only int{bits} {k}->{n} M={m}", lambda b=bits, k=k, n=n, m=m: weight_only_case(b, k, n, m),
                    kind=f"weight-only int{bits}", rows=m, k=k, n=n,
                    old_path="float F.linear, cached dequantized weight", same_path=m > WEIGHT_ONLY_MAX_ROWS)
    print(f"  ... {threads} thread(s): {len(cases)} cases, {time.perf_counter() - t_start:.0f} s", flush=True)
    return cases


def _ratio(c: dict[str, Any], other: str = "old") -> dict[str, Any]:
    return c[f"ratio_{other}_over_new"]


def targets_for(cases: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    def target(name: str, want: str, got: Any, met: bool) -> dict[str, Any]:
        return {"name": f"{name} ({label})", "want": want, "got": got, "met": bool(met)}

    decode = [c for c in cases if c["kind"].startswith("weight-only") and c["rows"] <= 8]
    static = [c for c in cases if c["kind"] == "static"]
    dynamic = [c for c in cases if c["kind"] == "dynamic"]
    models = [c for c in cases if c["kind"] == "model"]
    controls = [c for c in cases if c.get("same_path")]
    # like for like: the same kind of quantization as the path replaced (per-row dynamic int8 is more
    # faithful than the per-batch 7-bit kernel it replaced, and has its own target below)
    alike = [c for c in cases if not c.get("same_path") and c["kind"] != "dynamic alternative"
             and c.get("activations") != "row"]
    per_row = [c for c in cases if c.get("activations") == "row"]

    def not_slower(group: list[dict[str, Any]]) -> tuple[Any, bool]:
        slow = {c["case"]: _ratio(c)["ci95"] for c in group if _ratio(c)["ci95"][1] < 1.0}
        return slow or "none below", not slow

    out = [
        target("no like-for-like case significantly slower than the path it replaced",
               "upper end of the 95% interval >= 1.0", *not_slower(alike)),
        target("per-row dynamic int8 (the default) not significantly slower than the removed per-batch kernel, "
               "layers and MiniLM", "upper end of the 95% interval >= 1.0", *not_slower(per_row)),
        target("A/A controls (weight-only above the row limit: the same float product on both sides) within noise",
               "median ratio within 0.95..1.05", {c["case"]: _ratio(c)["median"] for c in controls},
               all(0.95 <= _ratio(c)["median"] <= 1.05 for c in controls)),
        target("weight-only decode (M <= 8) against float32", "median ratio >= 1.3 in every decode case",
               {c["case"]: _ratio(c)["median"] for c in decode}, all(_ratio(c)["median"] >= 1.3 for c in decode)),
        target("static int8 Linear against its float emulation", "median ratio > 1.0 in every case",
               {c["case"]: _ratio(c)["median"] for c in static}, all(_ratio(c)["median"] > 1.0 for c in static)),
        target("dynamic int8 Linear against float32 F.linear", "median ratio > 1.0 in every case",
               {c["case"]: _ratio(c, "fp32")["median"] for c in dynamic},
               all(_ratio(c, "fp32")["median"] > 1.0 for c in dynamic)),
    ]
    minilm = [c for c in models if c["model"] == "minilm"]
    if minilm:
        out.append(target("MiniLM dynamic int8 closer to float32 than torch.ao quantize_dynamic, both modes",
                          "mean cosine to fp32 above the old path's",
                          {c["case"]: [c["cosine_new_vs_fp32"]["mean"], c["cosine_old_vs_fp32"]["mean"]]
                           for c in minilm},
                          all(c["cosine_new_vs_fp32"]["mean"] > c["cosine_old_vs_fp32"]["mean"] for c in minilm)))
    return out


#: glibc's allocator keeps freed blocks instead of returning them to the system (see _pin_allocator)
ALLOCATOR_TUNABLES = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296"


def _pin_allocator() -> None:
    """Run this script again under :data:`ALLOCATOR_TUNABLES` (Linux with glibc), unless it already is.

    With glibc's defaults, a freed block of a few megabytes may go back to the system, and the next
    allocation of that size comes back as page faults (350-1000 per call of a 4096 x 384 layer, a sixth of
    its time or more). How many depends on the allocation history of the whole process, so the ratio of
    two paths moved between 0.73x and 1.17x from one run of the same code to the next. Keeping freed blocks
    (as jemalloc and tcmalloc do, the allocators usually advised for CPU inference) takes that out for every
    path alike; the JSON records the faults each path still pays per call.
    """
    if os.environ.get("GLIBC_TUNABLES") == ALLOCATOR_TUNABLES or not sys.platform.startswith("linux"):
        return
    os.environ["GLIBC_TUNABLES"] = ALLOCATOR_TUNABLES
    os.execv(sys.executable, [sys.executable, *sys.argv])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="paired rounds per case (default 15)")
    ap.add_argument("--threads", default="2,1",
                    help="thread counts, comma-separated (default 2,1: the protocol's 2, then 1 as a control "
                         "that other jobs on a shared 2-core machine disturb less)")
    ap.add_argument("--no-compile", action="store_true", help="skip the two torch.compile cases")
    ap.add_argument("--no-models", action="store_true", help="skip the MiniLM model cases (they load the zoo model)")
    ap.add_argument("--alternatives", action="store_true",
                    help="also measure the maintained alternatives to the dynamic int8 path (oneDNN qlinear per row "
                         "and per tensor, torch.compile) at every thread count")
    ap.add_argument("--default-allocator", action="store_true",
                    help="keep glibc's default allocator settings (page faults then vary from run to run)")
    args = ap.parse_args()
    if not args.default_allocator:
        _pin_allocator()
    thread_counts = [int(t) for t in args.threads.split(",")]
    t_start = time.perf_counter()
    env = environment(thread_counts, seed=SEED, allocator=os.environ.get("GLIBC_TUNABLES") or "glibc defaults")
    cases: list[dict[str, Any]] = []
    targets: list[dict[str, Any]] = []
    for i, threads in enumerate(thread_counts):
        run = run_cases(threads, args.rounds, compiled=not args.no_compile and i == 0, t_start=t_start,
                        alternatives=args.alternatives, models=not args.no_models)
        cases += run
        targets += targets_for(run, f"{threads} thread{'s' if threads > 1 else ''}"
                               + (", control" if i else ""))
    env["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    env["wall_s"] = round(time.perf_counter() - t_start, 1)
    first = [c for c in cases if c["threads"] == thread_counts[0]]

    def row(case: str, other: str, words: str) -> dict[str, Any]:
        c = next(c for c in first if c["case"] == case)
        r = _ratio(c, other)
        return claim(f"{words} ({thread_counts[0]} threads)", r["median"], unit="x", ci95=r["ci95"],
                     n=c["rounds"])

    summary = [row("dynamic 384->384", "old", "dynamic int8 384->384, per row: _int_mm vs the removed fbgemm kernel"),
               row("dynamic 384->1536", "old", "dynamic int8 384->1536, per row: _int_mm vs the removed fbgemm kernel"),
               row("dynamic 1536->384", "old", "dynamic int8 1536->384, per row: _int_mm vs the removed fbgemm kernel"),
               row("dynamic per-tensor 384->384", "old", "dynamic int8 384->384, per tensor: vs the removed kernel"),
               row("dynamic per-tensor 384->1536", "old", "dynamic int8 384->1536, per tensor: vs the removed kernel"),
               row("dynamic per-tensor 1536->384", "old", "dynamic int8 1536->384, per tensor: vs the removed kernel"),
               *([row(f"model {m} dynamic per-{a}", "old",
                      f"{m} int8-dynamic per {a} vs torch.ao quantize_dynamic (the removed kernel)")
                  for m in ("MiniLM", "digits-mlp") for a in ("row", "tensor")] if not args.no_models else []),
               row("static 384->1536", "old", "static int8 384->1536 in PyTorch (_int_mm) vs its float emulation"),
               row("weight-only int8 1024->4096 M=1", "old", "weight-only int8 decode (M=1) vs float32"),
               row("weight-only int4 1024->4096 M=1", "old", "weight-only int4 decode (M=1) vs float32")]
    write_results("int8_kernels", env=env, cases=cases, targets=targets, summary=summary,
                  protocol=f"other time / new time per round (> 1: new is faster); {args.rounds} paired rounds, "
                           f"3 warm-up rounds, order shuffled per round (seeded), {BOOTSTRAP} bootstrap resamples")
    print(f"{'case':34s} {'thr':>3s} {'old/new':>7s} {'95% interval':>14s} {'min..max':>11s} {'fp32/new':>8s} "
          f"{'SQNR':>5s}  new path")
    for c in cases:
        r = _ratio(c)
        fp32 = (f"{c['ratio_fp32_over_new']['median']:8.2f}" if "ratio_fp32_over_new" in c
                else f"cur {c['ratio_current_over_new']['median']:4.2f}" if "ratio_current_over_new" in c
                else f"{'=old':>8s}")
        print(f"{c['case']:34s} {c['threads']:3d} {r['median']:7.2f} [{r['ci95'][0]:5.2f},{r['ci95'][1]:5.2f}] "
              f"{r['spread']['min']:4.2f}..{r['spread']['max']:4.2f} {fp32} {c['sqnr_new_vs_old_db']:5.1f}  "
              f"{c['new_path']}")
    for c in cases:
        if "breakdown" in c:
            b = c["breakdown"]
            print(f"{c['case']:34s} {c['threads']:3d} making the codes {b['codes_share_of_new']:4.0%} of the new time; "
                  f"the product alone {b['old_over_product_alone']:.2f}x the old kernel's whole call")
    for t in targets:
        print(f"target {'met' if t['met'] else 'MISSED'}: {t['name']} ({t['want']})")
    print(f"wrote results/int8_kernels.json in {env['wall_s']} s")


if __name__ == "__main__":
    main()
