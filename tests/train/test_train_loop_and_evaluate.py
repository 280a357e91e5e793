"""The training loop learns, respects masks, early-stops, is seeded; evaluation measures for real."""

from __future__ import annotations

import pytest
import torch

from slimguard.core.errors import DataError
from slimguard.evaluate import evaluate
from slimguard.models import zoo
from slimguard.prune.magnitude import MagnitudePruningConfig
from slimguard.quantize.dynamic import Int8DynamicConfig
from slimguard.train.loop import Callback, FinetuneConfig, accuracy, finetune
from slimguard.transforms import prune_, quantize_


def test_training_from_scratch_learns(digits):
    m = zoo.create("digits-mlp")
    before = accuracy(m, digits.val)
    hist = finetune(m, digits, FinetuneConfig(epochs=3, lr=2e-3), progress=False)
    assert before < 0.3 and accuracy(m, digits.val) > 0.85
    losses = [e["train_loss"] for e in hist["epochs"]]
    assert losses[-1] < losses[0]


def test_training_is_deterministic(digits):
    a, b = zoo.create("digits-mlp"), zoo.create("digits-mlp")
    for m in (a, b):
        finetune(m, digits, FinetuneConfig(epochs=1, seed=3), progress=False)
    assert torch.equal(a[2].weight, b[2].weight)


def test_masks_are_respected_through_training(zoo_model, digits):
    m = zoo_model("digits-mlp")
    prune_(m, MagnitudePruningConfig(sparsity=0.8))
    zero = m[2].weight == 0
    finetune(m, digits, FinetuneConfig(epochs=2), progress=False)
    assert bool((m[2].weight[zero] == 0).all())
    assert accuracy(m, digits.test) > 0.9


def test_early_stopping_and_restore_best(digits):
    class Spoil(Callback):
        """Ruins the weights after every step from the second epoch on, so the first epoch is best."""

        def on_step_end(self, model, step, total):
            if step > 17:  # ceil(1078 / 64) steps make one epoch
                with torch.no_grad():
                    model[2].weight.mul_(0)

    m = zoo.create("digits-mlp")
    hist = finetune(m, digits, FinetuneConfig(epochs=10, patience=2, lr=3e-3), callbacks=[Spoil()], progress=False)
    assert len(hist["epochs"]) == 3  # epoch 0 best, then two bad epochs
    assert hist["best_epoch"] == 0
    assert accuracy(m, digits.val) == pytest.approx(hist["best_val_score"])


def test_training_mode_is_restored(digits):
    m = zoo.create("digits-mlp").eval()
    finetune(m, digits, FinetuneConfig(epochs=1), progress=False)
    assert not m.training


def test_evaluate_reports_every_metric(zoo_model, digits):
    m = zoo_model("digits-mlp")
    r = evaluate(m, digits.test, repeats=5)
    for key in ("accuracy", "params", "nonzero_params", "size_bytes", "macs", "latency_ms_p50", "latency_ms_p95",
                "throughput_per_s"):
        assert r[key] is not None
    assert r["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert r["macs"] == 64 * 300 + 300 * 100 + 100 * 10  # counted from a real forward of one example
    assert r["latency_ms_p95"] >= r["latency_ms_p50"] > 0


def test_magnitude_pruning_hits_exact_sparsity(zoo_model):
    m = zoo_model("digits-mlp")
    prune_(m, MagnitudePruningConfig(sparsity=0.75))
    total = sum(m[i].weight.numel() for i in (2, 4, 6))
    zeros = sum(int((m[i].weight == 0).sum()) for i in (2, 4, 6))
    assert zeros == round(0.75 * total)
    lm = zoo_model("digits-mlp")
    prune_(lm, MagnitudePruningConfig(sparsity=0.5, scope="layer"))
    for i in (2, 4, 6):
        assert int((lm[i].weight == 0).sum()) == round(0.5 * lm[i].weight.numel())


def test_magnitude_pruning_bad_ignore_entry(zoo_model):
    from slimguard.core.errors import ConfigError

    with pytest.raises(ConfigError, match="ignore: 'fc9' names no module"):
        prune_(zoo_model("digits-mlp"), MagnitudePruningConfig(sparsity=0.5, ignore=["fc9"]))


def test_int8_dynamic_is_close_and_changes_the_model(zoo_model, digits):
    m = zoo_model("digits-mlp")
    ref = m[2].weight.detach().clone()
    logits = m(digits.test.x)
    quantize_(m, Int8DynamicConfig())
    q = m(digits.test.x)
    sqnr = 10 * torch.log10(logits.pow(2).mean() / (logits - q).pow(2).mean())
    assert sqnr > 25  # int8 per-channel weights + dynamic activations: lossy but close
    assert (q != logits).any()
    deq = m[2].dequantized_weight()
    assert (deq - ref).abs().max() <= m[2].weight_scale.max() / 2 + 1e-6  # rounding error <= half a step
    assert (q.argmax(-1) == digits.test.y).float().mean() >= (logits.argmax(-1) == digits.test.y).float().mean() - 0.01


def test_shape_mismatch_is_a_one_line_error(zoo_model, digits32):
    with pytest.raises(DataError, match=r"shape \(1, 32, 32\) but the model expects \(1, 8, 8\)"):
        evaluate(zoo_model("digits-mlp"), digits32.test)


def test_finetune_takes_a_dataloader_or_a_train_val_pair() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    import slimguard as sg
    from slimguard.core.errors import DataError
    from slimguard.train.loop import FinetuneConfig, finetune

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    y = (x[:, 0] > 0).long()  # learnable from the first feature
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    model = torch.nn.Linear(4, 2)
    before = float((model(x).argmax(-1) == y).float().mean())
    history = finetune(model, loader, FinetuneConfig(epochs=30, lr=0.05, patience=0, seed=0), progress=False)
    after = float((model(x).argmax(-1) == y).float().mean())
    assert history["steps"] > 0 and after > max(before, 0.9)
    pair = finetune(torch.nn.Linear(4, 2), (loader, DataLoader(TensorDataset(x[:40], y[:40]), batch_size=40)),
                    FinetuneConfig(epochs=1, patience=0), progress=False)
    assert pair["steps"] > 0
    with pytest.raises(DataError, match="cannot train on a int"):
        sg.finetune(torch.nn.Linear(4, 2), 3)
