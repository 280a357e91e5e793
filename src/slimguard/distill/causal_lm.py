"""Distillation of causal language models: the student matches the teacher's next-token distribution at every
position of unlabelled text.

A causal LM's "labels" are the next tokens of its own input, so no labelled data are needed. Per window of
``max_length`` tokens the loss is::

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))   (every position, soft targets)
      + (1 - alpha) * next-token cross-entropy                        (the text itself)
      + feature_weight * sum of hidden-state distances                (``features``, optional)

averaged over the positions that predict a real token (padding, when token batches carry an
``attention_mask``, is excluded; see :func:`slimguard.distill.losses.causal_lm_kd_loss`). ``alpha: 0``
trains on the next tokens alone: plain causal-LM fine-tuning, without running the teacher.

Data: texts (``docs-corpus``, ``text:FILE``) are packed into windows by the student's (else the teacher's)
tokenizer (:func:`slimguard.lm.tokens.text_windows`); token ids may also be given as a 1-D stream, an
``(N, L)`` tensor, or a dict with ``input_ids`` and ``attention_mask``. A run with ``finetune.max_steps``
tokenises only the ``max_steps * batch_size`` windows it uses (from a seeded random order of the documents).

The teacher runs on every batch (its ``(N, L, vocab)`` logits are too large to cache). After each epoch the
student is scored on ``val_windows`` validation windows by its next-token cross-entropy (the log of its
perplexity, which is what a ``max_perplexity_ratio`` budget judges), and the best epoch is kept.

Example:
    >>> student = copy.deepcopy(lm)
    >>> sg.prune_(student, sg.ChannelPruningConfig(ratio=0, head_ratio=0.5, ffn_ratio=0.5))
    >>> sg.distill(lm, student, sg.data.load("docs-corpus"),
    ...            sg.DistillConfig(temperature=1, alpha=0.9, finetune=sg.FinetuneConfig(max_steps=200)))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError, DataError, ModelError
from slimguard.core.torch_utils import device_of, eval_mode, forward, to_device
from slimguard.data.core import DataBundle, Split
from slimguard.distill import losses as L
from slimguard.distill.teachers import Taps
from slimguard.lm.metrics import logits_of
from slimguard.lm.tokens import text_windows, token_windows
from slimguard.train.loop import TASK_TRAINERS, FinetuneConfig, finetune

MASK = "attention_mask"


class TokenRows(dict):
    """``{"input_ids": (N, L), "attention_mask": (N, L)?}`` that ``len()`` counts by rows (a Split holds it)."""

    def __len__(self) -> int:
        return int(self["input_ids"].shape[0]) if "input_ids" in self else 0


def is_causal_lm(data: DataBundle, *models: nn.Module) -> bool:
    """True when the data are for a causal LM (task ``causal-lm``) or a model says it is one."""
    from slimguard.evaluate import task_of

    return data.task == "causal-lm" or any(task_of(m) == "causal-lm" for m in models)


def _owner(*models: nn.Module) -> nn.Module:
    for m in models:
        if callable(getattr(m, "encode_texts", None)) or (callable(getattr(m, "tokenize", None))
                                                          and getattr(m, "tokenizer", True) is not None):
            return m
    raise ModelError("the data are texts but neither model has a tokenizer; load them with sg.load_model, "
                     "or give token ids")


def token_rows(split: Split, models: Sequence[nn.Module], length: int, max_windows: int = 0,
               seed: int = 0) -> TokenRows:
    """A split as windows of token ids: texts packed by the models' tokenizer, a 1-D stream cut into windows
    of ``length``, an ``(N, L)`` tensor as it is, or a dict with ``input_ids`` (and ``attention_mask``)."""
    x = split.x
    if isinstance(x, list):
        return TokenRows(input_ids=text_windows(_owner(*models), x, length, max_windows=max_windows, seed=seed))
    if isinstance(x, dict):
        if "input_ids" not in x:
            raise DataError(f"split {split.name!r}: token data as a dict need 'input_ids' (and optionally "
                            f"'attention_mask'); got keys {sorted(x)}")
        ids = token_windows(x["input_ids"], length, max_windows=max_windows)
        rows = TokenRows(input_ids=ids)
        if x.get(MASK) is not None:
            mask = x[MASK][: len(ids)]
            if tuple(mask.shape) != tuple(ids.shape):
                raise DataError(f"split {split.name!r}: attention_mask {tuple(mask.shape)} does not match "
                                f"input_ids {tuple(ids.shape)}")
            rows[MASK] = mask.long()
        return rows
    return TokenRows(input_ids=token_windows(x, length, max_windows=max_windows))


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = logits_of(forward(model, inputs))
    if out.ndim != 3:
        raise ModelError(f"a causal LM must return (N, L, vocab) logits; {type(model).__name__} returned "
                         f"{tuple(out.shape)}")
    return out


@torch.no_grad()
def next_token_nll(model: nn.Module, rows: TokenRows, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of ``model`` on token windows; ``exp`` of it
    is the perplexity of those windows (each scored on its own, without earlier context)."""
    device = device_of(model)
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(rows), batch_size):
            batch = to_device({k: v[i : i + batch_size] for k, v in rows.items()}, device)
            ids, mask = batch["input_ids"], batch.get(MASK)
            n = int((mask[:, :-1].bool() & mask[:, 1:].bool()).sum()) if mask is not None else ids[:, 1:].numel()
            total += float(L.next_token_ce(_logits(model, batch), ids, mask)) * n
            count += n
    return total / max(1, count)


