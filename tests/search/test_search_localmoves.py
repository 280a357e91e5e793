"""Local moves: the feasible Pareto points extended by one more stage, queued between the sampler's trials.

Extensions come only from feasible front points (on validation objectives), are never queued twice, respect
``--trials`` (and the half-of-trials cap), and ``--no-local-moves`` queues none."""

from __future__ import annotations

import json

import optuna
import pytest
from typer.testing import CliRunner

import slimguard  # noqa: F401  (fills the registries)
from slimguard.cli import build_app
from slimguard.core.recipe import loads
from slimguard.search import Settings, optimize
from slimguard.search import localmoves as lm
from slimguard.search import warmstart as ws
from slimguard.search.space import STAGES, Proxies, build_space

SPACE = build_space({"structured": ["none", "channel"], "sparsify": ["none"], "factorize": ["none"],
                     "train": ["none", "finetune"], "quantize": ["none", "half", "weight-sharing"], "groups": False})
PROXIES = Proxies()


def _dists(params: dict) -> dict:
    out = {}
    for name in params:
        if name in SPACE.stages:
            out[name] = optuna.distributions.CategoricalDistribution(list(SPACE.stages[name]))
            continue
        step, _, path = name.partition(".")
        p = SPACE.params[step][path]
        out[name] = (optuna.distributions.CategoricalDistribution(list(p.choices)) if p.choices else
                     optuna.distributions.IntDistribution(int(p.low), int(p.high)) if p.integer else
                     optuna.distributions.FloatDistribution(p.low, p.high))
    return out


def pipeline(**chosen) -> dict:
    """Parameters of a trial: every stage the space varies, ``none`` unless given, plus the steps' options."""
    params = {s.name: "none" for s in STAGES if len(SPACE.stages[s.name]) > 1}
    params.update(chosen)
    return params


def done(study, params: dict, size: float, speed: float, drop: float, **attrs) -> None:
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, values=[size, speed], params=params, distributions=_dists(params),
        user_attrs={"size_ratio": size, "steps": [{"x": {}}], "val_accuracy_drop_points": drop, **attrs}))


PRUNED = pipeline(structured="channel", **{"channel.ratio": 0.5}, train="finetune", **{"finetune.epochs": 12})


def test_extensions_add_each_option_of_each_later_stage_once_at_the_middle_of_its_range():
    moves = lm.extensions(PRUNED, SPACE, PROXIES)
    assert [(m["stage"], m["step"]) for m in moves] == [("quantize", "half"), ("quantize", "weight-sharing")]
    assert moves[1]["params"] == {**PRUNED, "quantize": "weight-sharing", "weight-sharing.bits": 5}  # [3, 6]
    assert moves[0]["params"] == {**PRUNED, "quantize": "half"}  # half.dtype is fixed, not a parameter
    only_pruned = pipeline(structured="channel", **{"channel.ratio": 0.5})
    assert [m["step"] for m in lm.extensions(only_pruned, SPACE, PROXIES)] == ["finetune", "half", "weight-sharing"]
    assert lm.extensions(pipeline(quantize="half"), SPACE, PROXIES) == []  # nothing after the last stage
    grouped = build_space({"structured": ["none"], "sparsify": ["none"], "factorize": ["none"], "train": ["none"],
                           "quantize": ["none", "weight-only"]})
    keep = lm.extensions({"quantize": "none"}, grouped, Proxies({}, ("a", "b")))
    assert keep[0]["params"] == {"quantize": "weight-only", "weight-only.bits": 8, "weight-only.keep_ends": False}


def test_longer_training_takes_the_next_longer_epoch_choice_and_stops_at_the_longest():
    short = pipeline(structured="channel", **{"channel.ratio": 0.5}, train="finetune", **{"finetune.epochs": 3})
    moves = lm.longer(short, SPACE)
    assert moves == [{"stage": "train", "step": "finetune", "params": {**short, "finetune.epochs": 6},
                      "change": "finetune.epochs 3 -> 6"}]
    assert lm.extensions(short, SPACE, PROXIES)[-1] == moves[0]  # after the added stages
    assert lm.longer(PRUNED, SPACE) == []  # 12 epochs: the longest choice
    assert lm.longer(pipeline(structured="channel", **{"channel.ratio": 0.5}), SPACE) == []  # no training step


def test_a_round_extends_only_feasible_front_points_round_robin():
    study = optuna.create_study(directions=["minimize", "minimize"])
    done(study, PRUNED, 0.25, 0.36, 0.2)                                       # 0: on the front
    done(study, pipeline(structured="channel", **{"channel.ratio": 0.2}), 0.7, 0.7, 0.1)  # 1: dominated by 0
    done(study, pipeline(structured="channel", **{"channel.ratio": 0.6}), 0.1, 0.2, 3.0)  # 2: over the budget
    done(study, pipeline(train="finetune", **{"finetune.epochs": 1}), 0.9, 0.3, 0.0)      # 3: on the front
    moves = lm.plan_round(study.get_trials(), SPACE, PROXIES, budget=1.0, trials_total=40)
    assert [(m["from"], m["step"]) for m in moves] == [(0, "half"), (3, "half"), (0, "weight-sharing"),
                                                       (3, "weight-sharing"), (3, "finetune")]
    assert moves[-1]["change"] == "finetune.epochs 1 -> 3"  # point 0 already trains for the longest choice
    assert all(m["params"]["structured"] == "channel" and m["params"]["channel.ratio"] == 0.5
               for m in moves if m["from"] == 0)


