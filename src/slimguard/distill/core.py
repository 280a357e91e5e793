"""``sg.distill(teacher, student, data, DistillConfig(...))``: knowledge distillation through the one
training loop (:func:`slimguard.train.loop.finetune`).

What the student learns from, all combinable:

* **outputs**: for classifiers, soft targets (KL at temperature ``T``, Hinton et al. 2015) or hard
  targets (teacher argmax), mixed with the true labels by ``alpha``; for embedding models (data of
  task ``embedding``, no labels needed) cosine or MSE between the student's and the teacher's embeddings;
  for causal LMs (data of task ``causal-lm``, or a model of that task) the next-token distributions at
  every position, mixed with the next-token cross-entropy by ``alpha`` (:mod:`slimguard.distill.causal_lm`).
* **features** (FitNets): ``features={"student.layer": "teacher.layer"}`` matches hidden outputs; a
  learned 1x1 conv / Linear projection is trained alongside when the widths differ.
* **attention**: ``attention={"student.layer": "teacher.layer"}``. For a transformer's self-attention
  module (``...attention.self`` of a Hugging Face BERT) the attention probabilities are matched by KL
  (MiniLM, Wang et al. 2020); for any other layer the spatial / token attention maps of Zagoruyko and
  Komodakis 2017.

When only outputs are matched, the teacher's outputs on the train split are computed once and reused
every epoch (``cache_teacher``), so distillation costs little more than ordinary fine-tuning.

In a recipe, ``distill`` is a step that trains the current model (the student, for example after a
``drop-layers`` or pruning step) against a teacher: ``teacher: ""`` (default) is the model as it was at
the start of the recipe; any model source (``zoo:NAME``, ``minilm``, ``file.slim``) names another.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn

from slimguard.core.config import Config, check_range, register_config
from slimguard.core.errors import ConfigError, DataError, ModelError
from slimguard.core.torch_utils import device_of, eval_mode, forward, to_device
from slimguard.data.core import DataBundle, Split
from slimguard.distill import losses as L
from slimguard.distill.causal_lm import distill_causal_lm, is_causal_lm
from slimguard.distill.teachers import Ensemble, Taps
from slimguard.train.loop import FinetuneConfig, check_finetune, finetune, finetune_block

TEACHER_KEY = "_teacher"
TENSOR_KEY = "_x"


@register_config("distill")
@dataclasses.dataclass
class DistillConfig(Config):
    """Knowledge distillation options (also the ``distill`` recipe step).

    Args:
        temperature: softmax temperature of soft targets, > 0 (default 4).
        alpha: weight of the teacher term; ``1 - alpha`` goes to cross-entropy on true labels
            (classification with labels; for causal LMs the next-token cross-entropy of the text, and
            ``alpha: 0`` is plain causal-LM fine-tuning; default 0.9).
        targets: ``soft`` (KL at ``temperature``) or ``hard`` (teacher argmax) (default ``soft``).
        embedding_loss: for embedding models: ``cosine`` or ``mse`` (default ``cosine``).
        features: student layer name -> teacher layer name, hidden outputs matched (default none).
        feature_loss: ``mse`` or ``cosine`` for the feature pairs (default ``mse``).
        feature_weight: weight of the summed feature terms (default 1).
        attention: student layer -> teacher layer for attention transfer (default none).
        attention_weight: weight of the summed attention terms (default 1).
        max_length: token limit when the data are texts (default 128); for causal LMs the length of the
            token windows trained on.
        group_by_length: texts: batches of texts of similar length (:class:`LengthGroupedBatches`), so a batch
            pads only to texts like its own; several times faster on short sentences mixed with long
            passages (default False: batches drawn at random). Validation is unchanged.
        student_dropout: dropout probability of the student's ``Dropout`` modules while it trains (Hugging Face
            attention reads its module's ``p`` too); None (default) keeps the model's own. ``0`` suits a
            student that must reproduce the teacher closely (an embedder held to a cosine budget): dropout
            noise then only costs fidelity. The model's own values are restored afterwards.
        val_windows: causal LMs: validation windows of ``max_length`` tokens scored after each epoch
            (0: all; default 64).
        cache_teacher: compute the teacher's outputs once when only outputs are matched (default True;
            causal LMs always run the teacher on each batch, as their logits are too large to keep).
        finetune: the training loop's options (:class:`~slimguard.train.loop.FinetuneConfig`; default
            10 epochs, otherwise FinetuneConfig's defaults). In a recipe, keys the block leaves out keep
            these defaults; the old spelling with ``epochs``, ``lr``, ``batch_size``, ``optimizer``,
            ``weight_decay``, ``patience``, ``seed``, ``max_steps`` beside the step's options is still
            read, with a deprecation warning.
        teacher: recipe steps only: ``""`` = the model at the start of the recipe, or a model source.
        train_data: recipe steps only: a data source whose TRAIN split the student learns from instead of
            the recipe's (``""``, default: the recipe's own), e.g. ``docs-prose``, a large text set for an
            embedder scored on ``docs-text``. Validation (early stopping, the best epoch) stays on the
            recipe's val split; the source is loaded with the recipe's seed and must have the recipe data's
            kind (texts for texts).

    Example:
        >>> cfg = DistillConfig(temperature=4, alpha=0.9, finetune=FinetuneConfig(epochs=10, lr=1e-3))
        >>> distill(teacher, student, sg.data.load("digits32"), cfg)

    In a recipe::

        - distill: {temperature: 4, finetune: {epochs: 10, lr: 0.001}}
    """

    needs_original: ClassVar[bool] = True

    temperature: float = 4.0
    alpha: float = 0.9
    targets: Literal["soft", "hard"] = "soft"
    embedding_loss: Literal["cosine", "mse"] = "cosine"
    features: dict[str, str] = dataclasses.field(default_factory=dict)
    feature_loss: Literal["mse", "cosine"] = "mse"
    feature_weight: float = 1.0
    attention: dict[str, str] = dataclasses.field(default_factory=dict)
    attention_weight: float = 1.0
    max_length: int = 128
    group_by_length: bool = False
    student_dropout: float | None = None
    val_windows: int = 64
    cache_teacher: bool = True
    finetune: FinetuneConfig = dataclasses.field(default_factory=lambda: FinetuneConfig(epochs=10))
    teacher: str = ""
    train_data: str = ""

    # training options older recipes wrote beside the step's own (read into ``finetune``, with a warning)
    FLAT_TRAINING_KEYS: ClassVar[tuple[str, ...]] = ("epochs", "lr", "batch_size", "optimizer",
                                                     "weight_decay", "patience", "seed", "max_steps")

    def validate(self) -> None:
        check_range("temperature", self.temperature, 0.0, 1000.0, low_inclusive=False)
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_range("feature_weight", self.feature_weight, 0.0)
        check_range("attention_weight", self.attention_weight, 0.0)
        check_range("max_length", self.max_length, 2, 1 << 16)
        check_range("val_windows", self.val_windows, 0, 1 << 20)
        if self.student_dropout is not None:
            check_range("student_dropout", self.student_dropout, 0.0, 1.0, high_inclusive=False)
        check_finetune(self.finetune)

    @classmethod
    def from_fields(cls, fields: dict[str, Any], where: str = "") -> DistillConfig:
        where = where or cls.config_name
        return super().from_fields(finetune_block(cls, fields, where, cls.FLAT_TRAINING_KEYS), where)


# ---- inputs -------------------------------------------------------------------------------------------
def _tokenizer_owner(*models: nn.Module) -> nn.Module:
    for m in models:
        if hasattr(m, "tokenize") and getattr(m, "tokenizer", True) is not None:
            return m
    raise ModelError("the data are texts but neither model has a tokenizer; load them with sg.load_model")


class Rows(dict):
    """A dict of equally long tensors that ``len()`` counts by rows (so a :class:`Split` can hold it)."""

    def __len__(self) -> int:
        return len(next(iter(self.values()))) if dict.__len__(self) else 0


def _prepare(split: Split, owner: nn.Module | None, max_length: int) -> dict[str, torch.Tensor]:
    """A split's inputs as a dict of tensors (texts tokenised once, padded to the longest)."""
    if isinstance(split.x, list):
        if owner is None:
            raise ModelError("the data are texts but no model has a tokenizer")
        return Rows(owner.tokenize(split.x, max_length))  # type: ignore[operator]
    if not torch.is_tensor(split.x):
        raise DataError(f"split {split.name!r} holds {type(split.x).__name__}; expected a tensor or texts")
    return Rows({TENSOR_KEY: split.x})


