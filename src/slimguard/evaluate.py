"""``sg.evaluate``: one call that scores a model and says what it costs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.errors import DataError, ModelError
from slimguard.core.torch_utils import eval_mode
from slimguard.data.core import Split
from slimguard.runtime.measure import MEASURE_THREADS, count_macs, count_nonzero, count_params, latency


def _check_fits(model: nn.Module, split: Split) -> None:
    """Raise a one-line DataError when the split's examples do not fit the model's expected input."""
    from slimguard.models.spec import maybe_info

    mi = maybe_info(model)
    if mi is None or not mi.data or not torch.is_tensor(split.x):
        return
    want = tuple(mi.data.get("input_shape", ()))
    got = tuple(split.x.shape[1:])
    if want and got != want:
        raise DataError(
            f"data {split.meta.name!r} has examples of shape {got} but the model expects {want}; "
            f"use data like {mi.data.get('name', 'its training data')!r}"
        )


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits for ``x`` in batches, in eval mode (mode restored)."""
    with eval_mode(model):
        outs = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(outs)


def _embedder_method(model: nn.Module, name: str) -> Callable[..., Any]:
    """``model.<name>`` (``encode``, ``tokenize``) of a sentence embedder; ModelError when it has none."""
    method = getattr(model, name, None)
    if not callable(method):
        raise ModelError(f"embedding evaluation needs a reference model with {name}() (a sentence embedder such "
                         f"as hf: sources load); {type(model).__name__} has none")
    return method


@torch.no_grad()
def embedding_fidelity(model: nn.Module, reference: nn.Module, texts: list[str], batch_size: int = 32,
                       max_length: int = 128) -> dict[str, float]:
    """Cosine similarity of ``model``'s embeddings to ``reference``'s on the same texts: mean and min."""
    a = _embedder_method(reference, "encode")(texts, batch_size=batch_size, max_length=max_length)
    tok = _embedder_method(reference, "tokenize")
    with eval_mode(model):
        b = torch.cat([model(**tok(texts[i : i + batch_size], max_length)) for i in range(0, len(texts), batch_size)])
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def timing_inputs(split: Split, batch_size: int, *, reference: nn.Module | None = None) -> Any:
    """A batch of ``batch_size`` examples of ``split`` to time a model on (examples repeated when the split
    is smaller); for text splits, the texts tokenized by ``reference`` (a sentence embedder)."""
    if batch_size < 1:
        raise DataError(f"timing batch size {batch_size} is not positive; use a batch of 1 or more")
    if split.meta.task == "embedding" or isinstance(split.x, list):
        if reference is None:
            raise DataError("embedding evaluation needs a reference model (the original) to compare with")
        texts = list(split.x)
        texts = (texts * -(-batch_size // len(texts)))[:batch_size]
        return _embedder_method(reference, "tokenize")(texts)
    reps = -(-batch_size // len(split))
    return split.x.repeat(reps, *[1] * (split.x.ndim - 1))[:batch_size]


def evaluate(
    model: nn.Module,
    split: Split,
    *,
    reference: nn.Module | None = None,
    batch_size: int = 512,
    latency_batch: int = 1,
    num_threads: int | None = MEASURE_THREADS,
    measure_latency: bool = True,
    measure_size: bool = True,
    repeats: int = 30,
) -> dict[str, Any]:
    """Score ``model`` on ``split`` and measure what it costs.

    Args:
        model: the model (mode saved and restored).
        split: a labelled split (classification) or a text split (embedding; needs ``reference``).
        reference: for embedding models, the model whose outputs count as truth.
        latency_batch: batch size for the latency measurement (default 1).
        num_threads: torch threads, pinned during the latency measurement (default
            :data:`~slimguard.runtime.measure.MEASURE_THREADS`, 1; None: torch's current count).

    Returns:
        ``accuracy`` (or ``cosine_mean``/``cosine_min``), ``params``, ``nonzero_params``, ``size_bytes``
        (of the ``.slim`` file), ``macs`` (per example), and with ``measure_latency``: ``latency_ms_p50``,
        ``latency_ms_p95``, ``throughput_per_s``, ``latency_batch``, ``threads`` (pinned while timing) and
        ``machine`` (:func:`slimguard.runtime.measure.machine`: CPU model, cores, threads, torch version).

    The latency is one model's absolute time (:func:`slimguard.runtime.measure.latency`), which moves from
    run to run on a shared machine; to compare two models use
    :func:`slimguard.runtime.measure.compare_speed` (as ``compress`` does).
    """
    if len(split) == 0:
        raise DataError(f"split {split.name!r} is empty; nothing to evaluate")
    out: dict[str, Any] = {}
    if split.meta.task == "embedding" or isinstance(split.x, list):
        if reference is None:
            raise DataError("embedding evaluation needs a reference model (the original) to compare with")
        out.update(embedding_fidelity(model, reference, split.x))
        one: Any = _embedder_method(reference, "tokenize")(split.x[:1])
    else:
        _check_fits(model, split)
        logits = predict(model, split.x, batch_size)
        if split.y is not None:
            if int(split.y.max()) >= logits.shape[-1]:
                raise DataError(
                    f"labels go up to {int(split.y.max())} but the model has {logits.shape[-1]} outputs"
                )
            out["accuracy"] = float((logits.argmax(-1) == split.y).float().mean())
        one = split.x[:1]
    out["params"] = count_params(model)
    out["nonzero_params"] = count_nonzero(model)
    if measure_size:
        from slimguard.artifact import file_size
        from slimguard.models.spec import maybe_info

        out["size_bytes"] = file_size(model) if maybe_info(model) is not None else None
    try:
        out["macs"] = count_macs(model, one)
    except Exception:  # some custom kernels cannot run under the FLOP counter
        out["macs"] = None
    if measure_latency:
        lat = latency(model, timing_inputs(split, latency_batch, reference=reference), num_threads=num_threads,
                      repeats=repeats)
        out.update({k: lat[k] for k in ("latency_ms_p50", "latency_ms_p95", "throughput_per_s", "threads")})
        out["latency_batch"] = latency_batch
        out["machine"] = lat["machine"]
    return out
