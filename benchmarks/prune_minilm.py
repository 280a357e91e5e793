"""all-MiniLM-L6-v2 with attention heads and FFN neurons removed, before any distillation.

``ChannelPruningConfig(ratio=0, head_ratio=h, ffn_ratio=f)`` cuts whole heads (query/key/value rows and the
attention-output columns) and FFN neurons (intermediate rows, output columns) in each of the 6 layers;
the hidden width (384) stays, so the embeddings keep their shape. Heads and neurons are ranked by
``wanda`` importance (weight times activation norm of what they write into the residual stream,
measured on the 256-sentence calibration split, not the test split). Measures, for a few (h, f) settings,
with seed 0 and 2 torch threads:
  * cosine similarity (mean and min) of the pruned model's embeddings to the original's on the
    ``docs-text`` test split (1046 sentences), no fine-tuning and no distillation;
  * speed ratio on PyTorch eager at batch 32 (max 128 tokens, padded to the batch's longest): paired
    interleaved rounds (``compare_speed``), 2 pinned threads, median ratio with a 95% bootstrap interval;
  * parameters, and that the pruned model saved as ``.slim`` loads back (heads / sizes restored) with
    the same embeddings.

Run: ``python benchmarks/prune_minilm.py [--rounds 15]``
Writes ``benchmarks/results/prune_minilm.json``.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SLIMGUARD_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import slimguard as sg  # noqa: E402
from _schema import claim, environment, target, write_results  # noqa: E402
from slimguard.evaluate import embedding_fidelity  # noqa: E402
from slimguard.runtime.measure import compare_speed, count_params  # noqa: E402

SEED = 0
# (head_ratio, ffn_ratio): 12 heads of 32 dims and 1536 FFN neurons per layer
SETTINGS = [(0.25, 0.25), (0.25, 0.5), (0.5, 0.5)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--importance", default="wanda")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    base = sg.load_model("minilm", progress=False).eval()
    data = sg.data.load("docs-text", seed=SEED)
    texts = list(data.test.x)
    batch = base.tokenize(texts[:32], max_length=128)
    candidates: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for h, f in SETTINGS:
        model = copy.deepcopy(base)
        cfg = sg.ChannelPruningConfig(ratio=0.0, head_ratio=h, ffn_ratio=f, importance=args.importance)
        info = sg.prune_(model, cfg, example_inputs=batch, data=data)  # wanda calibrates on data.calib
        model.eval()
        fid = embedding_fidelity(model, base, texts)
        name = f"heads-{h:g}_ffn-{f:g}"
        layer0 = info["blocks"]["encoder.encoder.layer.0"]
        rows.append({"name": name, "head_ratio": h, "ffn_ratio": f, "importance": args.importance,
                     "heads_per_layer": layer0["heads"], "ffn_per_layer": layer0["ffn"],
                     "params": count_params(model), **fid})
        candidates[name] = model
    fns = {"baseline": lambda: base(**batch)}
    fns.update({n: (lambda m=m: m(**batch)) for n, m in candidates.items()})
    cmp = compare_speed(fns, baseline="baseline", rounds=args.rounds, calls_per_round=1, threads=2, batch_size=32)
    for row in rows:
        row["speed_batch_32"] = cmp.to_dict(row["name"])

    # the middle setting goes through an artifact and back
    name = rows[1]["name"]
    with tempfile.TemporaryDirectory() as d:
        path = sg.save(candidates[name], Path(d) / "minilm-pruned.slim")
        back = sg.load(path)
        size = path.stat().st_size
    with torch.no_grad():
        a, b = candidates[name](**batch), back(**batch)
    sa = back.encoder.encoder.layer[0].attention.self
    roundtrip = {"setting": name, "file_bytes": size, "max_abs_diff": float((a - b).abs().max()),
                 "cosine_min": float(F.cosine_similarity(a, b, dim=-1).min()),
                 "layer0_heads": int(sa.num_attention_heads), "layer0_all_head_size": int(sa.all_head_size)}
    env = environment(2, seed=SEED, runtime=f"PyTorch {torch.__version__} eager, CPU", batch_size=32, max_length=128)
    cases = [{"baseline_params": count_params(base), "settings": rows, "artifact_roundtrip": roundtrip,
              "distillation": False, "finetuning": False}]
    ok = roundtrip["cosine_min"] > 0.9999
    targets = [target("pruned MiniLM saved and loaded back gives the same embeddings", "cosine min > 0.9999",
                      round(roundtrip["cosine_min"], 6), ok)]
    summary = []
    for r in rows:
        sp = r["speed_batch_32"]
        summary.append(claim(f"MiniLM heads -{r['head_ratio']:.0%}, FFN -{r['ffn_ratio']:.0%}, no distillation: "
                             f"faster at batch 32 (x; cosine mean {r['cosine_mean']:.3f}, min {r['cosine_min']:.3f})",
                             sp["ratio"], unit="x", ci95=sp["ci95"], n=sp["rounds"]))
    write_results("prune_minilm", env=env, cases=cases, targets=targets, summary=summary,
                  protocol="held-out docs-text test sentences; speed by paired interleaved rounds, 2 pinned threads")
    print(f"{'setting':22s} {'params':>10s} {'speed':>26s} {'cos mean':>9s} {'cos min':>8s}")
    for r in rows:
        print(f"{r['name']:22s} {r['params']:>10,} {r['speed_batch_32']['verdict']:>26s} {r['cosine_mean']:>9.4f} "
              f"{r['cosine_min']:>8.4f}")
    print(f"artifact round trip ({name}): max abs diff {roundtrip['max_abs_diff']:.2e}, {size:,} bytes")

if __name__ == "__main__":
    main()
