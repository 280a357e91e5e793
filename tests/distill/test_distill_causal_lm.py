"""Distillation of causal LMs: per-token losses against hand-computed values, and a pruned tiny Llama that
recovers its perplexity by matching the unpruned original's next-token distributions."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn

import slimguard as sg
from slimguard.core.errors import ConfigError, DataError, ModelError
from slimguard.data.core import DataBundle, DataMeta, Split
from slimguard.distill import DistillConfig, distill
from slimguard.distill import losses as L
from slimguard.lm.metrics import perplexity
from slimguard.train.loop import FinetuneConfig

LN3 = math.log(3.0)
KL_HAND = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL((.75, .25) || (.5, .5))
PRUNE = sg.ChannelPruningConfig(ratio=0.0, head_ratio=0.5, ffn_ratio=0.75)  # 1 of 2 KV groups, 3/4 of the MLP
FAST = FinetuneConfig(epochs=1, max_steps=30, batch_size=8, lr=3e-3)


# ---- losses -------------------------------------------------------------------------------------------
def _pair(first: list[float], last: list[float]) -> torch.Tensor:
    """(1, 2, 2) logits: position 0 predicts token 1; position 1 predicts past the window (never scored)."""
    return torch.tensor([[first, last]])


@pytest.mark.parametrize(("name", "student", "teacher", "kwargs", "expected"), [
    ("identical", _pair([1.0, 2.0], [0.0, 0.0]), _pair([1.0, 2.0], [5.0, 0.0]), dict(temperature=1.0), 0.0),
    ("T=1", _pair([0.0, 0.0], [0.0, 0.0]), _pair([LN3, 0.0], [0.0, 0.0]), dict(temperature=1.0), KL_HAND),
    ("T=2 keeps the T^2 scale", _pair([0.0, 0.0], [9.0, 0.0]), _pair([2 * LN3, 0.0], [0.0, 9.0]),
     dict(temperature=2.0), 4 * KL_HAND),
])
def test_causal_lm_kl_hand_computed_and_ignores_the_last_position(name, student, teacher, kwargs, expected):
    assert float(L.causal_lm_kl(student, teacher, **kwargs)) == pytest.approx(expected, abs=1e-6), name


def test_kl_is_teacher_to_student_not_the_reverse():
    s, t = _pair([0.0, 0.0], [0.0, 0.0]), _pair([LN3, 0.0], [0.0, 0.0])
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert float(L.causal_lm_kl(s, t, temperature=1.0)) == pytest.approx(KL_HAND, abs=1e-6)
    assert abs(KL_HAND - reverse) > 0.01  # the two directions differ, so the check above tells them apart


def test_next_token_ce_scores_each_token_from_the_position_before():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = LN3 + math.log(3.0)  # position 0 puts p = 9 / 12 = 0.75 on token 2
    ids = torch.tensor([[1, 2, 3]])  # position 0 -> token 2 (p 0.75), position 1 -> token 3 (uniform, 0.25)
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    assert float(L.next_token_ce(logits, ids)) == pytest.approx(expected, abs=1e-6)


def test_padding_is_masked_out_of_every_term():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # row 1 right-padded after 3 real tokens
    s2, t2, ids2 = s.clone(), t.clone(), ids.clone()
    s2[1, 3:], t2[1, 3:], ids2[1, 3:] = 50.0, -50.0, 0  # garbage under the padding
    for fn in (lambda a, b, i: L.causal_lm_kl(a, b, mask, 2.0), lambda a, b, i: L.next_token_ce(a, i, mask),
               lambda a, b, i: L.causal_lm_kd_loss(a, b, i, mask, alpha=0.5, targets="hard")):
        assert float(fn(s2, t2, ids2)) == pytest.approx(float(fn(s, t, ids)), abs=1e-6)
    # the mean is over the 4 + 2 predicted real tokens: the padded row counts for its 2 predictions only
    per_row = [L.causal_lm_kl(s[i : i + 1, : n], t[i : i + 1, : n], None, 2.0) for i, n in ((0, 5), (1, 3))]
    assert float(L.causal_lm_kl(s, t, mask, 2.0)) == pytest.approx(float(per_row[0] * 4 + per_row[1] * 2) / 6,
                                                                   abs=1e-5)


def test_alpha_mixes_kl_with_the_next_token_cross_entropy():
    torch.manual_seed(1)
    s, t, ids = torch.randn(2, 4, 6), torch.randn(2, 4, 6), torch.randint(0, 6, (2, 4))
    kl, ce = L.causal_lm_kl(s, t, None, 2.0), L.next_token_ce(s, ids)
    got = L.causal_lm_kd_loss(s, t, ids, temperature=2.0, alpha=0.3)
    assert float(got) == pytest.approx(float(0.3 * kl + 0.7 * ce), abs=1e-6)
    assert float(L.causal_lm_kd_loss(s, t, ids, alpha=0.0)) == pytest.approx(float(ce), abs=1e-6)
    hard = L.causal_lm_kd_loss(s, t, ids, alpha=1.0, targets="hard")
    shifted = torch.cat([ids[:, :1], t.argmax(-1)[:, :-1]], 1)  # token t + 1 := the teacher's choice at t
    assert float(hard) == pytest.approx(float(L.next_token_ce(s, shifted)), abs=1e-6)


def test_loss_shape_errors_name_both_shapes():
    with pytest.raises(ModelError, match=r"\(1, 2, 3\).*\(1, 2, 4\)"):
        L.causal_lm_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ModelError, match="mask"):
        L.next_token_ce(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 2))


# ---- a pruned tiny Llama learns from its original -----------------------------------------------------
@pytest.fixture(scope="module")
def _lm():
    """A tiny docs-lm trained 150 steps (test perplexity about 40, so pruning visibly hurts) and token
    streams: train, validation, and held-out test documents."""
    from slimguard.data.corpus import load_corpus
    from slimguard.lm.docs_lm import create_docs_lm, encode_documents, tiny_spec, train_lm

    spec = tiny_spec(steps=150, warmup=10)
    torch.manual_seed(0)
    model = create_docs_lm(spec, seed=0)
    tok = model.tokenizer
    train = encode_documents(tok, load_corpus("train")[:300])
    train_lm(model, train, spec, seed=0, progress=False)
    val = encode_documents(tok, load_corpus("val")[:30])
    test = encode_documents(tok, load_corpus("test")[:40])
    return model.eval(), train, val, test


@pytest.fixture
def lm(_lm):
    model, train, val, test = _lm
    return copy.deepcopy(model), train, val, test


def _bundle(train: torch.Tensor, val: torch.Tensor) -> DataBundle:
    meta = DataMeta(name="tokens", task="causal-lm", input_shape=(), num_classes=0, mean=[], std=[], low=0.0,
                    high=0.0, kind="text")
    parts = {n: Split(n, x, None, meta) for n, x in (("train", train), ("val", val), ("test", val))}
    return DataBundle(meta=meta, calib=parts["train"], **parts)


def _ppl(model: nn.Module, stream: torch.Tensor) -> float:
    return perplexity(model, stream[:1536], window=64, stride=32)["perplexity"]


@torch.no_grad()
def _kl_to(student: nn.Module, teacher: nn.Module, stream: torch.Tensor) -> float:
    ids = stream[: 16 * 64].reshape(16, 64)
    return float(L.causal_lm_kl(student(ids), teacher(ids), None, 1.0))


def test_pruning_hurts_and_kl_distillation_from_the_original_recovers_it(lm):
    teacher, train, val, test = lm
    saved = copy.deepcopy(teacher.state_dict())
    student = copy.deepcopy(teacher)
    pruned_info = sg.prune_(student, PRUNE)
    params = sum(p.numel() for p in student.parameters())
    assert params == pruned_info["params_after"] < 0.7 * pruned_info["params_before"]  # really shrank (-35%)
    base, pruned, kl_pruned = _ppl(teacher, test), _ppl(student, test), _kl_to(student, teacher, test)
    assert pruned > 1.08 * base, (base, pruned)  # measured: 40.3 -> 47.1
    # alpha 1: the KL to the teacher is the only loss, so a broken KL leaves the student where pruning left it
    history = distill(teacher, student, _bundle(train, val),
                      DistillConfig(temperature=1.0, alpha=1.0, max_length=64, val_windows=16, finetune=FAST),
                      progress=False)
    recovered = _ppl(student, test)
    # at least half of what pruning lost comes back on held-out documents (measured: more than all of it)
    assert recovered < pruned - 0.5 * (pruned - base), (base, pruned, recovered)
    assert _kl_to(student, teacher, test) < 0.8 * kl_pruned
    assert sum(p.numel() for p in student.parameters()) == params  # still the pruned shapes
    assert history["steps"] == 30 and history["windows"] == 240 and history["window"] == 64
    assert history["teacher_cached"] is False and history["val_perplexity"] > 1.0
    for k, v in teacher.state_dict().items():  # the teacher is left untouched and trainable again
        assert torch.equal(v, saved[k]), k
    assert all(p.requires_grad for p in teacher.parameters())


def test_the_shipped_recipe_steps_prune_then_distill_from_the_original(lm):
    from slimguard.core.recipe import load as load_recipe
    from slimguard.transforms import run_step

    r = load_recipe("docs-lm-prune-distill")
    assert r.task == "causal-lm" and r.model == "zoo:docs-lm" and set(r.budget) == {"max_perplexity_ratio"}
    prune, dist = r.steps
    assert prune.config_name == "channel" and prune.ratio == 0 and prune.head_ratio and prune.ffn_ratio
    assert dist.config_name == "distill" and dist.teacher == "" and dist.alpha > 0
    original, train, val, test = lm
    model = copy.deepcopy(original)
    data = _bundle(train, val)
    run_step(model, prune, data, original=original)
    pruned = _ppl(model, test)
    short = dataclasses.replace(dist, max_length=64, val_windows=16, finetune=FAST)  # the tiny LM's scale
    run_step(model, short, data, original=original, progress=False)
    assert _ppl(model, test) < pruned - 0.5 * (pruned - _ppl(original, test))


def test_alpha_zero_is_plain_fine_tuning_without_running_the_teacher(lm):
    model, train, val, test = lm

    class Refuses(nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("the teacher ran")

    before = _ppl(model, test)
    cfg = DistillConfig(alpha=0.0, max_length=64, val_windows=8, finetune=dataclasses.replace(FAST, max_steps=10))
    history = distill(Refuses(), model, _bundle(train, val), cfg, progress=False)
    assert history["steps"] == 10 and _ppl(model, test) != before


def test_finetune_trains_a_causal_lm_on_its_next_tokens(lm):
    model, train, val, test = lm
    before = _ppl(model, test)
    history = sg.finetune(model, _bundle(train, val), dataclasses.replace(FAST, max_steps=20), progress=False)
    assert history["steps"] == 20 and history["window"] == 128 and history["val_perplexity"] > 1.0
    assert _ppl(model, test) < 0.97 * before  # the fixture LM is undertrained: 20 more steps help


def test_padded_token_batches_train(lm):
    model, train, val, _ = lm
    ids = train[: 24 * 32].reshape(24, 32).clone()
    mask = torch.ones_like(ids)
    mask[::2, 20:] = 0  # every other row right-padded
    ids[mask == 0] = 0
    meta = _bundle(train, val).meta
    split = Split("train", {"input_ids": ids, "attention_mask": mask}, None, meta)
    data = DataBundle(meta=meta, train=split, val=split, test=split, calib=split)
    history = distill(copy.deepcopy(model), model, data,
                      DistillConfig(max_length=32, finetune=dataclasses.replace(FAST, max_steps=3)), progress=False)
    assert history["windows"] == 24 and math.isfinite(history["val_perplexity"])


def test_bad_setups_fail_with_one_line_errors(lm):
    model, train, val, _ = lm
    data = _bundle(train, val)
    cfg = DistillConfig(max_length=64, finetune=dataclasses.replace(FAST, max_steps=1))
    with pytest.raises(ConfigError, match="features"):
        distill(model, copy.deepcopy(model), data, dataclasses.replace(cfg, attention={"model": "model"}))
    from slimguard.lm.docs_lm import create_docs_lm, tiny_spec

    other = create_docs_lm(tiny_spec(vocab_size=600), seed=0)
    with pytest.raises(ModelError, match="vocabulary"):
        distill(other, model, data, cfg, progress=False)
    with pytest.raises(DataError, match="fewer than one window"):
        distill(model, copy.deepcopy(model), _bundle(train[:50], val), cfg, progress=False)
    with pytest.raises(ConfigError, match="val_windows"):
        DistillConfig(val_windows=-1)
