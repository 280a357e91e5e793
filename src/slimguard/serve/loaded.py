"""One served model, fully checked: the artifact loaded under the policy, its Guard, an optional cascade,
weight checksums verified, and a warm-up run. Built off to the side and swapped in whole, so a reload
that fails any check leaves the running model untouched.

Cascade (dynamic computation, as in "BranchyNet", Teerapittayanon et al., ICPR 2016): the compressed
model answers rows it is confident about; rows below the confidence threshold go to the reference
model. The threshold is the *lowest* confidence at which the cascade's accuracy on the validation split
stays within ``cascade_tolerance`` points of the reference model's, so the large model is spent only
where it is needed. The test split is never used.

Example:
    >>> loaded = load_served(ServeConfig(artifact="m.slim", reference="zoo:digits-mlp"))
    >>> loaded.guard(x).pred, loaded.summary()["cascade"]["threshold"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimguard.core.errors import ArtifactError, ConfigError, DataError
from slimguard.guard.contract import Contract
from slimguard.guard.guard import Guard, GuardResult
from slimguard.guard.monitor import MonitorConfig
from slimguard.guard.protect import Cascade, RangeRestriction, WeightChecksums
from slimguard.serve.answers import items_of
from slimguard.serve.config import ServeConfig
from slimguard.serve.limits import Problem
from slimguard.serve.text import TextServing, is_text_model, load_text

WARMUP_ROWS = 64
TIMED_ROWS = 16  # items of the timed second warm-up pass (ms_per_item)


@dataclasses.dataclass
class LoadedModel:
    """A model ready to serve.

    Attributes:
        guard: contract -> model (or cascade) -> detector -> monitor.
        small: the compressed model itself (the one the checksums cover).
        checksums: CRC-32 per tensor of ``small``, taken from the artifact (repair source: it).
        cascade: the cascade the guard runs, or None without a reference model.
        version: first 16 hex digits of the artifact's sha256 (the model version in metrics).
        manifest: the artifact's manifest.
        class_names: label names (may be empty).
        val_accuracy: accuracy on the validation split of what the guard runs, in points.
        cascade_stats: validation accuracies (points) of each model and the cascade, and its fallback rate.
        text: the text path (tokenizer, length-sorted chunks, embedder OOD and monitor); None for tensors.
        ms_per_item: what one forward pass of what the guard runs cost per item at warm-up (a second pass
            over :data:`TIMED_ROWS` validation items, after the first paid the one-off costs); it sets
            the automatic torch threads (:meth:`ServeConfig.threads`).
    """

    guard: Guard
    small: nn.Module
    checksums: WeightChecksums
    cascade: Cascade | None
    version: str
    manifest: dict[str, Any]
    class_names: list[str]
    val_accuracy: float | None
    cascade_stats: dict[str, float] | None = None
    text: TextServing | None = None
    ms_per_item: float | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one tensor example (``()`` for a text model, which takes texts)."""
        return self.guard.contract.input_shape if self.guard.contract is not None else ()

    def answer(self, x: Any, ids: list[str]) -> list[dict[str, Any]]:
        """The guarded answer for each row of ``x`` (a tensor batch, or a
        :class:`~slimguard.serve.text.TextBatch`), one JSON-able dict per row. Runs the model: call it only
        on the batcher's thread."""
        if self.text is not None:
            return self.text.answer(self.guard, x, ids, self.class_names)
        res = guarded_batch(self.guard, x, ids)
        fallback = self.cascade.last_fallback if self.cascade is not None else None
        return items_of(res, fallback, self.class_names, ids)

    def scrub(self) -> dict[str, Any]:
        """Verify every weight tensor against its checksum and repair damaged ones from the artifact.

        Returns ``{"checked", "damaged", "repaired"}`` (tensor names). Raises ArtifactError when a tensor
        cannot be repaired. Call it only where no forward pass runs at the same time (the batcher's thread).
        """
        damaged = self.checksums.verify(self.small)
        repaired = self.checksums.repair(self.small, names=damaged) if damaged else []
        return {"checked": len(self.checksums.checksums), "damaged": damaged, "repaired": repaired}

    def summary(self) -> dict[str, Any]:
        """The manifest in brief (no weights, no file paths) and how the guard is set up."""
        m = self.manifest
        source = {k: v for k, v in m["model"]["source"].items() if k in ("kind", "name", "factory")}
        det = self.guard.detector
        return {
            "version": self.version,
            "created": m.get("created"),
            "format_version": m.get("format_version"),
            "versions": m.get("versions", {}),
            "source": source,
            "task": m["model"].get("task"),
            "data": m["model"].get("data", {}).get("name"),
            "history": [step.get("verb", step.get("_type", "?")) if isinstance(step, dict) else str(step)
                        for step in m["model"].get("history", [])],
            "metrics": m.get("metrics", {}),
            "tensors": len(m.get("tensors", {})),
            "entries": {name: e.get("size") for name, e in m.get("entries", {}).items()},
            "input_shape": list(self.input_shape),
            "input": self.text.summary() if self.text is not None else {"kind": "tensor"},
            "classes": self.class_names,
            "val_accuracy": self.val_accuracy,
            "guard": {"detector": type(det).__name__ if det is not None else None,
                      "ood_threshold": det.threshold if det is not None else None,
                      "checksummed_tensors": len(self.checksums.checksums)},
            "cascade": None if self.cascade is None else {"threshold": self.cascade.config.threshold,
                                                          "validation": self.cascade_stats},
        }

    def close(self) -> None:
        self.guard.close()