def test_a_round_never_repeats_parameters_and_respects_the_trials_and_the_cap():
    study = optuna.create_study(directions=["minimize", "minimize"])
    done(study, PRUNED, 0.25, 0.36, 0.2, **{ws.TRIAL_OPTIONS: {"channel": {"round_to": 8}}})
    done(study, {**PRUNED, "quantize": "half"}, 0.2, 0.5, 0.3)  # the half extension already ran
    study.enqueue_trial({**PRUNED, "quantize": "weight-sharing", "weight-sharing.bits": 5})  # and this one waits
    trials = study.get_trials()
    assert lm.plan_round(trials, SPACE, PROXIES, budget=1.0, trials_total=40) == []
    fresh = optuna.create_study(directions=["minimize", "minimize"])
    done(fresh, PRUNED, 0.25, 0.36, 0.2, **{ws.TRIAL_OPTIONS: {"channel": {"round_to": 8}}})
    one = lm.plan_round(fresh.get_trials(), SPACE, PROXIES, budget=1.0, trials_total=2)  # room for one trial
    assert [m["step"] for m in one] == ["half"] and one[0]["options"] == {"channel": {"round_to": 8}}
    assert lm.plan_round(fresh.get_trials(), SPACE, PROXIES, budget=1.0, trials_total=1) == []  # no room
    assert len(lm.plan_round(fresh.get_trials(), SPACE, PROXIES, budget=1.0, trials_total=3)) == 1  # cap 3 // 2


@pytest.mark.parametrize(("attrs", "finished", "waiting", "runs"), [
    ({ws.ATTR: {"enqueued": [{}, {}]}}, 1, 0, False),   # a warm-start trial has not finished
    ({ws.ATTR: {"enqueued": [{}, {}]}}, 2, 0, True),
    ({ws.ATTR: {"enqueued": [{}]}}, 1, 1, False),        # something is still queued
    ({ws.ATTR: {"enqueued": []}}, 3, 0, False),          # no warm start: after EVERY trials
    ({ws.ATTR: {"enqueued": []}}, lm.EVERY, 0, True),
    ({lm.ATTR: {"rounds": [{"after": 5}]}}, 5 + lm.EVERY - 1, 0, False),
    ({lm.ATTR: {"rounds": [{"after": 5}]}}, 5 + lm.EVERY, 0, True),
])
def test_rounds_run_after_the_warm_start_then_every_few_trials(attrs, finished, waiting, runs):
    assert lm.due(attrs, finished, waiting) is runs


def recipe(steps_yaml: str):
    return loads(f"model: zoo:digits-mlp\ndata: digits\ntask: classification\nsteps:\n{steps_yaml}")


QUICK = {"structured": ["none"], "sparsify": ["none", "magnitude"], "factorize": ["none"], "train": ["none"],
         "quantize": ["none", "int8-dynamic", "half"], "params": {"magnitude.sparsity": [0.2, 0.5]},
         "groups": False}


def test_optimize_queues_extensions_of_the_warm_start_point_within_trials(tmp_path, monkeypatch):
    monkeypatch.setattr(ws, "shipped_recipes", lambda: [("tiny", recipe("  - magnitude: {sparsity: 0.3}\n"))])
    s = Settings(model="zoo:digits-mlp", data="digits", out=tmp_path, budget=2.0, trials=4, seed=0, search=QUICK,
                 speed_budget_s=0.2, track=False)
    result = optimize(s, progress=False)
    trials = optuna.load_study(study_name=s.study_name, storage=s.storage_url).get_trials()
    assert len(trials) == 4 and trials[0].user_attrs["warm_start"] == "tiny"
    assert trials[0].user_attrs["val_accuracy_drop_points"] <= 2.0  # feasible, so it is extended
    moves = [t.user_attrs.get(lm.TRIAL_MOVE) for t in trials]
    assert moves[1:3] == [{"from": 0, "stage": "quantize", "step": "int8-dynamic"},
                          {"from": 0, "stage": "quantize", "step": "half"}]  # the cap: 4 // 2 trials
    assert moves[3] is None  # the sampler's turn
    assert trials[1].params == {**trials[0].params, "quantize": "int8-dynamic"}
    assert [next(iter(step)) for step in trials[2].user_attrs["steps"]] == ["magnitude", "half"]
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 4
    on_disk = json.loads((tmp_path / "pareto.json").read_text())["local_moves"]
    assert on_disk["enabled"] is True and on_disk["cap"] == 2
    assert on_disk["rounds"][0]["after"] == 1 and len(on_disk["rounds"][0]["queued"]) == 2
    assert [(m["trial"], m["step"]) for m in on_disk["trials"]] == [(1, "int8-dynamic"), (2, "half")]
    assert all(p["local_move"]["from"] == 0 for p in result["points"] if "local_move" in p)


def test_cli_no_local_moves_queues_none(tmp_path, monkeypatch):
    import yaml

    monkeypatch.setattr(ws, "shipped_recipes", lambda: [("tiny", recipe("  - magnitude: {sparsity: 0.3}\n"))])
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"search": QUICK}))
    res = CliRunner().invoke(build_app(), ["optimize", "zoo:digits-mlp", "--out", str(tmp_path / "o"), "--trials",
                                           "3", "--space", str(space), "--data", "digits", "--budget", "2",
                                           "--speed-budget", "0.2", "--no-track", "--no-local-moves", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "o" / "pareto.json").read_text())["local_moves"]
    assert got["enabled"] is False and got["rounds"] == [] and got["trials"] == []
