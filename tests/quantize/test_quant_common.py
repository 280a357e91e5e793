"""The shared parts every quantization method uses: layer selection with reasons, and calibration that
restores the model's mode and turns a misfit batch into a one-line DataError."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from slimguard.core.errors import DataError
from slimguard.quantize.calibrate import calibrate, calibration_batches, calibration_split, run_calibration
from slimguard.quantize.common import conv_padding_reason, select_layers, set_submodule


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding="same")
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        self.head = nn.Linear(4, 2)


def test_select_layers_reports_why_layers_stay_float():
    net = Net()
    chosen, kept = select_layers(net, (nn.Linear, nn.Conv2d), ignore=["head"], check=conv_padding_reason)
    assert chosen == ["body.0", "body.2"]
    reasons = {k["layer"]: k["reason"] for k in kept}
    assert reasons["head"] == "ignored by config" and "padding 'same'" in reasons["conv"]
    # prefixes cover everything below them; the root is never selected (it cannot be replaced in place)
    assert select_layers(net, (nn.Linear,), ignore=["body"])[0] == ["head"]
    root_chosen, root_kept = select_layers(nn.Linear(2, 2), (nn.Linear,))
    assert root_chosen == [] and "wrap it" in root_kept[0]["reason"]
    set_submodule(net, "body.2", nn.Identity())
    assert isinstance(net.body[2], nn.Identity)


def test_calibrate_restores_mode_on_success_and_on_error():
    model = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    n = calibrate(model, [torch.randn(2, 4), torch.randn(3, 4)], "test", progress=False)
    assert n == 2 and seen == [False, False] and model.training  # ran in eval mode, train mode restored
    with pytest.raises(DataError, match=r"^test: the model cannot run on calibration batch of shape \(2, 5\)"):
        calibrate(model, [torch.randn(2, 5)], "test", progress=False)
    assert model.training


def test_calibration_split_and_batches(digits):
    with pytest.raises(DataError, match="needs calibration data"):
        calibration_split(None, None, "X")
    text = dataclasses.replace(digits.calib, x=["a b", "c", "d e f"], y=None)
    with pytest.raises(DataError, match="must be a tensor"):
        calibration_split(text, None, "X")
    assert calibration_split(text, None, "X", text_ok=True) is text

    class Tok(nn.Module):
        def tokenize(self, texts):
            return {"ids": torch.tensor([[len(t)] for t in texts])}

        def forward(self, ids):
            return ids.float()

    batches = list(calibration_batches(Tok(), text, batch_size=2))
    assert [b["ids"].tolist() for b in batches] == [[[3], [1]], [[5]]]
    with pytest.raises(DataError, match="no tokenize"):
        list(calibration_batches(nn.Identity(), text, batch_size=2))
    assert run_calibration(nn.Identity(), digits.calib, batch_size=64, max_batches=2, what="X", progress=False) == 2
