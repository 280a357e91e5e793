"""Distillation through the training loop: a narrow student learns from the digits-mlp teacher; bad
inputs fail early with one-line errors; ensembles; the recipe step uses the original model as teacher."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError, ModelError
from slimguard.distill import DistillConfig, Ensemble, distill, pruned_student, width_student
from slimguard.train.loop import FinetuneConfig, accuracy

FAST = FinetuneConfig(epochs=6, lr=5e-3, batch_size=64, patience=0)


@pytest.mark.parametrize("case,cfg", [
    ("soft", dict(temperature=4.0, alpha=0.9)),
    ("hard", dict(targets="hard", alpha=0.7)),
    ("features+projection", dict(temperature=4.0, features={"3": "3"}, feature_weight=0.5)),
])
def test_student_learns_and_loss_falls(zoo_model, digits, case, cfg) -> None:
    teacher = zoo_model("digits-mlp")
    before = copy.deepcopy(teacher.state_dict())
    student = width_student(teacher, 0.25)  # hidden (75, 25): 7x fewer parameters
    history = distill(teacher, student, digits, DistillConfig(finetune=FAST, **cfg), progress=False)
    losses = [e["train_loss"] for e in history["epochs"]]
    assert losses[-1] < 0.7 * losses[0], losses
    acc = accuracy(student, digits.test)
    assert acc > 0.8, f"{case}: student accuracy {acc:.3f} (chance is 0.1)"
    assert history["projections"] == (1 if "features" in cfg else 0)
    assert history["teacher_cached"] == ("features" not in cfg and "attention" not in cfg)
    for k, v in teacher.state_dict().items():  # the teacher is left untouched
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in teacher.parameters())


def _cnn(width: int) -> nn.Module:
    torch.manual_seed(width)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def test_attention_transfer_between_conv_nets(digits) -> None:
    teacher, student = _cnn(16), _cnn(4)
    cfg = DistillConfig(alpha=1.0, attention={"1": "1", "3": "3"}, features={"3": "3"},
                        finetune=FinetuneConfig(epochs=3, lr=5e-3, patience=0))
    history = distill(teacher, student, digits, cfg, progress=False)
    losses = [e["train_loss"] for e in history["epochs"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert history["projections"] == 1  # 4 -> 16 channels, a 1x1 conv
    with pytest.raises(ModelError, match=r"attention transfer needs .* got shape \(2, 10\)"):
        cfg = DistillConfig(attention={"6": "6"}, finetune=FinetuneConfig(epochs=1))
        distill(teacher, student, digits, cfg, progress=False)


def test_incompatible_outputs_name_both_shapes(zoo_model, digits) -> None:
    teacher = zoo_model("digits-mlp")
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with pytest.raises(ModelError, match=r"teacher outputs shape \(2, 10\) but student outputs \(2, 5\)"):
        distill(teacher, student, digits, DistillConfig(finetune=FinetuneConfig(epochs=1)), progress=False)


@pytest.mark.parametrize("field,pairs,match", [
    ("features", {"nope": "3"}, "student feature layer 'nope' does not exist"),
    ("features", {"3": "missing.layer"}, "teacher feature layer 'missing.layer' does not exist"),
    ("attention", {"99": "1"}, "student attention layer '99' does not exist"),
])
def test_missing_layers_fail_before_training(zoo_model, digits, field, pairs, match) -> None:
    teacher = zoo_model("digits-mlp")
    student = width_student(teacher, 0.5)
    with pytest.raises(ConfigError, match=match):
        distill(teacher, student, digits, DistillConfig(finetune=FinetuneConfig(epochs=1), **{field: pairs}),
                progress=False)
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])  # nothing left behind


def test_ensemble_averages_and_teaches(zoo_model, digits) -> None:
    a, b = zoo_model("digits-mlp"), zoo_model("digits-mlp")
    with torch.no_grad():
        b[-1].bias.add_(1.0)
    ens = Ensemble([a, b], weights=[1, 3])
    x = digits.test.x[:4]
    assert torch.allclose(ens(x), 0.25 * a(x) + 0.75 * b(x), atol=1e-6)
    student = width_student(a, 0.25)
    distill([a, b], student, digits, DistillConfig(finetune=FAST), progress=False)  # a list is an ensemble
    assert accuracy(student, digits.test) > 0.8
    with pytest.raises(ConfigError, match="weights"):
        Ensemble([a, b], weights=[1.0])


def test_width_student_shapes(zoo_model) -> None:
    from slimguard.runtime.measure import count_params

    teacher = zoo_model("digits-mlp")
    student = width_student(teacher, 0.5)
    assert student[2].out_features == 150 and student[4].out_features == 50
    res = width_student("digits32-resnet", 0.5)
    assert res.fc.in_features == 64
    assert count_params(res) * 3.9 < count_params(width_student("digits32-resnet", 1.0))
    with pytest.raises(ConfigError, match="width"):
        width_student(teacher, 0.0)


def test_pruned_student_copies_and_prunes(zoo_model) -> None:
    from slimguard.core.masks import sparsity
    from slimguard.prune.magnitude import MagnitudePruningConfig

    teacher = zoo_model("digits-mlp")
    student = pruned_student(teacher, MagnitudePruningConfig(sparsity=0.5))
    assert sparsity(student) > 0.4 and sparsity(teacher) == 0.0


def test_recipe_distill_step_uses_the_original_as_teacher(tmp_path) -> None:
    from slimguard.core.recipe import parse
    from slimguard.pipeline import compress

    recipe = parse({"model": "zoo:digits-mlp", "data": "digits", "budget": {"max_accuracy_drop": 3.0},
                    "steps": [{"lowrank": {"energy": 0.6, "ignore": ["6"]}},
                              {"distill": {"finetune": {"epochs": 3, "lr": 1e-3, "patience": 0}}}]}, "test")
    result = compress(recipe, tmp_path, progress=False)
    assert result["steps"][0]["result"]["factorized"]
    assert len(result["steps"][1]["result"]["epochs"]) == 3
    assert result["compressed"]["params"] < result["baseline"]["params"]
    assert result["budget"]["ok"], result["budget"]


def test_recipe_distill_step_without_teacher_is_a_user_error(zoo_model, digits) -> None:
    from slimguard.transforms import run_step

    with pytest.raises(ConfigError, match="no teacher"):
        cfg = DistillConfig(finetune=FinetuneConfig(epochs=1))
        run_step(zoo_model("digits-mlp"), cfg, digits, progress=False)


def test_student_from_structured_pruning_recovers(zoo_model, digits) -> None:
    from slimguard.prune.structured import ChannelPruningConfig
    from slimguard.runtime.measure import count_params

    teacher = zoo_model("digits-mlp")
    student = pruned_student(teacher, ChannelPruningConfig(ratio=0.75, ignore=["6"]), example_inputs=digits.example)
    assert count_params(student) < 0.3 * count_params(teacher)
    distill(teacher, student, digits, DistillConfig(finetune=FinetuneConfig(epochs=3, lr=3e-3, patience=0)),
            progress=False)
    assert accuracy(student, digits.test) > 0.9
