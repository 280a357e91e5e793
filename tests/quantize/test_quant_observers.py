"""Observers: quantize/dequantize round-trip error bounds, per-channel parameters, streaming, bad input."""

from __future__ import annotations

import pytest
import torch

from slimguard.core.errors import ConfigError, NotFittedError
from slimguard.quantize.observers import (
    OBSERVERS,
    QScheme,
    dequantize,
    fake_quantize,
    make_observer,
    quantize,
    sqnr,
)

# (observer, symmetric, minimum SQNR in dB on N(0, 1) data at 8 bits; clipping observers trade a little
# in-range precision for range, uniform 8-bit over +-4 sigma gives about 40 dB)
CASES = [(name, sym, 30.0) for name in OBSERVERS for sym in (True, False)]


@pytest.mark.parametrize(("name", "symmetric", "min_db"), CASES)
def test_round_trip_error_is_bounded(name, symmetric, min_db):
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(1))
    obs = make_observer(name)
    for chunk in x.split(5000):  # streamed in batches
        obs(chunk)
    scheme = QScheme(8, symmetric=symmetric)
    scale, zp = obs.qparams(scheme)
    q = quantize(x, scale, zp, scheme)
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    back = dequantize(q, scale, zp)
    lo = (scheme.qmin - zp.float()) * scale
    hi = (scheme.qmax - zp.float()) * scale
    inside = (x >= lo) & (x <= hi)
    # inside the representable range the error is at most half a step (float slack 1e-4)
    assert float((back - x)[inside].abs().max()) <= float(scale) / 2 * (1 + 1e-4)
    assert sqnr(x, back) > min_db
    assert torch.allclose(fake_quantize(x, scale, zp, scheme), back, atol=1e-6)


def test_per_channel_beats_per_tensor_on_uneven_channels():
    w = torch.randn(16, 64) * torch.logspace(-2, 0, 16)[:, None]
    per_t, per_c = make_observer("minmax"), make_observer("minmax", axis=0)
    per_t(w)
    per_c(w)
    s_t, z_t = per_t.qparams(QScheme(8))
    s_c, z_c = per_c.qparams(QScheme(8, axis=0))
    assert s_c.shape == (16,)
    err_t = sqnr(w, fake_quantize(w, s_t, z_t, QScheme(8)))
    err_c = sqnr(w, fake_quantize(w, s_c, z_c, QScheme(8, axis=0)))
    assert err_c > err_t + 5  # dB


def test_streaming_minmax_equals_one_pass():
    x = torch.randn(1000)
    a, b = make_observer("minmax"), make_observer("minmax")
    a(x)
    b(x[:300])
    b(x[300:])
    assert torch.equal(a.qparams(QScheme())[0], b.qparams(QScheme())[0])


def test_percentile_clips_outliers_that_minmax_keeps():
    x = torch.cat([torch.randn(100_000), torch.tensor([1000.0])])
    mm, pc = make_observer("minmax"), make_observer("percentile")
    mm(x)
    pc(x)
    assert pc.qparams(QScheme())[0] < mm.qparams(QScheme())[0] / 20


@pytest.mark.parametrize(("call", "error"), [
    (lambda: QScheme(bits=9), ConfigError),
    (lambda: QScheme(bits=1), ConfigError),
    (lambda: make_observer("median"), ConfigError),
    (lambda: make_observer("entropy", axis=0), ConfigError),
    (lambda: make_observer("minmax").qparams(QScheme()), NotFittedError),
])
def test_bad_input(call, error):
    with pytest.raises(error):
        call()
