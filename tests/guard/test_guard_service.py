"""Guard end to end (contract -> model -> detector -> monitor) and the ``ood`` / ``faults`` commands."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from slimguard.cli import build_app
from slimguard.core.errors import ConfigError
from slimguard.guard import ContractViolation, Guard, MonitorConfig, make_detector

runner = CliRunner()
APP = build_app()


@pytest.fixture
def guard(zoo_model, digits):
    model = zoo_model("digits-mlp")
    g = Guard.build(model, digits, detector="energy", protect=("range", "checksums"),
                    monitor_config=MonitorConfig(window=200, min_samples=20))
    yield g
    g.close()


def test_guard_answers_flags_ood_and_monitors(guard, digits):
    from slimguard import data

    res = guard(digits.test.x[:100], ids=list(range(100)))
    assert (res.pred == digits.test.y[:100]).float().mean() >= 0.95
    assert res.ood.float().mean() <= 0.15 and res.probs.shape == (100, 10)
    assert guard.status()["state"] == "ok"
    assert guard.add_labels(list(range(100)), digits.test.y[:100]) == 100
    far = data.load("digits-ood").test.x[:200]
    res = guard(far)
    assert res.ood.float().mean() >= 0.8
    st = guard.status()
    assert st["state"] == "alert" and st["metrics"]["ood_rate"]["state"] == "alert"
    assert "slimguard_state 2" in guard.prometheus()
    assert json.dumps(res.to_dict())  # JSON-able for the service


@pytest.mark.parametrize("bad", [torch.full((2, 1, 8, 8), float("nan")), torch.zeros(0, 1, 8, 8),
                                 torch.zeros(2, 64), torch.zeros(2, 1, 8, 8, dtype=torch.float64), [1, 2, 3]],
                         ids=["nan", "empty", "shape", "dtype", "list"])
def test_guard_rejects_bad_inputs_before_the_model(guard, bad):
    calls = []
    h = guard.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ContractViolation):
            guard(bad)
        assert guard.check(bad)[0]["allowed"]
    finally:
        h.remove()
    assert calls == []  # never passed to the model
    assert guard.monitor.counters["rejected"] >= 1


def test_guard_repairs_a_flipped_weight_and_needs_a_calibrated_detector(guard, zoo_model, digits):
    from slimguard.guard.faults import flip_bit_

    want = guard(digits.test.x[:50]).logits
    flip_bit_(guard.model.get_parameter("2.weight"), 11, 30)
    torch.testing.assert_close(guard(digits.test.x[:50]).logits, want, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="no threshold"):
        Guard(zoo_model("digits-mlp"), detector=make_detector("msp", guard.model).fit(digits.train))
    with pytest.raises(ConfigError, match="unknown protection 'magic'; allowed: checksums, range"):
        Guard.build(guard.model, digits, protect=("magic",))


def test_ood_command_json():
    result = runner.invoke(APP, ["ood", "zoo:digits-mlp", "--detector", "energy", "--detector", "mahalanobis",
                                 "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out["detectors"]) == {"energy", "mahalanobis"}
    assert out["detectors"]["mahalanobis"]["digits-ood"]["auroc"] >= 0.98
    assert "digits-ood-near" in out["detectors"]["energy"]


def test_faults_command_json():
    result = runner.invoke(APP, ["faults", "zoo:digits-mlp", "--trials", "200", "--bit", "30", "--protect", "range",
                                 "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["unprotected"]["trials"] == 200
    assert out["range_restriction"]["sdc"] * 5 <= out["unprotected"]["sdc"]


@pytest.mark.parametrize(("args", "message"), [
    (["ood", "zoo:digits-mlp", "--ood", "digits32-ood"], "has examples of shape (1, 32, 32)"),
    (["ood", "zoo:digits-mlp", "--detector", "lof"], "unknown detector 'lof'"),
    (["faults", "zoo:digits-mlp", "--bit", "most"], "bits: 'most' is not allowed"),
    (["faults", "zoo:digits-mlp", "--bit", "30", "--bit", "sign"], "--bit: '30 sign' mixes names and positions"),
    (["faults", "zoo:digits-mlp", "--protect", "prayer"], "protect: 'prayer' is not allowed"),
    (["ood", "zoo:nope"], "unknown zoo model"),
])
def test_commands_reject_bad_input_with_one_line(args, message):
    result = runner.invoke(APP, args)
    assert result.exit_code == 2
    assert message in result.output