def guarded_batch(guard: Guard, x: torch.Tensor, ids: list[str]) -> GuardResult:
    """What :meth:`Guard.__call__ <slimguard.guard.Guard.__call__>` does, for a batch of requests whose
    every part the service has already checked against the contract (each request on its own, so each
    gets its own 422): model (with its protections) -> softmax -> OOD score -> monitor, without autograd
    (ODIN turns it back on for its input step) on a model the service keeps in eval mode. Checking the
    joined batch again, and switching every module to eval and back, would cost every batch for nothing."""
    t0 = time.perf_counter()
    with torch.no_grad():
        if guard.model.training:
            guard.model.eval()
        logits = guard.model(x)
        return guard.decide(x, logits, t0, ids)


def fits_structure(contract: Contract, x: Any) -> bool:
    """True when ``x`` has the contract's shape and dtype and is a non-empty batch within its size limit:
    what one request needs before it may join a micro-batch (its values are checked with the batch's)."""
    return (torch.is_tensor(x) and x.dim() >= 1 and len(x) > 0 and tuple(x.shape[1:]) == contract.input_shape
            and str(x.dtype).removeprefix("torch.") in contract.dtypes
            and (contract.max_batch is None or len(x) <= contract.max_batch))


def contract_problem(violations: list[Any]) -> Problem:
    """The 422 problem for contract violations: each names its field, rule, the value and what is allowed."""
    return Problem(422, "Contract violation", str(violations[0]), "contract",
                   [{"field": v.field, "rule": v.kind, "value": str(v.value)[:80], "allowed": v.allowed,
                     "rows": v.rows, "count": v.count} for v in violations[:10]])


