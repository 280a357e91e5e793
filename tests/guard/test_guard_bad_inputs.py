"""Guard pieces fail closed: contracts refuse NaN or inverted bounds (a NaN bound used to let 1e30
through), the check rejects everything against a NaN bound, a 0-d input is a contract violation naming
the expected shape, and the monitor refuses malformed records and alerts on NaN."""

from __future__ import annotations

import pytest
import torch

from slimguard.core.errors import ConfigError, DataError
from slimguard.guard import ContractViolation, Guard
from slimguard.guard.contract import Contract
from slimguard.guard.monitor import Monitor, MonitorConfig

SHAPE = (3,)


def _contract(**change):
    fields = {"input_shape": SHAPE, "dtypes": ["float32"], "low": 0.0, "high": 1.0, **change}
    return Contract(**fields)


NAN = float("nan")
BAD_FIELDS = [
    ("nan-low", {"low": NAN}, "contract low: nan is not allowed; allowed: numbers, not NaN"),
    ("nan-in-list", {"high": [1.0, NAN, 1.0]}, "contract high: [1.0, nan, 1.0] is not allowed"),
    ("inverted", {"low": 2.0, "high": 1.0}, "the low bound (2) is above the high bound (1)"),
    ("inverted-feature", {"low": [0.0, 5.0, 0.0], "high": [1.0, 1.0, 1.0]}, "the low bound of x[1] (5)"),
    ("string-bound", {"low": "zero"}, "contract low: 'zero' is not allowed; allowed: a number"),
    ("bool-bound", {"high": True}, "contract high: True is not allowed"),
    ("shape", {"input_shape": [3, "x"]}, "contract input_shape: [3, 'x'] is not allowed"),
    ("zero-dim", {"input_shape": [0]}, "contract input_shape: [0] is not allowed"),
    ("dtypes", {"dtypes": "float32"}, "contract dtypes: 'float32' is not allowed"),
    ("max-batch", {"max_batch": 2.5}, "contract max_batch: 2.5 is not allowed"),
    ("nonfinite-flag", {"allow_nonfinite": "no"}, "contract allow_nonfinite: 'no' is not allowed"),
    ("margin", {"margin": NAN}, "contract margin: nan is out of range"),
]


@pytest.mark.parametrize(("name", "change", "message"), BAD_FIELDS, ids=[c[0] for c in BAD_FIELDS])
def test_contract_refuses_bad_fields_at_construction(name, change, message):
    with pytest.raises(ConfigError) as err:
        _contract(**change)
    assert message in str(err.value) and "\n" not in str(err.value), name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("input_shape: [3]\ndtypes: [float32]\nlow: .nan\nhigh: 1\n", "contract low: nan is not allowed"),
        ("input_shape: [3]\ndtypes: [float32]\nlow: 1\nhigh: 0\n", "above the high bound"),
        ("input_shape: &s [3]\ndtypes: [float32]\nlow: 0\nhigh: 1\n", "YAML anchors and aliases"),
        ("input_shape: [3]\ndtypes: [float32]\nlow: .inf\nhigh: .inf\nmargin: -1\n", "margin: -1 is out of range"),
    ],
    ids=["yaml-nan", "yaml-inverted", "yaml-anchor", "yaml-margin"],
)
def test_contract_files_with_bad_bounds_are_refused(tmp_path, text, message):
    path = tmp_path / "contract.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Contract.load(path)


def test_binary_contract_file_is_a_config_error(tmp_path):
    path = tmp_path / "contract.yaml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 128\)"):
        Contract.load(path)


def test_check_fails_closed_when_a_bound_becomes_nan():
    c = _contract()
    assert c.check(torch.full((2, 3), 0.5)) == []
    c.low = c.high = NAN  # bypasses construction: the check itself must still reject
    got = c.check(torch.full((2, 3), 1e30))
    assert [v.kind for v in got] == ["range"] and got[0].rows == [0, 1] and got[0].count == 6
    assert c.row_ok(torch.full((2, 3), 0.5)).tolist() == [False, False]
    per_feature = _contract(low=[0.0] * 3, high=[1.0] * 3)
    per_feature.high = [1.0, NAN, 1.0]
    got = per_feature.check(torch.full((1, 3), 0.5))
    assert [(v.kind, v.field) for v in got] == [("range", "x[1]")]


def test_infer_refuses_nan_fits_and_bad_margins():
    huge = torch.tensor([[-1e308], [1e308]], dtype=torch.float64)  # span overflows: 0 * inf is NaN
    with pytest.raises(DataError, match="span more than float64 can hold"):
        Contract.infer(huge, margin=0.0)
    with pytest.raises(ConfigError, match="margin: nan is out of range"):
        Contract.infer(torch.rand(10, 3), margin=NAN)


# ---- Guard and monitor -------------------------------------------------------------------------------------
@pytest.fixture
def tiny_guard():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    monitor = Monitor(MonitorConfig(window=50, min_samples=5), reference=torch.softmax(torch.randn(20, 2), -1))
    return Guard(model, _contract(), monitor=monitor)


@pytest.mark.parametrize("with_contract", [True, False], ids=["contract", "basic-checks"])
def test_guard_refuses_a_0d_tensor_naming_the_shape(tiny_guard, with_contract):
    if not with_contract:
        tiny_guard.contract = None
    calls = []
    tiny_guard.model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ContractViolation) as err:  # was: TypeError "len() of a 0-d tensor" from the count
        tiny_guard(torch.tensor(1.0))
    v = err.value.violations[0]
    assert v.kind == "shape" and v.value == []
    assert ("(N, 3)" if with_contract else "(N, ...) with a batch dimension") in str(err.value)
    assert "\n" not in str(err.value)
    assert calls == [] and tiny_guard.monitor.counters["rejected"] == 1


def test_monitor_refuses_malformed_records_and_alerts_on_nan():
    mon = Monitor(MonitorConfig(window=50, min_samples=5), reference=torch.softmax(torch.randn(20, 2), -1))
    for bad, message in [(torch.tensor(0.5), r"shape \(N, num_classes\), got \(\)"),
                         (torch.rand(4), r"got \(4,\)"), ([0.5, 0.5], "got list")]:
        with pytest.raises(DataError, match=message):
            mon.observe(bad)
    with pytest.raises(DataError, match=r"OOD flags must have shape \(4,\)"):
        mon.observe(torch.rand(4, 2), ood=torch.zeros(3, dtype=torch.bool))
    for n in (0, -1, 1.5, True):
        with pytest.raises(DataError, match="rejected count"):
            mon.record_rejected(n)
    assert mon.counters["predictions"] == 0  # nothing half-recorded
    mon.observe(torch.full((10, 2), NAN))
    status = mon.status()
    assert status["metrics"]["confidence"]["state"] == "alert" and status["state"] == "alert"  # not "ok"
