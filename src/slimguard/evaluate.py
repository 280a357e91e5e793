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
    if mi.task == "image-classification" and len(got) == 3 and got[0] in (1, want[0] if want else 3):
        return  # a Hugging Face image classifier resizes images and repeats grey ones to RGB itself
    if want and got != want:
        raise DataError(
            f"data {split.meta.name!r} has examples of shape {got} but the model expects {want}; "
            f"use data like {mi.data.get('name', 'its training data')!r}"
        )


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512, progress: bool = False) -> torch.Tensor:
    """Logits for ``x`` in batches, in eval mode (mode restored); with ``progress``, a bar with ETA over the
    batches when there are several."""
    from slimguard.ui import progress as bar

    starts = range(0, len(x), batch_size)
    outs = []
    with eval_mode(model), bar(len(starts), "evaluating", enabled=progress and len(starts) > 2) as task:
        for i in starts:
            outs.append(model(x[i : i + batch_size]))
            task.advance(1)
    return torch.cat(outs)


def _embedder_method(model: nn.Module, name: str) -> Callable[..., Any]:
    """``model.<name>`` (``encode``, ``tokenize``) of a text model; ModelError when it has none."""
    method = getattr(model, name, None)
    if not callable(method):
        raise ModelError(f"text evaluation needs a model with {name}() (a text model such as hf: sources load); "
                         f"{type(model).__name__} has none")
    return method


def _tokenizer_of(model: nn.Module, reference: nn.Module | None) -> Callable[..., Any]:
    """The model's own ``tokenize``, else the reference's (a compressed model keeps its original's)."""
    if callable(getattr(model, "tokenize", None)) or reference is None:
        return _embedder_method(model, "tokenize")
    return _embedder_method(reference, "tokenize")


def task_of(model: nn.Module) -> str:
    """The model's task: its info's (``classification``, ``sequence-classification``, ``causal-lm``, ...), else
    its class's ``task`` attribute, else ``classification``."""
    from slimguard.models.spec import maybe_info

    mi = maybe_info(model)
    if mi is not None and mi.task:
        return mi.task
    return str(getattr(model, "task", "classification"))


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


def f1_macro(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Macro-averaged F1 over the classes present in ``target`` or ``pred`` (each class's F1 is
    ``2 tp / (2 tp + fp + fn)``)."""
    scores = []
    for c in torch.unique(torch.cat([pred, target])).tolist():
        tp = int(((pred == c) & (target == c)).sum())
        fp = int(((pred == c) & (target != c)).sum())
        fn = int(((pred != c) & (target == c)).sum())
        scores.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(sum(scores) / len(scores)) if scores else 0.0


def agreement_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement with the reference and the mean KL(reference || model) of their softmax outputs
    (nats per prediction; logits of any leading shape, classes last)."""
    a, b = logits.float().flatten(0, -2), ref_logits.float().flatten(0, -2)
    kl = F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True, reduction="none").sum(-1)
    return {"agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
            "kl": max(0.0, float(kl.mean()))}  # rounding can leave an identical pair a hair below 0


@torch.no_grad()
def text_logits(model: nn.Module, texts: list[str], tokenize: Callable[..., Any], batch_size: int = 32,
                max_length: int = 128) -> torch.Tensor:
    """``(N, C)`` logits of a text classifier, ``batch_size`` texts at a time."""
    with eval_mode(model):
        return torch.cat([model(**tokenize(texts[i : i + batch_size], max_length))
                          for i in range(0, len(texts), batch_size)])


def _label_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    if int(y.max()) >= logits.shape[-1]:
        raise DataError(f"labels go up to {int(y.max())} but the model has {logits.shape[-1]} outputs")
    pred = logits.argmax(-1)
    return {"accuracy": float((pred == y).float().mean()), "f1_macro": f1_macro(pred, y)}


@torch.no_grad()
def lm_perplexity(model: nn.Module, texts: list[str], tokenize: Callable[..., Any], *, window: int = 128,
                  stride: int = 64, batch_size: int = 8) -> dict[str, Any]:
    """Perplexity of a causal LM on ``texts`` joined into one token stream: scored by
    :func:`slimguard.lm.metrics.perplexity` (sliding windows of ``window`` tokens, ``stride`` apart) where that
    module is installed, else over consecutive windows of ``window`` tokens (``exp`` of the mean
    next-token cross-entropy)."""
    ids = [tokenize([t], max_length=window)["input_ids"][0] for t in texts]
    stream = torch.cat(ids) if ids else torch.empty(0, dtype=torch.long)
    if stream.numel() < 2:
        raise DataError("perplexity needs at least 2 tokens of text; give more text")
    cfg = getattr(getattr(model, "model", None), "config", None)  # a Hugging Face model's position limit
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    window = min(window, int(stream.numel()), int(limit) if isinstance(limit, int) and limit > 1 else window)
    stride = min(stride, window)
    try:
        from slimguard.lm import metrics as lm_metrics
    except ImportError:
        lm_metrics = None  # type: ignore[assignment]  # scored below over consecutive windows
    with eval_mode(model):
        if lm_metrics is not None:
            return dict(lm_metrics.perplexity(model, stream, window=window, stride=stride, batch_size=batch_size))
        nll, count = 0.0, 0
        for i in range(0, int(stream.numel()) - 1, window):
            chunk = stream[i : i + window + 1]
            if chunk.numel() < 2:
                break
            logits = model(input_ids=chunk[None, :-1])
            nll += float(F.cross_entropy(logits[0].float(), chunk[1:], reduction="sum"))
            count += chunk.numel() - 1
    return {"perplexity": float(torch.exp(torch.tensor(nll / count))), "tokens": count}


