"""JSON-able answers, one per item, from a guarded batch: class, label, confidence, scores and the guard verdict
(contract ok, OOD flag and score, whether the cascade's reference answered). Non-finite numbers become null,
so every answer is valid JSON."""

from __future__ import annotations

import math
from typing import Any

import torch


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def items_of(res: Any, fallback: torch.Tensor | None, class_names: list[str], ids: list[str]) -> list[dict[str, Any]]:
    """One JSON-able answer per row of a :class:`~slimguard.guard.GuardResult` (non-finite numbers as null).

    The tensors are turned into Python lists once each (``tolist`` is one C call), never read item by item.
    """
    pred = res.pred.tolist()
    conf = res.confidence.tolist()
    probs = res.probs.tolist()
    ood = res.ood.tolist() if res.ood is not None else [False] * len(pred)
    score = res.ood_score.tolist() if res.ood_score is not None else [None] * len(pred)
    fb = fallback.tolist() if fallback is not None else [False] * len(pred)
    out = []
    for i, p in enumerate(pred):
        out.append({"id": ids[i], "prediction": p, "label": class_names[p] if p < len(class_names) else str(p),
                    "confidence": _finite(conf[i]), "scores": [_finite(v) for v in probs[i]],
                    "guard": {"contract_ok": True, "ood": bool(ood[i]), "ood_score": _finite(score[i]),
                              "fallback": bool(fb[i])}})
    return out
