"""Observers: quantize/dequantize round-trip error bounds, per-channel parameters, streaming, bad input,
and their validated configs (keyword options build the config; bad values are named)."""

from __future__ import annotations

import pytest
import torch

from slimguard.core.errors import ConfigError, NotFittedError
from slimguard.quantize.observers import (
    OBSERVERS,
    EntropyObserver,
    EntropyObserverConfig,
    MinMaxObserver,
    MinMaxObserverConfig,
    MovingAverageObserver,
    MovingAverageObserverConfig,
    MSEObserver,
    MSEObserverConfig,
    PercentileObserver,
    PercentileObserverConfig,
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


# ---- configs ---------------------------------------------------------------------------------------------
# (observer name, bad options, text the one-line error must contain: the key and what is allowed)
BAD_OPTIONS = [
    ("minmax", {"axis": "0"}, "minmax.axis: expected int | None, got '0'"),
    ("minmax", {"momentum": 0.5}, "minmax: unknown key 'momentum'; allowed: axis"),
    ("moving-average", {"momentum": 0.0}, "momentum: 0.0 is out of range; allowed: (0.0, 1.0]"),
    ("moving-average", {"momentum": 1.5}, "momentum: 1.5 is out of range"),
    ("moving-average", {"momentum": "fast"}, "moving-average.momentum: expected a number, got 'fast'"),
    ("percentile", {"percentile": 50.0}, "percentile: 50.0 is out of range; allowed: (50.0, 100.0]"),
    ("percentile", {"percentile": 100.5}, "percentile: 100.5 is out of range"),
    ("percentile", {"bins": 1}, "bins: 1 is out of range; allowed: [2, 65536]"),
    ("percentile", {"axis": 0}, "percentile: axis: 0 is not allowed; histogram observers"),
    ("entropy", {"bins": 1 << 20}, "bins: 1048576 is out of range"),
    ("entropy", {"axis": 1}, "entropy: axis: 1 is not allowed"),
    ("entropy", {"percentile": 99.0}, "entropy: unknown key 'percentile'; allowed: axis, bins"),
    ("mse", {"scheme": {"bits": 4}}, "scheme: expected a QScheme"),
    ("mse", {"bins": 0}, "bins: 0 is out of range"),
]


@pytest.mark.parametrize(("name", "options", "message"), BAD_OPTIONS)
def test_each_observer_config_refuses_a_bad_value_naming_the_key(name, options, message):
    with pytest.raises(ConfigError) as by_name:
        make_observer(name, **options)
    assert message in str(by_name.value) and "\n" not in str(by_name.value)
    with pytest.raises(ConfigError) as by_class:
        OBSERVERS.get(name)(**options)  # the class itself checks the same way
    assert str(by_class.value) == str(by_name.value)


def test_every_registered_observer_has_a_bad_value_case():
    assert {name for name, _, _ in BAD_OPTIONS} == set(OBSERVERS)


# (class, its config, options): keyword construction builds exactly the config an explicit one gives
SAME = [
    (MinMaxObserver, MinMaxObserverConfig, {"axis": 0}),
    (MovingAverageObserver, MovingAverageObserverConfig, {"axis": 0, "momentum": 0.5}),
    (PercentileObserver, PercentileObserverConfig, {"percentile": 99.0, "bins": 256}),
    (EntropyObserver, EntropyObserverConfig, {"bins": 512}),
    (MSEObserver, MSEObserverConfig, {"bins": 128, "scheme": QScheme(4, symmetric=True)}),
]


def _state(obs) -> dict:
    """Everything an observer holds besides its config (tensors as lists, so dicts compare exactly)."""
    return {k: v.tolist() if torch.is_tensor(v) else v for k, v in vars(obs).items() if k != "config"}


@pytest.mark.parametrize(("cls", "config_cls", "options"), SAME)
def test_keyword_and_config_construction_give_the_same_state(cls, config_cls, options):
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(2)) * torch.tensor([[0.1], [1], [3], [10]])
    by_kw, by_cfg, by_name = cls(**options), cls(config_cls(**options)), make_observer(cls.name, **options)
    default = cls()
    assert by_kw.config == by_cfg.config == by_name.config == config_cls(**options) != default.config
    assert type(by_name) is cls
    for obs in (by_kw, by_cfg, by_name, default):
        obs(x[:2])
        obs(x[2:])
    assert _state(by_kw) == _state(by_cfg) == _state(by_name)  # same options, same data: identical (atol 0)
    assert _state(default) != _state(by_kw)  # the options took effect
    scheme = QScheme(8, symmetric=False, axis=options.get("axis"))
    s_kw, z_kw = by_kw.qparams(scheme)
    for other in (by_cfg, by_name):
        s, z = other.qparams(scheme)
        assert torch.equal(s, s_kw) and torch.equal(z, z_kw)


def test_a_config_and_keywords_together_or_another_observers_config_are_refused():
    with pytest.raises(ConfigError, match="give a PercentileObserverConfig or keyword options"):
        PercentileObserver(PercentileObserverConfig(), bins=64)
    with pytest.raises(ConfigError, match="expected a PercentileObserverConfig, got MinMaxObserverConfig"):
        PercentileObserver(MinMaxObserverConfig())


def test_unknown_observer_name_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="unknown observer 'median'; allowed: entropy, minmax, moving-average, "
                                          "mse, percentile"):
        make_observer("median")


def test_each_option_changes_what_the_observer_chooses():
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(20_000, generator=g), torch.tensor([40.0, -40.0])])
    scheme = QScheme(8, symmetric=False)

    def scale(name: str, **options) -> float:
        obs = make_observer(name, **options)
        obs(x)
        return float(obs.qparams(scheme)[0])

    assert scale("percentile", percentile=99.0) < scale("percentile", percentile=99.99) / 1.5  # clips harder
    assert scale("percentile", percentile=100.0) == pytest.approx(80 / 255, rel=1e-3)  # keeps everything
    # the MSE range is chosen for the scheme it is given: with 2-bit codes clipping the two outliers costs less
    # than the rounding error of spreading 4 levels over them, so the range is far tighter than for 8 bits
    assert scale("mse", scheme=QScheme(2, symmetric=False)) < scale("mse") / 4
    assert make_observer("mse", scheme=QScheme(2)).scheme == QScheme(2)
    # momentum 1 keeps only the last batch's range; the default moves a tenth of the way towards it
    for momentum, expected in ((1.0, 1.0), (0.1, 0.9 * 4 + 0.1 * 1)):
        ma = make_observer("moving-average", momentum=momentum)
        ma(torch.tensor([-4.0, 4.0]))
        ma(torch.tensor([-1.0, 1.0]))
        lo, hi = ma.value_range()
        assert float(hi) == pytest.approx(expected) and float(lo) == pytest.approx(-expected)
    assert make_observer("entropy", bins=256).hist.numel() == 256