def _text_metrics(model: nn.Module, split: Split, reference: nn.Module | None) -> dict[str, Any]:
    """Scores of a text model by its task; ``reference`` (default: the model itself) is the model whose
    outputs count as truth where labels are missing."""
    task = task_of(model)
    texts = list(split.x)
    ref = reference if reference is not None else model
    if task not in ("sequence-classification", "causal-lm"):  # an embedder
        if ref is model:  # its own reference: cosine 1 by definition, no need to encode everything twice
            return {"cosine_mean": 1.0, "cosine_min": 1.0}
        return embedding_fidelity(model, ref, texts)
    tokenize = _tokenizer_of(model, reference)
    if task == "causal-lm":
        out: dict[str, Any] = lm_perplexity(model, texts, tokenize)
        if reference is not None and reference is not model:
            with eval_mode(model), eval_mode(reference):
                enc = tokenize(texts[:32])
                mask = enc["attention_mask"].bool()
                out.update(agreement_kl(model(**enc)[mask], reference(**enc)[mask]))
        return out
    logits = text_logits(model, texts, tokenize)
    out = _label_metrics(logits, split.y) if split.y is not None else {}
    if split.y is None or (reference is not None and reference is not model):
        out.update(agreement_kl(logits, text_logits(ref, texts, _tokenizer_of(ref, model))))
    return out


def timing_inputs(split: Split, batch_size: int, *, reference: nn.Module | None = None) -> Any:
    """A batch of ``batch_size`` examples of ``split`` to time a model on (examples repeated when the split
    is smaller); for text splits, the texts tokenized by ``reference`` (a text model with ``tokenize``)."""
    if batch_size < 1:
        raise DataError(f"timing batch size {batch_size} is not positive; use a batch of 1 or more")
    if isinstance(split.x, list):
        if reference is None:
            raise DataError("text data needs a model with tokenize() to time; pass reference=the model")
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
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``model`` on ``split`` and measure what it costs (``progress``: a bar over the batches).

    Args:
        model: the model (mode saved and restored).
        split: a labelled split (images, tabular data, labelled texts) or unlabelled texts.
        reference: the model whose outputs count as truth (the original of a compressed model). Default:
            the model itself, so unlabelled data scores as agreement 1 / cosine 1 until a reference is
            given. With a reference, ``agreement`` and ``kl`` (classifiers) or ``cosine_*`` (embedders)
            compare with it.
        latency_batch: batch size for the latency measurement (default 1).
        num_threads: torch threads, pinned during the latency measurement (default
            :data:`~slimguard.runtime.measure.MEASURE_THREADS`, 1; None: torch's current count).

    Returns:
        The task's metric: ``accuracy`` and ``f1_macro`` with labels; ``agreement`` and ``kl`` to the
        reference for classifiers (without labels, or with a reference given); ``cosine_mean``/``cosine_min``
        for embedders; ``perplexity`` for causal LMs (:func:`lm_perplexity`). Then ``params``,
        ``nonzero_params``, ``size_bytes`` (of the ``.slim`` file), ``macs`` (per example), and with
        ``measure_latency``: ``latency_ms_p50``, ``latency_ms_p95``, ``throughput_per_s``, ``latency_batch``,
        ``threads`` (pinned while timing) and ``machine`` (:func:`slimguard.runtime.measure.machine`: CPU
        model, cores, threads, torch version).

    The latency is one model's absolute time (:func:`slimguard.runtime.measure.latency`), which moves from
    run to run on a shared machine; to compare two models use
    :func:`slimguard.runtime.measure.compare_speed` (as ``compress`` does).
    """
    if len(split) == 0:
        raise DataError(f"split {split.name!r} is empty; nothing to evaluate")
    out: dict[str, Any] = {}
    if isinstance(split.x, list):
        out.update(_text_metrics(model, split, reference))
        tokenizer_owner = model if callable(getattr(model, "tokenize", None)) else reference
        if tokenizer_owner is None:
            raise ModelError(f"{type(model).__name__} has no tokenize(); pass reference=the model it came from")
        one: Any = _embedder_method(tokenizer_owner, "tokenize")(split.x[:1])
        reference = tokenizer_owner
    else:
        _check_fits(model, split)
        logits = predict(model, split.x, batch_size, progress=progress)
        if split.y is not None:
            out.update(_label_metrics(logits, split.y))
        if reference is not None and reference is not model:
            out.update(agreement_kl(logits, predict(reference, split.x, batch_size)))
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
