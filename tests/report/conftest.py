"""A realistic ``metrics.json`` with every section the report draws, shaped as ``compress`` writes it.

The numbers come from a run of ``zoo:digits-mlp`` on ``digits`` (magnitude 50%, one fine-tuning epoch,
dynamic int8) with the accuracy lowered by 6 points, so that the budget is missed and the zoomed accuracy
axis has something to show. ``speed`` and ``layers`` are as :mod:`slimguard.pipeline` documents them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any

import pytest

FINETUNE = {"epochs": 1, "lr": 0.001, "batch_size": 64, "optimizer": "adamw", "weight_decay": 0.0, "patience": 3,
            "restore_best": True, "label_smoothing": 0.0, "seed": 0, "max_steps": 0}
MAGNITUDE = {"sparsity": 0.5, "scope": "global", "ignore": [], "overrides": {}, "importance": "l1"}
INT8 = {"ignore": [], "min_features": 0}


def _tensor(name: str, shape: list[int], dtype: str, nonzero: int, codec: str, stored: int) -> dict[str, Any]:
    params = 1
    for d in shape:
        params *= d
    return {"tensor": name, "module_type": "DynamicInt8Linear" if name[0] != "0" else "Normalize",
            "shape": shape, "dtype": dtype, "params": params, "nonzero": nonzero,
            "sparsity": 1 - nonzero / params, "codec": codec,
            "bits_per_weight": round(8 * stored / params, 3), "stored_bytes": stored}


TENSORS = [
    _tensor("0.mean", [1, 1, 1, 1], "float32", 1, "dense", 4),
    _tensor("0.std", [1, 1, 1, 1], "float32", 1, "dense", 4),
    _tensor("2.bias", [300], "float32", 300, "dense", 1200),
    _tensor("2.weight_int8", [300, 64], "int8", 12723, "sparse", 15123),
    _tensor("2.weight_scale", [300], "float32", 300, "dense", 1200),
    _tensor("4.bias", [100], "float32", 100, "dense", 400),
    _tensor("4.weight_int8", [100, 300], "int8", 11716, "sparse", 15466),
    _tensor("4.weight_scale", [100], "float32", 100, "dense", 400),
    _tensor("6.bias", [10], "float32", 10, "dense", 40),
    _tensor("6.weight_int8", [10, 100], "int8", 661, "sparse", 786),
    _tensor("6.weight_scale", [10], "float32", 10, "dense", 40),
]

FULL_RESULT: dict[str, Any] = {
    "recipe": {"name": "small", "model": "zoo:digits-mlp", "data": "digits", "task": "classification", "seed": 0,
               "budget": {"max_accuracy_drop": 1.0},
               "steps": [{"magnitude": MAGNITUDE}, {"finetune": FINETUNE}, {"int8-dynamic": INT8}]},
    "baseline": {"accuracy": 0.9777777791023254, "params": 50610, "nonzero_params": 50610, "size_bytes": 188497,
                 "macs": 50200, "latency_ms_p50": 0.037470500046765665, "latency_ms_p95": 0.13785194992124153,
                 "throughput_per_s": 26687.660926647197, "latency_batch": 1},
    "compressed": {"accuracy": 0.9166666865348816, "params": 50610, "nonzero_params": 25510, "size_bytes": 35167,
                   "macs": 50200, "latency_ms_p50": 0.37068850002033287, "latency_ms_p95": 7.168718499678982,
                   "throughput_per_s": 2698.625507171703, "latency_batch": 1},
    "budget": {"accuracy_drop_points": 6.111110746860504, "max_accuracy_drop": {"limit": 1.0, "ok": False},
               "ok": False},
    "steps": [
        {"step": "magnitude", "config": MAGNITUDE,
         "result": {"sparsity_by_layer": {"2": 0.3373437523841858, "4": 0.6094666719436646, "6": 0.33899998664855957}}},
        {"step": "finetune", "config": FINETUNE,
         "result": {"epochs": [{"epoch": 0, "train_loss": 0.0366857868648637, "val_score": 0.9693593314763231}],
                    "best_epoch": 0, "steps": 17, "best_val_score": 0.9693593314763231}},
        {"step": "int8-dynamic", "config": INT8, "result": {"quantized": ["2", "4", "6"], "kept_float": []}},
    ],
    "speed": {"ratio": 0.9712, "ci95": [0.9321, 1.0154], "spread": [0.8815, 1.0732], "batch_size": 64,
              "threads": 1, "rounds": 15, "calls_per_round": 20, "warmup": 10, "seed": 0,
              "verdict": "no measurable difference", "median_ms": {"baseline": 0.4127, "compressed": 0.4249},
              "per_round": [0.9712, 0.9321, 1.0154, 0.8815, 1.0732, 0.9654, 0.9901, 0.9588, 0.9833, 0.9712,
                            0.9456, 1.0021, 0.9689, 0.9777, 0.9602],
              "machine": {"cpu": "AMD EPYC 7B13 64-Core Processor", "cores": 2, "logical_cpus": 2,
                          "usable_cpus": 2, "threads": 1, "torch": "2.13.0", "cpu_capability": "AVX2", "avx2": True,
                          "avx512_vnni": False, "gpu": None}},
    "layers": {"tensors": TENSORS, "totals": {"params": sum(t["params"] for t in TENSORS),
                                              "nonzero": sum(t["nonzero"] for t in TENSORS),
                                              "stored_bytes": sum(t["stored_bytes"] for t in TENSORS),
                                              "file_bytes": 35167}},
    "accepted": False, "artifact": "out/model.rejected.slim", "metrics_file": "out/metrics.rejected.json",
    "report": "out/report.rejected.html",
}


@pytest.fixture
def full_result() -> dict[str, Any]:
    """A fresh deep copy of :data:`FULL_RESULT` (tests may change it)."""
    return copy.deepcopy(FULL_RESULT)


BLOCKS = {"p", "div", "td", "th", "tr", "table", "h1", "h2", "li", "figure", "title"}


class _Text(HTMLParser):
    """The text a reader sees, as a browser's ``innerText`` (blocks apart, styles left out), whitespace collapsed."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self._skip += tag in ("style", "script")
        self.parts.append(" " if tag in BLOCKS else "")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("style", "script")
        self.parts.append(" " if tag in BLOCKS else "")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def text_of(page: str) -> str:
    """The page's visible text (see :class:`_Text`)."""
    parser = _Text()
    parser.feed(page)
    return re.sub(r"\s+", " ", "".join(parser.parts))


@pytest.fixture
def page_text() -> Callable[[str], str]:
    """:func:`text_of`: the visible text of a page, to assert on what a reader sees."""
    return text_of
