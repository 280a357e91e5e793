"""Input contracts: inferred from training data, each violation kind caught, YAML round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimguard.core.errors import ConfigError, DataError
from slimguard.guard.contract import Contract, ContractViolation, basic_check


@pytest.fixture(scope="module")
def image_contract(digits):
    return Contract.infer(digits.train, margin=0.05)


@pytest.fixture(scope="module")
def tabular():
    from slimguard import data

    bundle = data.load("breast-cancer")
    return bundle, Contract.infer(bundle.train, margin=0.05)


def test_inferred_contract_accepts_held_out_data(image_contract, digits, tabular):
    assert image_contract.input_shape == (1, 8, 8)
    assert image_contract.dtypes == ["float32"]
    assert image_contract.low == pytest.approx(-0.05) and image_contract.high == pytest.approx(1.05)
    assert image_contract.check(digits.test.x) == []
    bundle, contract = tabular
    assert isinstance(contract.low, list) and len(contract.low) == 30  # per feature for tabular data
    assert contract.check(bundle.train.x) == []


def _nan(x):
    x = x.clone()
    x[1, 0, 2, 3] = float("nan")
    return x


def _inf(x):
    x = x.clone()
    x[0, 0, 0, 0] = float("inf")
    return x


def _big(x):
    x = x.clone()
    x[2, 0, 4, 4] = 7.5
    return x


CASES = [
    # (name, make bad input from a good batch, kind, field, value, allowed contains)
    ("nan", _nan, "nonfinite", "x", "nan", "finite"),
    ("inf", _inf, "nonfinite", "x", "inf", "finite"),
    ("range", _big, "range", "x", "7.5", "[-0.05, 1.05]"),
    ("shape", lambda x: x[:, :, :4, :], "shape", "shape", [4, 1, 4, 8], "(N, 1, 8, 8)"),
    ("flat", lambda x: x.flatten(1), "shape", "shape", [4, 64], "(N, 1, 8, 8)"),
    ("dtype", lambda x: x.double(), "dtype", "dtype", "float64", "float32"),
    ("int", lambda x: (x * 16).long(), "dtype", "dtype", "int64", "float32"),
    ("empty", lambda x: x[:0], "empty", "batch", 0, "at least one"),
    ("list", lambda x: x.tolist(), "type", "x", "list", "tensor"),
    ("string", lambda x: "hello", "type", "x", "str", "tensor"),
]


@pytest.mark.parametrize(("name", "make", "kind", "field", "value", "allowed"), CASES, ids=[c[0] for c in CASES])
def test_each_violation_kind_is_reported_with_a_structured_reason(image_contract, digits, name, make, kind, field,
                                                                   value, allowed):
    bad = make(digits.test.x[:4])
    got = image_contract.check(bad)
    assert got, name
    v = got[0]
    assert (v.kind, v.field, v.value) == (kind, field, value)
    assert allowed in v.allowed
    with pytest.raises(ContractViolation) as err:
        image_contract.validate(bad)
    assert err.value.violations[0].kind == kind
    assert isinstance(err.value, DataError)  # the CLI and service turn it into a one-line error


def test_nonfinite_rows_are_named_and_not_double_reported(image_contract, digits):
    got = image_contract.check(_nan(digits.test.x[:4]))
    assert [v.kind for v in got] == ["nonfinite"]
    assert got[0].rows == [1] and got[0].count == 1


def test_per_feature_range_names_the_feature_and_worst_value(tabular):
    bundle, contract = tabular
    x = bundle.test.x[:5].clone()
    x[3, 7] = 1e6
    got = contract.check(x)
    assert len(got) == 1
    v = got[0]
    assert v.kind == "range" and v.field == "x[7]" and v.value == "1e+06" and v.rows == [3]
    lo, hi = contract.low[7], contract.high[7]
    assert v.allowed == f"[{lo:.6g}, {hi:.6g}]"
    ok = contract.row_ok(x)
    assert ok.tolist() == [True, True, True, False, True]


def test_max_batch_and_numpy_inputs(digits):
    c = Contract.infer(digits.train, max_batch=8)
    assert c.check(digits.test.x[:9].numpy())[0].kind == "batch"
    assert c.check(digits.test.x[:8].numpy()) == []
    assert torch.is_tensor(c.validate(np.zeros((2, 1, 8, 8), dtype=np.float32)))


def test_yaml_round_trip_and_hand_edit(tmp_path, image_contract, tabular):
    _, tab = tabular
    for c in (image_contract, tab):
        assert Contract.from_yaml(c.to_yaml()) == c
    path = image_contract.save(tmp_path / "contract.yaml")
    text = path.read_text().replace("high: 1.05", "high: 0.5")  # tighten by hand
    path.write_text(text)
    edited = Contract.load(path)
    assert edited.high == 0.5
    assert edited.check(torch.full((1, 1, 8, 8), 0.7))[0].kind == "range"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("input_shape: [1, 8, 8]\ndtypes: [float32]\nlow: 0\nhigh: 1\ncolour: red\n", "unknown key 'colour'"),
        ("input_shape: [1, 8, 8]\ndtypes: [float32]\nlow: 0\n", "key 'high' is missing"),
        ("input_shape: [2]\ndtypes: [floaty]\nlow: 0\nhigh: 1\n", "'floaty' is not a torch dtype"),
        ("input_shape: [3]\ndtypes: [float32]\nlow: [0, 1]\nhigh: 1\n", "2 bounds given but the input has 3"),
        ("- a\n- b\n", "expected a mapping"),
        ("contract_version: 9\ninput_shape: [1]\ndtypes: [float32]\nlow: 0\nhigh: 1\n", "contract_version 9"),
    ],
)
def test_bad_contract_files_name_the_problem(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        Contract.from_yaml(text)


def test_basic_check_without_contract():
    assert basic_check(torch.zeros(2, 3)) == []
    assert basic_check(torch.zeros(0, 3))[0].kind == "empty"
    assert basic_check(torch.tensor([[1.0, float("nan")]]))[0].kind == "nonfinite"
    assert basic_check({"x": 1})[0].kind == "type"
