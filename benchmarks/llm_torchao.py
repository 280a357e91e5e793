"""slimguard's weight-only int8 side by side with torchao's, on docs-lm and a larger random Llama.

torchao is not a dependency; install it beside the pinned CPU torch to run this (``pip install torchao``; or,
to leave the project's environment untouched, ``pip install --no-deps --target DIR torchao`` and run with
``PYTHONPATH=DIR``). torchao 0.18's ``Int4WeightOnlyConfig`` needs the ``mslk`` package, which has no CPU
build here, so the int4 comparison is recorded as not available.

Measured, the same way for both libraries:
  * perplexity on docs-corpus test (the first ``--max-tokens`` tokens; sliding window 256, stride 128) of
    fp32, slimguard ``WeightOnlyConfig(bits=8)`` (per-row, ``_weight_int8pack_mm``) and torchao
    ``Int8WeightOnlyConfig()``;
  * decode speed: 16 greedy tokens with a KV cache after a 16-token prompt, paired interleaved rounds
    (``compare_speed``) against fp32, 1 thread, on docs-lm and on a randomly initialised Llama of hidden
    1024 (6 layers), where the weights dominate a decode step.

Run: ``python benchmarks/llm_torchao.py [--rounds 8]``; writes ``benchmarks/results/llm_torchao.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))
os.environ.setdefault("SLIMGUARD_QUIET", "1")

import slimguard as sg  # noqa: E402
from _schema import claim, environment, print_targets, target, write_results  # noqa: E402
from slimguard.data.corpus import load_corpus  # noqa: E402
from slimguard.lm.docs_lm import DocsLM, encode_documents  # noqa: E402
from slimguard.lm.generate import generate  # noqa: E402
from slimguard.lm.metrics import perplexity  # noqa: E402
from slimguard.runtime.measure import compare_speed  # noqa: E402

THREADS = 1


def variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """fp32, slimguard int8 weight-only and torchao int8 weight-only copies of ``model``."""
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.quantization import quantize_ as torchao_quantize

    ours = copy.deepcopy(model)
    sg.quantize_(ours, sg.WeightOnlyConfig(bits=8, group_size=0))
    theirs = copy.deepcopy(model)
    torchao_quantize(theirs, Int8WeightOnlyConfig())
    return {"fp32": model, "slimguard-int8": ours, "torchao-int8": theirs}


def decode_speed(models: dict[str, torch.nn.Module], prompt: torch.Tensor, rounds: int) -> dict[str, Any]:
    fns = {k: (lambda m=m: generate(m, prompt, 16)) for k, m in models.items()}
    cmp = compare_speed(fns, baseline="fp32", rounds=rounds, calls_per_round=1, warmup=1, threads=THREADS)
    return {k: cmp.to_dict(k) for k in models if k != "fp32"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    try:
        import torchao
    except ImportError:
        raise SystemExit("torchao is not installed: pip install torchao (see this script's docstring)") from None
    env = environment(THREADS, seed=0, torchao=torchao.__version__)
    model = sg.zoo.load("docs-lm")
    assert isinstance(model, DocsLM)
    stream = encode_documents(model.tokenizer, load_corpus("test"))[: args.max_tokens]
    docs = variants(model)
    ppl = {k: perplexity(m, stream, window=256, stride=128)["perplexity"] for k, m in docs.items()}
    for k, v in ppl.items():
        print(f"{k:16s} perplexity {v:.3f} ({v / ppl['fp32']:.4f}x fp32)", flush=True)
    torch.manual_seed(0)
    large = DocsLM(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_layers=6, num_heads=16,
                   num_kv_heads=4, max_positions=512).eval()
    g = torch.Generator().manual_seed(0)
    speed = {"docs-lm": decode_speed(docs, stream[:16], args.rounds),
             "llama-1024": decode_speed(variants(large), torch.randint(0, 8192, (16,), generator=g), args.rounds)}
    for where, rows in speed.items():
        for k, v in rows.items():
            print(f"{where:10s} {k:16s} decode vs fp32: {v['verdict']}", flush=True)
    big = speed["llama-1024"]
    ours, theirs = big["slimguard-int8"], big["torchao-int8"]
    cases = [{"model": "docs-lm", "tokens": int(stream.numel()), "perplexity": ppl,
              "ppl_vs_fp32": {k: round(v / ppl["fp32"], 5) for k, v in ppl.items()}},
             {"decode_speed_vs_fp32": speed, "threads": THREADS, "new_tokens": 16, "prompt_tokens": 16},
             {"torchao_int4": "not available: torchao 0.18's Int4WeightOnlyConfig needs the mslk package, which has "
                              "no CPU build here"}]
    targets = [target("slimguard int8 weight-only decode at least as fast as torchao's (llama-1024, 1 thread)",
                      "ratio of the two medians >= 1.0", round(ours["ratio"] / theirs["ratio"], 3),
                      ours["ratio"] >= theirs["ratio"]),
               target("slimguard int8 perplexity no worse than torchao int8 (docs-lm)", "<= torchao's",
                      {"slimguard": round(ppl["slimguard-int8"], 3), "torchao": round(ppl["torchao-int8"], 3)},
                      ppl["slimguard-int8"] <= ppl["torchao-int8"] + 1e-6)]
    summary = [claim("int8 weight-only decode vs fp32, llama-1024, 1 thread: slimguard", ours["ratio"], unit="x",
                     ci95=ours["ci95"], n=ours["rounds"]),
               claim("int8 weight-only decode vs fp32, llama-1024, 1 thread: torchao", theirs["ratio"], unit="x",
                     ci95=theirs["ci95"], n=theirs["rounds"]),
               claim("docs-lm perplexity vs fp32: slimguard int8 / torchao int8",
                     f"{ppl['slimguard-int8'] / ppl['fp32']:.4f} / {ppl['torchao-int8'] / ppl['fp32']:.4f}",
                     n=int(stream.numel()))]
    out = write_results("llm_torchao", env=env, cases=cases, targets=targets, summary=summary,
                        protocol="same models, tokens, prompts and threads for both libraries; decode speed by "
                                 "paired interleaved rounds against fp32 (compare_speed)")
    print_targets(targets)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
