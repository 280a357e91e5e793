"""SmoothQuant keeps the float function and flattens activation outliers; mixed precision keeps its budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import slimguard as sg
from slimguard.core.errors import DataError
from slimguard.quantize.smooth import smooth_


class Block(nn.Module):
    """LayerNorm read by two Linears (like q/k/v), then a LayerNorm read by one Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ln1, self.q, self.k = nn.LayerNorm(32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.ln2, self.out = nn.LayerNorm(32), nn.Linear(32, 8)
        with torch.no_grad():
            self.ln1.weight[3] = 40.0  # an outlier channel, as transformers have

    def forward(self, x):
        h = self.ln1(x)
        return self.out(self.ln2(self.q(h) + self.k(h)))


def test_smoothquant_preserves_function_and_shrinks_outliers():
    model = Block().eval()
    x = torch.randn(64, 32)
    ref = model(x).detach()
    before = model.ln1(x).detach().abs().amax(0)
    groups = smooth_(model, [x[:32], x[32:]], alpha=0.5)
    assert {g["norm"] for g in groups} == {"ln1", "ln2"}
    assert next(g for g in groups if g["norm"] == "ln1")["linears"] == ["k", "q"]
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)  # same function in float
    after = model.ln1(x).detach().abs().amax(0)
    assert float(after.max() / after.median()) < float(before.max() / before.median()) / 3


def test_smoothquant_step_needs_calibration():
    with pytest.raises(DataError, match="calibration"):
        sg.quantize_(Block(), sg.SmoothQuantConfig())


def test_mixed_precision_respects_budget(zoo_model, digits):
    m = zoo_model("digits-mlp")
    report = sg.quantize_(m, sg.MixedPrecisionConfig(budget=1.0, bits=[2, 4, 8], group_size=32), data=digits)
    assert report["accuracy_drop"] <= 1.0 and report["evaluated_on"] == "val"
    assert set(report["bits"]) == {"2", "4", "6"}
    assert all(b in (2, 4, 8, None) for b in report["bits"].values())
    assert set(report["sensitivity"]["2"]) == {2, 4, 8}


def test_mixed_precision_needs_labels(zoo_model, digits):
    unlabeled = dataclasses.replace(digits.calib, y=None)
    with pytest.raises(DataError, match="labelled"):
        sg.quantize_(zoo_model("digits-mlp"), sg.MixedPrecisionConfig(), calib=unlabeled)