def _model_inputs(batch: dict[str, torch.Tensor]) -> Any:
    """Strip the cached teacher outputs; trim token batches to their longest real sequence."""
    if TENSOR_KEY in batch:
        return batch[TENSOR_KEY]
    inputs = {k: v for k, v in batch.items() if k != TEACHER_KEY}
    mask = inputs.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        n = max(1, int(mask.sum(1).max()))
        inputs = {k: v[:, :n] if v.ndim == 2 and v.shape[1] == mask.shape[1] else v for k, v in inputs.items()}
    return inputs


def _call(model: nn.Module, inputs: Any) -> torch.Tensor:
    out = forward(model, inputs)
    if not torch.is_tensor(out):
        raise ModelError(f"distillation needs models that return one tensor; got {type(out).__name__}")
    return out


def _slice(batch: dict[str, torch.Tensor], i: int, j: int) -> dict[str, torch.Tensor]:
    return {k: v[i:j] for k, v in batch.items()}


class LengthGroupedBatches:
    """Token batches of similar length, reshuffled every epoch (Hugging Face's ``group_by_length``).

    Each pass: a seeded permutation of the rows is cut into pools of ``pool`` batches; each pool is sorted
    by token count (longest first) and cut into batches, and the order of all batches is shuffled. Every row
    is used once per pass; batches are trimmed to their longest row when trained on. Iterating again starts
    the next pass (a new permutation), so the training loop reads it as a re-iterable data loader.

    Args:
        rows: tokenised inputs (``input_ids``, ``attention_mask``, ...), one row per text.
        labels: one label per row, or None.
        batch_size: rows per batch.
        seed: seed of the permutations (pass ``p`` uses ``seed + p``).
        pool: batches per sorted pool (default 50).

    Example:
        >>> batches = LengthGroupedBatches(model.tokenize(texts, 128), None, batch_size=32, seed=0)
        >>> finetune(model, batches, FinetuneConfig(epochs=1), loss_fn=loss_fn)
    """

    def __init__(self, rows: dict[str, torch.Tensor], labels: Any, batch_size: int, seed: int,
                 pool: int = 50) -> None:
        self.rows, self.labels = rows, labels
        self.batch_size, self.seed, self.pool = batch_size, seed, pool
        self.lengths = rows["attention_mask"].sum(1) if "attention_mask" in rows else None
        self.n = len(next(iter(rows.values())))
        self.passes = 0

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], Any]]:
        g = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        perm = torch.randperm(self.n, generator=g)
        batches: list[torch.Tensor] = []
        step = self.batch_size * self.pool
        for start in range(0, self.n, step):
            chunk = perm[start : start + step]
            if self.lengths is not None:
                chunk = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        for b in torch.randperm(len(batches), generator=g).tolist():
            idx = batches[b]
            yield Rows({k: v[idx] for k, v in self.rows.items()}), None if self.labels is None else self.labels[idx]


