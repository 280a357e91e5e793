"""Calibration takes data as users have it: a torch DataLoader, any iterable of batches (tensors, tuples,
dicts), one tensor batch, or a ``forward_loop(model)`` callable (as in ModelOpt), and gives the same
observers as the equivalent split."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import slimguard as sg
from slimguard.core.errors import DataError
from slimguard.data.core import DataMeta, Split

X = torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _split() -> Split:
    meta = DataMeta(name="x", task="classification", input_shape=(1, 8, 8), num_classes=3, mean=[0.5], std=[0.3],
                    low=0.0, high=1.0)
    return Split("calib", X, torch.zeros(48, dtype=torch.long), meta)


def _static(calib: object) -> torch.Tensor:
    model = _model()
    sg.quantize_(model, sg.Int8StaticConfig(), calib=calib)
    with torch.no_grad():
        return model(X)


def _loop(model: nn.Module) -> None:
    for i in range(0, 48, 16):
        model(X[i : i + 16])


@pytest.mark.parametrize("calib", [
    DataLoader(TensorDataset(X, torch.zeros(48, dtype=torch.long)), batch_size=16),
    [X[i : i + 16] for i in range(0, 48, 16)],
    X,
    _loop,
], ids=["dataloader", "list-of-tensors", "one-tensor", "forward-loop"])
def test_user_calibration_matches_the_split(calib: object) -> None:
    want = _static(_split())
    got = _static(calib)
    assert torch.equal(got, want)  # the same examples give the same observed ranges, so the same int8 model
    assert not torch.equal(got, _static([X[:4]]))  # and other examples give another: the data was used


def test_unusable_calibration_data_is_one_line() -> None:
    with pytest.raises(DataError, match="calibration data of type int is not usable; give a Split, a DataLoader"):
        _static(3)


def test_methods_that_need_batches_refuse_a_forward_loop() -> None:
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    with pytest.raises(DataError, match="needs calibration batches, not a forward_loop"):
        sg.quantize_(model, sg.SmoothQuantConfig(), calib=lambda m: m(torch.rand(4, 8)))
