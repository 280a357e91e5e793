"""``sg.scorecard``: robustness of a model, and of its compressed version side by side, per threat.

For each model: clean accuracy; accuracy under FGSM, PGD and APGD (CE and DLR, per-example worst case:
a lighter AutoAttack) over an epsilon grid; accuracy under every corruption of the data's kind at
severities 1-5. Quantized models are attacked through their fake-quant twin and the examples transferred
to the real integer model; both numbers are reported. Seed and every setting are recorded.

Embedding (text) models are scored by cosine fidelity of their embeddings of typo'd texts to the
reference model's embeddings of the clean texts (gradient attacks on token ids are not applicable).

Example:
    >>> card = sg.scorecard(pruned, data, against=original)
    >>> print(card.table())
    >>> card.save("robustness.json")
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError, DataError
from slimguard.core.registry import Registry
from slimguard.core.torch_utils import accuracy as accuracy_on
from slimguard.core.torch_utils import device_of, eval_mode
from slimguard.data.core import DataBundle, Split
from slimguard.robust import corruptions as corr
from slimguard.robust.attacks import APGD, FGSM, PGD
from slimguard.robust.base import Attack, check_labels, frozen_eval
from slimguard.robust.twin import fake_quant_twin, is_quantized
from slimguard.ui import progress as progress_bar

DEFAULT_EPS = (0.03, 0.1, 0.2)
ATTACK_NAMES = ("fgsm", "pgd", "apgd")


@dataclasses.dataclass
class Scorecard:
    """Results per model (``models[name]``) and the settings that produced them (``settings``)."""

    models: dict[str, dict[str, Any]]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"models": self.models, "settings": self.settings}

    def save(self, path: str | Path) -> Path:
        """Write the scorecard as JSON (atomically)."""
        from slimguard.core.outputs import write_json_atomic

        p = Path(path)
        write_json_atomic(p, self.to_dict())
        return p

    def rows(self) -> list[tuple[Any, ...]]:
        """Table rows: ``(metric, value per model..., change last - first in points)``."""
        names = list(self.models)
        first = self.models[names[0]]
        metrics: list[tuple[str, list[float | None]]] = []
        key = "cosine" if "clean_cosine" in first else "accuracy"
        metrics.append((f"clean {key}", [m.get(f"clean_{key}") for m in self.models.values()]))
        for label in first.get("attacks", {}):
            metrics.append((label, [m["attacks"].get(label, {}).get("accuracy") for m in self.models.values()]))
            twins = [m["attacks"].get(label, {}).get("twin_accuracy") for m in self.models.values()]
            if any(t is not None for t in twins):
                metrics.append((f"{label} (fake-quant twin)", twins))
        sev = self.settings.get("severities", []) if first.get("corruptions") else []
        for i, s in enumerate(sev):  # mean over the corruption kinds, per severity (details in the JSON)
            metrics.append((f"corruptions severity {s}", [_mean([c[i] for c in m.get("corruptions", {}).values()])
                                                          for m in self.models.values()]))
        for name in first.get("corruptions", {}):
            metrics.append((f"{name} (mean of severities)", [_mean(m["corruptions"][name])
                                                             for m in self.models.values()]))
        if first.get("corruptions"):
            metrics.append((f"corruption mean {key}", [m.get("corruption_mean") for m in self.models.values()]))
        rows = []
        for label, values in metrics:
            known = [v for v in values if v is not None]
            complete = len(values) > 1 and len(known) == len(values)
            change = f"{(known[-1] - known[0]) * 100:+.1f} pts" if complete else ""
            rows.append((label, *values, change) if len(values) > 1 else (label, *values))
        return rows

    def columns(self) -> list[str]:
        names = list(self.models)
        return ["metric", *names, "change"] if len(names) > 1 else ["metric", *names]

    def table(self) -> str:
        """A plain-text table (the CLI prints a rich one)."""
        cols = self.columns()
        body = [list(cols)] + [[_fmt(v) for v in r] for r in self.rows()]
        widths = [max(len(r[i]) for r in body) for i in range(len(cols))]
        return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                         for r in body)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# Attacks a scorecard runs over its eps grid, by name: ``fn(eps, *, pgd_steps, apgd_steps, relative, seed)``
GridAttack = Callable[..., "Attack | tuple[APGD, APGD]"]
GRID_ATTACKS: Registry[GridAttack] = Registry("attack")


@GRID_ATTACKS.register("fgsm")
def _fgsm(eps: float, *, relative: bool, seed: int, **_: Any) -> Attack:
    return FGSM(eps=eps, relative=relative, seed=seed)


@GRID_ATTACKS.register("pgd")
def _pgd(eps: float, *, pgd_steps: int, relative: bool, seed: int, **_: Any) -> Attack:
    return PGD(eps=eps, steps=pgd_steps, relative=relative, seed=seed)


@GRID_ATTACKS.register("apgd")
def _apgd(eps: float, *, apgd_steps: int, relative: bool, seed: int, **_: Any) -> tuple[APGD, APGD]:
    def one(loss: str) -> APGD:
        return APGD(eps=eps, steps=apgd_steps, loss=loss, relative=relative, seed=seed)

    return one("ce"), one("dlr")


def build_attacks(names: Sequence[str | Attack], eps: Sequence[float], *, pgd_steps: int, apgd_steps: int,
                  relative: bool, seed: int) -> list[Attack | tuple[APGD, APGD]]:
    """Attack objects for names over the eps grid (``apgd`` is the pair CE + DLR); instances pass through."""
    out: list[Attack | tuple[APGD, APGD]] = []
    for a in names:
        if isinstance(a, Attack):
            out.append(a)
            continue
        make = GRID_ATTACKS.get(a)
        steps = {"pgd_steps": pgd_steps, "apgd_steps": apgd_steps}
        out.extend(make(e, relative=relative, seed=seed, **steps) for e in eps)
    return out


def _label(attack: Attack | tuple[APGD, APGD]) -> str:
    if isinstance(attack, tuple):
        return f"apgd-ce+dlr-{attack[0].config.norm} eps={attack[0].config.eps:g}"
    return attack.label


def _settings_of(attack: Attack | tuple[APGD, APGD]) -> Any:
    return [a.settings() for a in attack] if isinstance(attack, tuple) else attack.settings()


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    device = device_of(model)
    with torch.no_grad(), frozen_eval(model):
        return torch.cat([model(x[i : i + 512].to(device)).argmax(-1).cpu() == y[i : i + 512].cpu()
                          for i in range(0, len(x), 512)])


def attack_accuracy(model: nn.Module, attack: Attack | tuple[APGD, APGD], x: torch.Tensor, y: torch.Tensor,
                    bounds: Any, twin: nn.Module | None = None) -> dict[str, Any]:
    """Accuracy under one attack; quantized models through their twin (both numbers returned).

    Args:
        model: the model scored.
        attack: an attack, or a group whose per-example worst case counts (``apgd``: CE and DLR).
        x, y: raw inputs and labels.
        bounds: the valid input range.
        twin: the fake-quant twin of a quantized ``model`` (built here when not given).

    Returns:
        ``accuracy`` (on the model itself), and for quantized models ``twin_accuracy`` (the fake-quant
        twin on its own examples) with ``white_box: "fake-quant twin"``.
    """
    quantized = is_quantized(model)
    target = (twin if twin is not None else fake_quant_twin(model)) if quantized else model
    attacks = attack if isinstance(attack, tuple) else (attack,)
    ok_model = torch.ones(len(x), dtype=torch.bool)
    ok_twin = torch.ones(len(x), dtype=torch.bool)
    for a in attacks:  # per-example worst case over the attacks of the group
        x_adv = a(target, x, y, bounds=bounds)
        ok_model &= _correct(model, x_adv, y)
        if quantized:
            ok_twin &= _correct(target, x_adv, y)
    out: dict[str, Any] = {"accuracy": int(ok_model.sum()) / len(x)}
    if quantized:
        out["twin_accuracy"] = int(ok_twin.sum()) / len(x)
        out["white_box"] = "fake-quant twin (examples transferred to the integer model)"
    return out


def _text_fidelity(model: nn.Module, reference: nn.Module, texts: list[str], clean_ref: torch.Tensor) -> float:
    tok = reference.tokenize
    with eval_mode(model), torch.no_grad():
        # torch's stub types every Module attribute as Tensor | Module, hiding the tokenize method
        emb = torch.cat([model(**tok(texts[i : i + 32]))  # type: ignore[operator]
                         for i in range(0, len(texts), 32)])
    return float(torch.nn.functional.cosine_similarity(emb.float(), clean_ref.float(), dim=-1).mean())


def scorecard(
    model: nn.Module,
    data: DataBundle | Split,
    *,
    against: nn.Module | None = None,
    names: tuple[str, str] = ("original", "compressed"),
    attacks: Sequence[str | Attack] = ATTACK_NAMES,
    eps: Sequence[float] = DEFAULT_EPS,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = corr.SEVERITIES,
    attack_examples: int = 500,
    corruption_examples: int = 0,
    pgd_steps: int = 10,
    apgd_steps: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> Scorecard:
    """Measure robustness of ``model`` (and of ``against``, the original, side by side).

    Args:
        model: the model to score (the compressed one when ``against`` is given).
        data: a bundle (its test split is used) or a labelled split.
        against: the original model to compare with (its column comes first).
        names: column names for ``(against, model)`` (default ``("original", "compressed")``).
        attacks: names from ``fgsm``, ``pgd``, ``apgd`` (run over the eps grid) and/or attack instances.
        eps: the eps grid as fractions of the input range (raw units for [0, 1] images); the
            middle entry is the headline threat (default ``(0.03, 0.1, 0.2)``).
        corruptions: corruption names (default: all for the data's kind).
        severities: severities to run (default 1-5).
        attack_examples: seeded subset attacked (default 500; 0 means the whole split).
        corruption_examples: seeded subset corrupted (default 0: the whole split).
        pgd_steps, apgd_steps: iterations of PGD (default 10) and APGD (default 20).
        seed: seed of subsets, random starts and corruptions (default 0).
        progress: show a progress bar.

    Returns:
        A :class:`Scorecard` (``.table()``, ``.to_dict()``, ``.save(path)``).
    """
    split = data.test if isinstance(data, DataBundle) else data
    meta = split.meta
    if len(split) == 0:
        raise DataError(f"split {split.name!r} is empty; nothing to score")
    if attack_examples < 0 or corruption_examples < 0:
        raise ConfigError("attack_examples and corruption_examples must be >= 0 (0 means the whole split)")
    if any(s not in corr.SEVERITIES for s in severities):
        raise ConfigError(f"severities {list(severities)!r} out of range; allowed: 1, 2, 3, 4, 5")
    sorted_eps = sorted(float(e) for e in eps)
    models = {names[0]: against, names[1]: model} if against is not None else {"model": model}
    text = meta.kind == "text" or isinstance(split.x, list)
    corr_names = list(corruptions) if corruptions is not None else corr.names_for(meta.kind)
    for c in corr_names:
        corr.get(c)
    settings: dict[str, Any] = {
        "data": meta.name, "split": split.name, "seed": seed, "eps_grid": sorted_eps,
        "eps_units": "fraction of the valid input range (relative)", "middle_eps": sorted_eps[len(sorted_eps) // 2]
        if sorted_eps else None, "severities": list(severities), "corruptions": corr_names,
        "threads": torch.get_num_threads(),
    }
    if text:
        return _text_scorecard(models, split, against or model, corr_names, severities, corruption_examples,
                               seed, settings)
    from slimguard.evaluate import _check_fits

    for m in models.values():
        _check_fits(m, split)
    x_all, y_all = split.tensors
    sub = split.subset(attack_examples, seed=seed) if attack_examples else split
    csub = split.subset(corruption_examples, seed=seed) if corruption_examples else split
    x, y = sub.tensors
    attack_list = build_attacks(attacks, sorted_eps, pgd_steps=pgd_steps, apgd_steps=apgd_steps, relative=True,
                                seed=seed)
    bounds = meta.bounds()
    settings.update({"attack_examples": len(sub), "corruption_examples": len(csub), "test_examples": len(split),
                     "attacks": [_settings_of(a) for a in attack_list], "pgd_steps": pgd_steps,
                     "apgd_steps": apgd_steps, "apgd": "per-example worst case of APGD-CE and APGD-DLR"})
    total = len(models) * (len(attack_list) + len(corr_names) * len(severities) + 1)
    results: dict[str, dict[str, Any]] = {}
    with progress_bar(total, "robustness scorecard", enabled=progress) as bar:
        for name, m in models.items():
            check_labels(y_all, _correct_shape(m, x_all[:1]))
            r: dict[str, Any] = {"clean_accuracy": accuracy_on(m, x_all, y_all),
                                 "clean_accuracy_attack_subset": accuracy_on(m, x, y),
                                 "quantized": is_quantized(m), "attacks": {}, "corruptions": {}}
            bar.advance(1, info=name)
            twin = fake_quant_twin(m) if r["quantized"] else None
            for a in attack_list:
                r["attacks"][_label(a)] = attack_accuracy(m, a, x, y, bounds, twin)
                bar.advance(1, info=f"{name}: {_label(a)}")
            cx, cy = csub.tensors
            for c in corr_names:
                accs = []
                for s in severities:
                    accs.append(accuracy_on(m, corr.corrupt(cx, c, s, meta, seed=seed), cy))
                    bar.advance(1, info=f"{name}: {c} s{s}")
                r["corruptions"][c] = accs
            allc = [v for accs in r["corruptions"].values() for v in accs]
            r["corruption_mean"] = sum(allc) / len(allc) if allc else None
            results[name] = r
    return Scorecard(results, settings)


def _correct_shape(model: nn.Module, x1: torch.Tensor) -> int:
    with torch.no_grad(), frozen_eval(model):
        return int(model(x1.to(device_of(model))).shape[-1])


def _text_scorecard(models: dict[str, nn.Module], split: Split, reference: nn.Module,
                    corr_names: list[str], severities: Sequence[int], n: int, seed: int,
                    settings: dict[str, Any]) -> Scorecard:
    sub = split.subset(n, seed=seed) if n else split
    texts = list(sub.x)
    if not hasattr(reference, "tokenize") or not hasattr(reference, "encode"):
        raise DataError("text scoring needs an embedding model with tokenize/encode (e.g. sg.load_model('minilm'))")
    clean_ref = reference.encode(texts)  # type: ignore[operator]
    settings.update({"corruption_examples": len(texts), "attacks": [],
                     "attacks_note": "gradient attacks do not apply to token ids; text is scored on typos",
                     "metric": "cosine of the model's embedding to the reference's embedding of the clean text"})
    results: dict[str, dict[str, Any]] = {}
    for name, m in models.items():
        r: dict[str, Any] = {"clean_cosine": _text_fidelity(m, reference, texts, clean_ref), "attacks": {},
                             "corruptions": {}}
        for c in corr_names:
            r["corruptions"][c] = [_text_fidelity(m, reference, corr.corrupt(texts, c, s, split.meta, seed=seed),
                                                  clean_ref) for s in severities]
        allc = [v for accs in r["corruptions"].values() for v in accs]
        r["corruption_mean"] = sum(allc) / len(allc) if allc else math.nan
        results[name] = r
    return Scorecard(results, settings)