@torch.no_grad()
def _outputs(model: nn.Module, prepared: dict[str, torch.Tensor], batch_size: int = 128) -> torch.Tensor:
    n = len(next(iter(prepared.values()))) if prepared else 0
    device = device_of(model)  # the training device when scoring inside the loop; outputs kept on the CPU
    return torch.cat([_call(model, _model_inputs(to_device(_slice(prepared, i, i + batch_size), device))).float().cpu()
                      for i in range(0, n, batch_size)])


@contextlib.contextmanager
def _dropout(model: nn.Module, p: float | None) -> Iterator[None]:
    """Every ``nn.Dropout`` of ``model`` at probability ``p`` inside the block (None: unchanged)."""
    saved = [(m, m.p) for m in model.modules() if isinstance(m, nn.Dropout)] if p is not None else []
    for m, _ in saved:
        m.p = float(p or 0.0)
    try:
        yield
    finally:
        for m, before in saved:
            m.p = before


@contextlib.contextmanager
def _eager_attention(models: Sequence[nn.Module], enabled: bool) -> Iterator[None]:
    """Hugging Face attention modules return probabilities only in the ``eager`` implementation."""
    saved = []
    if enabled:
        for m in models:
            for sub in m.modules():
                cfg = getattr(sub, "config", None)
                if cfg is not None and hasattr(cfg, "_attn_implementation"):
                    saved.append((cfg, cfg._attn_implementation))
                    cfg._attn_implementation = "eager"
    try:
        yield
    finally:
        for cfg, impl in reversed(saved):
            cfg._attn_implementation = impl


def _mask_of(inputs: Any) -> torch.Tensor | None:
    return inputs.get("attention_mask") if isinstance(inputs, dict) else None


def _attention_term(s_out: Any, t_out: Any, mask: torch.Tensor | None) -> torch.Tensor:
    s_probs = s_out[1] if isinstance(s_out, (tuple, list)) and len(s_out) > 1 else None
    t_probs = t_out[1] if isinstance(t_out, (tuple, list)) and len(t_out) > 1 else None
    if torch.is_tensor(s_probs) and torch.is_tensor(t_probs) and s_probs.ndim == 4:
        return L.attention_kl(s_probs, t_probs, mask)
    s = s_out[0] if isinstance(s_out, (tuple, list)) else s_out
    t = t_out[0] if isinstance(t_out, (tuple, list)) else t_out
    return L.attention_transfer(s, t, mask)