def artifact_version(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@torch.no_grad()
def cascade_threshold(small: nn.Module, large: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      tolerance_points: float) -> tuple[float, dict[str, float]]:
    """The lowest confidence threshold at which the cascade's accuracy on ``(x, y)`` (validation data)
    is within ``tolerance_points`` of ``large``'s.

    Returns ``(threshold, stats)`` with the accuracies (points) of each model and the cascade, and the
    share of rows sent to ``large``. Rows whose small-model confidence is below the threshold fall back.
    """
    from slimguard.evaluate import predict

    probs = F.softmax(predict(small, x).float(), -1)
    conf, small_pred = probs.max(-1)
    large_ok = (predict(large, x).argmax(-1) == y).double()
    small_ok = (small_pred == y).double()
    order = conf.argsort()
    n = len(y)
    # falling back the k least confident rows: accuracy = large on those k + small on the rest
    large_prefix = torch.cat([torch.zeros(1, dtype=torch.float64), large_ok[order].cumsum(0)])
    small_suffix = torch.cat([small_ok[order].flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
    acc = (large_prefix + small_suffix) / n * 100
    want = float(large_ok.mean()) * 100 - tolerance_points
    k = int(torch.nonzero(acc >= want - 1e-9)[0])  # k = n always qualifies (the large model alone)
    sorted_conf = conf[order]
    threshold = 0.0 if k == 0 else (1.0 if k == n else float(sorted_conf[k]))
    if 0 < k < n and float(sorted_conf[k]) == float(sorted_conf[k - 1]):
        threshold = float(torch.nextafter(sorted_conf[k], torch.tensor(2.0)))  # ties fall back together
    stats = {"small_accuracy": float(small_ok.mean()) * 100, "large_accuracy": float(large_ok.mean()) * 100,
             "cascade_accuracy": float(acc[k]), "fallback_rate": k / n}
    return threshold, stats


def redact_paths(message: str, *paths: str | os.PathLike[str] | None) -> str:
    """``message`` with the given file paths replaced by their names (responses never carry paths)."""
    for p in paths:
        if p:
            message = message.replace(str(Path(p).resolve()), Path(p).name).replace(str(p), Path(p).name)
    return message


def _keys(key_env: str | None) -> tuple[bytes, ...] | None:
    """The signing keys in ``$key_env`` (None: the loader's default, ``$SLIMGUARD_SIGNING_KEY``)."""
    from slimguard.artifact import parse_keys

    if key_env is None:
        return None
    keys = tuple(parse_keys(os.environ.get(key_env, "")))
    if not keys:
        raise ConfigError(f"--key-env {key_env}: the environment variable {key_env} is unset or empty; "
                          "export it with the key(s), comma-separated")
    return keys


def load_served(config: ServeConfig, artifact: str | None = None) -> LoadedModel:
    """Load ``artifact`` (default ``config.artifact``) and set up everything the service needs.

    Raises:
        UserError: the artifact is refused by the policy or damaged (ArtifactError), its data set is
            unknown (pass ``--data``), or its checksums or warm-up fail.
    """
    from slimguard import data as sgdata
    from slimguard.artifact import LoadPolicy, read_manifest
    from slimguard.evaluate import predict
    from slimguard.models.sources import load_model
    from slimguard.models.spec import maybe_info

    path = artifact or config.artifact
    if not Path(path).is_file():
        raise ArtifactError(f"{Path(path).name}: no such artifact file; pass the path of a .slim file")
    policy = LoadPolicy(trust_code=config.trust_code, key=_keys(config.key_env),
                        require_signature=config.require_signature)
    small = policy.load(path)
    manifest = read_manifest(path)
    mi = maybe_info(small)
    data_name = config.data or (mi.data.get("name") if mi is not None else None)
    if not data_name:
        raise DataError("this artifact records no data set; pass --data so the guard can be fitted")
    bundle = sgdata.load(data_name)
    sums = WeightChecksums.from_artifact(path)
    bad = sums.verify(small)
    if bad:
        raise ArtifactError(f"tensor {bad[0]!r} of the loaded model does not match the artifact's checksum")
    if is_text_model(small):
        return _load_text_model(small, bundle, config, sums, path, manifest)
    if not torch.is_tensor(bundle.val.x):
        raise DataError(f"data set {data_name!r} holds text; this model takes tensors, so pass --data with "
                        "a tensor data set")
    served: nn.Module = small
    cascade, cascade_stats = None, None
    val_y = bundle.val.y
    if config.reference is not None:
        if val_y is None:
            raise DataError(f"data set {data_name!r} has no validation labels; the cascade threshold needs them")
        large = load_model(config.reference, progress=False, policy=policy).eval()
        threshold, cascade_stats = cascade_threshold(small, large, bundle.val.x, val_y, config.cascade_tolerance)
        cascade = Cascade(small, large, threshold=threshold)
        served = cascade
    detector = None if config.detector == "none" else config.detector
    # range restriction per model: profiled through a cascade, the reference would only see the few
    # training rows the small model is unsure of, and its bounds would clip everything else
    ranges = [RangeRestriction().profile(m, bundle.train.x).attach(m)
              for m in ((small, cascade.large) if cascade is not None else ())]
    guard = Guard.build(served, bundle, detector=detector, protect=() if cascade is not None else ("range",),
                        tpr=config.tpr, monitor_config=MonitorConfig(window=1000, min_samples=50))
    guard.protect.extend(ranges)  # detached with the guard's own protections by guard.close()
    try:
        served.eval()  # and it stays so: the batcher never switches modes (see guarded_batch)
        with torch.no_grad():
            out = served(bundle.val.x[:WARMUP_ROWS])
        if out.dim() != 2 or not bool(torch.isfinite(out).all()):
            raise ArtifactError("warm-up gave non-finite or misshapen outputs; the model is not servable")
        timed = bundle.val.x[:TIMED_ROWS]
        ms_per_item = _ms_per_item(lambda: served(timed), len(timed))
        val_acc = None
        if val_y is not None:
            val_acc = float((predict(served, bundle.val.x).argmax(-1) == val_y).double().mean()) * 100
    except BaseException:
        guard.close()
        raise
    return LoadedModel(guard, small, sums, cascade, artifact_version(path), manifest,
                       list(bundle.meta.class_names), val_acc, cascade_stats, ms_per_item=ms_per_item)


def _load_text_model(small: nn.Module, bundle: Any, config: ServeConfig, sums: WeightChecksums,
                     path: str, manifest: dict[str, Any]) -> LoadedModel:
    """A text classifier or embedder (see :mod:`slimguard.serve.text`): its guard, warmed up on validation
    texts; a classifier's validation accuracy when the texts are labelled."""
    guard, text = load_text(small, bundle, config)
    try:
        val = list(bundle.val.x)
        ids = [f"warmup-{i}" for i in range(min(WARMUP_ROWS, len(val)))]
        warm = text.embed(guard.model, val[: len(ids)]) if text.embedder else None
        if warm is not None and not bool(torch.isfinite(warm).all()):
            raise ArtifactError("warm-up gave non-finite embeddings; the model is not servable")
        val_acc = None
        if not text.embedder:
            from slimguard.evaluate import predict

            logits = predict(guard.model, text.pack_texts(val), batch_size=64)
            if not bool(torch.isfinite(logits).all()):
                raise ArtifactError("warm-up gave non-finite logits; the model is not servable")
            if bundle.val.y is not None:
                val_acc = float((logits.argmax(-1) == bundle.val.y).double().mean()) * 100
        timed = val[:TIMED_ROWS]
        ms_per_item = _ms_per_item(lambda: text.embed(guard.model, timed) if text.embedder
                                   else guard.model(text.pack_texts(timed)), len(timed))
    except BaseException:
        guard.close()
        raise
    names = [] if text.embedder else list(bundle.meta.class_names)
    return LoadedModel(guard, small, sums, None, artifact_version(path), manifest, names, val_acc, None, text,
                       ms_per_item)


def _ms_per_item(run: Callable[[], Any], items: int) -> float:
    """Milliseconds per item of one call of ``run`` (a forward pass over ``items`` items)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        run()
    return (time.perf_counter() - t0) * 1e3 / max(1, items)