def distill_causal_lm(teacher: nn.Module, student: nn.Module, data: DataBundle, cfg: Any, *,
                      progress: bool = True, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train the causal LM ``student`` in place on ``teacher``'s next-token distributions (module docstring).

    ``cfg`` is a :class:`~slimguard.distill.core.DistillConfig`: ``temperature``, ``alpha``, ``targets``,
    ``features`` / ``feature_loss`` / ``feature_weight``, ``max_length`` (window length), ``val_windows`` and
    ``finetune`` apply; ``attention`` is refused (match hidden states with ``features``).

    Returns:
        The training loop's history plus ``teacher_cached`` (always False), ``projections``, ``windows``
        (train windows), ``window`` (tokens each) and ``val_perplexity`` (of the best epoch, on the
        validation windows; None without a validation split).
    """
    if cfg.attention:
        raise ConfigError("attention: attention transfer is not available for causal LMs; match hidden states "
                          "with features instead (e.g. features: {model.model.layers.1: model.model.layers.1})")
    return _train(teacher, student, data, cfg.finetune, temperature=cfg.temperature, alpha=cfg.alpha,
                  targets=cfg.targets, features=dict(cfg.features), feature_kind=cfg.feature_loss,
                  feature_weight=cfg.feature_weight, max_length=cfg.max_length, val_windows=cfg.val_windows,
                  progress=progress, callbacks=callbacks, description="distilling")


def finetune_causal_lm(model: nn.Module, data: DataBundle, config: FinetuneConfig, *, callbacks: Sequence[Any] = (),
                       progress: bool = True, max_length: int = 128, val_windows: int = 64) -> dict[str, Any]:
    """Plain fine-tuning of a causal LM on the next tokens of ``data`` (texts or token ids, packed into windows
    of ``max_length`` as for distillation; validation by the next-token cross-entropy of ``val_windows``
    windows). :func:`slimguard.train.loop.finetune` hands bundles of task ``causal-lm`` here, so the
    ``finetune`` recipe step trains causal LMs too.

    Returns:
        The training loop's history plus ``windows``, ``window`` and ``val_perplexity``.
    """
    return _train(None, model, data, config, temperature=1.0, alpha=0.0, targets="soft", features={},
                  feature_kind="mse", feature_weight=0.0, max_length=max_length, val_windows=val_windows,
                  progress=progress, callbacks=callbacks, description="fine-tuning")


def _train(teacher: nn.Module | None, student: nn.Module, data: DataBundle, ft: FinetuneConfig, *,
           temperature: float, alpha: float, targets: str, features: dict[str, str], feature_kind: str,
           feature_weight: float, max_length: int, val_windows: int, progress: bool, callbacks: Sequence[Any],
           description: str) -> dict[str, Any]:
    models = (student,) if teacher is None else (student, teacher)
    train = token_rows(data.train, models, max_length, ft.max_steps * ft.batch_size, ft.seed)
    val = token_rows(data.val, models, max_length, val_windows, ft.seed) if len(data.val) else None
    use_teacher = teacher is not None and (alpha > 0 or bool(features))
    s_taps = Taps(student, list(features), "student feature")
    t_taps = Taps(teacher, list(features.values()), "teacher feature") if teacher is not None else None
    frozen = eval_mode(teacher, requires_grad=False) if teacher is not None else contextlib.nullcontext()
    try:
        with frozen:
            probe = {k: v[:2] for k, v in train.items()}
            device = device_of(student)
            with eval_mode(student), torch.no_grad():
                s_probe = _logits(student, to_device(probe, device))
                t_probe = _logits(teacher, to_device(probe, device_of(teacher))) \
                    if use_teacher and teacher is not None else s_probe
            if t_probe.shape != s_probe.shape:
                raise ModelError(f"teacher logits {tuple(t_probe.shape)} but student logits {tuple(s_probe.shape)} "
                                 "for the same tokens; the two LMs must share the vocabulary")
            projections = nn.ModuleDict()
            for i, (sname, tname) in enumerate(features.items()):
                s_f, t_f = s_taps[sname], t_taps[tname] if t_taps is not None else None
                if not (torch.is_tensor(s_f) and torch.is_tensor(t_f)):
                    raise ModelError(f"feature layers {sname!r} / {tname!r} do not output tensors")
                proj = L.make_projection(s_f, t_f)
                projections[str(i)] = proj if proj is not None else nn.Identity()
            projections.to(device)
            pairs = list(features.items())

            def loss_fn(model: nn.Module, xb: dict[str, torch.Tensor], _y: Any) -> torch.Tensor:
                ids, mask = xb["input_ids"], xb.get(MASK)
                s_out = _logits(model, xb)
                t_out = s_out
                if use_teacher and teacher is not None:
                    with torch.no_grad():
                        t_out = _logits(teacher, xb)
                loss = L.causal_lm_kd_loss(s_out, t_out, ids, mask, temperature=temperature, alpha=alpha,
                                           targets=targets)
                for i, (sname, tname) in enumerate(pairs):
                    loss = loss + feature_weight * L.feature_loss(projections[str(i)](s_taps[sname]),
                                                                  t_taps[tname], feature_kind, mask)  # type: ignore[index]
                return loss

            def score_fn(m: nn.Module) -> float:
                return -next_token_nll(m, val, ft.batch_size) if val is not None else 0.0

            meta = data.train.meta
            bundle = DataBundle(meta=meta, train=Split("train", train, None, meta),
                                val=Split("val", val if val is not None else [], None, meta),
                                test=data.test, calib=data.calib)
            moved = [m for m in (teacher, projections) if m is not None]
            history = finetune(student, bundle, ft, loss_fn=loss_fn, callbacks=callbacks,
                               extra_parameters=list(projections.parameters()), score_fn=score_fn,
                               progress=progress, description=description, move_with=moved)
    finally:
        s_taps.remove()
        if t_taps is not None:
            t_taps.remove()
    best = history.get("best_val_score")
    history.update(teacher_cached=False, windows=len(train), window=int(train["input_ids"].shape[1]),
                   projections=sum(1 for p in projections.values() if not isinstance(p, nn.Identity)),
                   val_perplexity=math.exp(-best) if val is not None and best is not None else None)
    return history


TASK_TRAINERS.register("causal-lm", finetune_causal_lm)