# ---- the verb -----------------------------------------------------------------------------------------
def distill(
    teacher: nn.Module | Sequence[nn.Module],
    student: nn.Module,
    data: DataBundle,
    config: DistillConfig | None = None,
    *,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train ``student`` in place to imitate ``teacher`` (a model, or a list of models = an ensemble).

    Args:
        teacher: the teacher, or several (their outputs are averaged: :class:`Ensemble`). It is run in
            eval mode with gradients off; its mode and ``requires_grad`` flags are restored.
        student: the model to train (any architecture with outputs of the teacher's shape).
        data: trains on ``data.train``, early-stops on ``data.val``; texts are tokenised with the
            student's (else the teacher's) tokenizer.
        config: :class:`DistillConfig`.
        progress: show a progress bar.
        callbacks: passed to the training loop (e.g. gradual pruning).

    Returns:
        The training loop's history plus ``teacher_cached`` and ``projections`` (learned regressors); for
        causal LMs also ``windows``, ``window`` and ``val_perplexity``
        (:func:`slimguard.distill.causal_lm.distill_causal_lm`).

    Raises:
        ModelError: teacher and student outputs have different shapes (both named).
        ConfigError: a feature or attention layer does not exist.

    Example:
        >>> teacher = sg.zoo.load("digits32-resnet")
        >>> student = sg.zoo.create("digits32-resnet", widths=(16, 32, 64))
        >>> sg.distill(teacher, student, sg.data.load("digits32"), sg.DistillConfig())
    """
    cfg = config or DistillConfig()
    if not isinstance(teacher, nn.Module):
        teacher = Ensemble(list(teacher), normalize=data.task == "embedding")
    if len(data.train) == 0:
        raise DataError("the train split is empty; nothing to distill on")
    if is_causal_lm(data, student, teacher):
        return distill_causal_lm(teacher, student, data, cfg, progress=progress, callbacks=callbacks)
    embedding = data.task == "embedding" or isinstance(data.train.x, list)
    owner = _tokenizer_owner(student, teacher) if isinstance(data.train.x, list) else None
    train_in = _prepare(data.train, owner, cfg.max_length)
    val_in = _prepare(data.val, owner, cfg.max_length) if len(data.val) else None

    online = bool(cfg.features or cfg.attention) or not cfg.cache_teacher
    taps: list[Taps] = []
    try:
        for model, names, role, whole in ((student, list(cfg.features), "student feature", False),
                                          (teacher, list(cfg.features.values()), "teacher feature", False),
                                          (student, list(cfg.attention), "student attention", True),
                                          (teacher, list(cfg.attention.values()), "teacher attention", True)):
            taps.append(Taps(model, names, role, keep_tuple=whole))
        s_taps, t_taps, s_att, t_att = taps
        with eval_mode(teacher, requires_grad=False), _eager_attention([teacher, student], bool(cfg.attention)), \
                _dropout(student, cfg.student_dropout):
            probe = _model_inputs(_slice(train_in, 0, 2))
            with eval_mode(student), torch.no_grad():
                t_probe, s_probe = _call(teacher, probe), _call(student, probe)
            if t_probe.shape != s_probe.shape:
                raise ModelError(
                    f"teacher outputs shape {tuple(t_probe.shape)} but student outputs {tuple(s_probe.shape)} "
                    "for the same inputs; give a student with the teacher's output size"
                )
            projections = nn.ModuleDict()
            for i, (sname, tname) in enumerate(cfg.features.items()):
                s_f, t_f = s_taps[sname], t_taps[tname]
                if not (torch.is_tensor(s_f) and torch.is_tensor(t_f)):
                    raise ModelError(f"feature layers {sname!r} / {tname!r} do not output tensors")
                s_f, t_f = L.align_spatial(s_f, t_f)
                proj = L.make_projection(s_f, t_f)
                projections[str(i)] = proj if proj is not None else nn.Identity()
            for sname, tname in cfg.attention.items():  # fail before training on unusable pairs
                _attention_term(s_att[sname], t_att[tname], _mask_of(probe))
            device = next(iter(student.parameters()), torch.zeros(0)).device
            projections.to(device)

            cached_train = cached_val = None
            if not online:
                cached_train = _outputs(teacher, train_in)
            if val_in is not None:
                cached_val = _outputs(teacher, val_in)
            if cached_train is not None:
                train_in = Rows({**train_in, TEACHER_KEY: cached_train})
            pairs = list(cfg.features.items())
            att_pairs = list(cfg.attention.items())

            def output_term(s_out: torch.Tensor, t_out: torch.Tensor, y: Any) -> torch.Tensor:
                if embedding:
                    return L.embedding_loss(s_out, t_out, cfg.embedding_loss)
                return L.kd_loss(s_out, t_out, y, temperature=cfg.temperature, alpha=cfg.alpha,
                                 targets=cfg.targets)

            def loss_fn(model: nn.Module, xb: dict[str, torch.Tensor], yb: Any) -> torch.Tensor:
                inputs = _model_inputs(xb)
                s_out = _call(model, inputs)
                if TEACHER_KEY in xb:
                    t_out = xb[TEACHER_KEY]
                else:
                    with torch.no_grad():
                        t_out = _call(teacher, inputs)
                loss = output_term(s_out, t_out, yb)
                mask = _mask_of(inputs)
                for i, (sname, tname) in enumerate(pairs):
                    s_f, t_f = L.align_spatial(s_taps[sname], t_taps[tname])
                    loss = loss + cfg.feature_weight * L.feature_loss(projections[str(i)](s_f), t_f,
                                                                      cfg.feature_loss, mask)
                for sname, tname in att_pairs:
                    loss = loss + cfg.attention_weight * _attention_term(s_att[sname], t_att[tname], mask)
                return loss

            score_fn = None
            if cached_val is not None and val_in is not None and (embedding or data.val.y is None):
                def score_fn(m: nn.Module) -> float:
                    with eval_mode(m), torch.no_grad():
                        s_val = _outputs(m, val_in)
                    if embedding:
                        return float(torch.nn.functional.cosine_similarity(s_val, cached_val, dim=-1).mean())
                    return -float(L.kd_loss(s_val, cached_val, None, temperature=cfg.temperature,
                                            targets=cfg.targets))

            meta = data.train.meta if not embedding else dataclasses.replace(data.train.meta, task="embedding")
            bundle = DataBundle(meta=meta, train=Split("train", train_in, data.train.y, meta),
                                val=data.val, test=data.test, calib=data.calib)
            if embedding:  # the loop scores texts itself only through score_fn
                bundle = dataclasses.replace(bundle, val=Split("val", list(range(len(data.val))), None, meta))
            train_data: Any = bundle
            if cfg.group_by_length and isinstance(data.train.x, list):
                labels = None if data.train.y is None else torch.as_tensor(data.train.y)
                train_data = LengthGroupedBatches(train_in, labels, cfg.finetune.batch_size, cfg.finetune.seed)
            history = finetune(student, train_data, cfg.finetune, loss_fn=loss_fn, callbacks=callbacks,
                               extra_parameters=list(projections.parameters()), score_fn=score_fn,
                               progress=progress, description="distilling", move_with=[teacher, projections])
    finally:
        for tap in taps:
            tap.remove()
    history["teacher_cached"] = cached_train is not None
    history["projections"] = sum(1 for p in projections.values() if not isinstance(p, nn.Identity))
    return history


def _register() -> None:
    from slimguard.core.registry import register_handler

    @register_handler("distill", DistillConfig)
    def _distill_step(model: nn.Module, config: DistillConfig, *, data: DataBundle, original: nn.Module | None = None,
                      progress: bool = True, **_: Any) -> dict[str, Any]:
        if config.teacher:
            from slimguard.models.sources import load_model

            teacher = load_model(config.teacher, progress=progress)
        elif original is not None:
            teacher = original
        else:
            raise ConfigError(
                "distill: no teacher; set teacher: SOURCE (e.g. zoo:digits32-resnet or minilm), or run the step "
                "in a recipe, where the default teacher is the model as it was at the start"
            )
        if config.train_data:
            data = _with_train_split(data, config.train_data)
        return distill(teacher, model, data, config, progress=progress)


def _with_train_split(data: DataBundle, source: str) -> DataBundle:
    """``data`` with the train split of the data source ``source`` (same seed); val/test/calib kept."""
    from slimguard.data.core import load as load_data

    other = load_data(source, seed=data.meta.seed)
    if isinstance(other.train.x, list) != isinstance(data.train.x, list):
        what = {True: "texts", False: "tensors"}
        raise DataError(f"distill: train_data {source!r} holds {what[isinstance(other.train.x, list)]} but the "
                        f"recipe's data {data.meta.name!r} holds {what[isinstance(data.train.x, list)]}; "
                        "give a source of the same kind")
    return dataclasses.replace(data, train=other.train)


_register()
