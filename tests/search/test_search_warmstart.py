"""Warm start: shipped recipes translated into the space's parameters, queued as a new study's first trials.

The translation must rebuild each recipe's steps exactly; recipes the space cannot express are skipped with a
reason; ``--no-warm-start`` queues nothing; a resumed study never queues them twice."""

from __future__ import annotations

import json
import re

import optuna
import pytest
from typer.testing import CliRunner

import slimguard  # noqa: F401  (fills the registries)
import slimguard.search as search_pkg
from slimguard.cli import build_app
from slimguard.core.recipe import load as load_recipe
from slimguard.core.recipe import loads
from slimguard.search import Settings, optimize
from slimguard.search import warmstart as ws
from slimguard.search.space import Proxies, build_space
from slimguard.search.warmstart import NotExpressible, describe, plan, translate, warm_start

PROXIES = Proxies({"layers.0": 0.5, "layers.1.conv1": 0.25}, ("stem.0", "fc"))


def data(steps) -> list[dict]:
    return [s.to_dict()["_data"] for s in steps]


def recipe(steps_yaml: str, task: str = "classification"):
    return loads(f"model: zoo:digits-mlp\ndata: digits\ntask: {task}\nsteps:\n{steps_yaml}")


@pytest.mark.parametrize("proxies", [PROXIES, Proxies()])
def test_prune_resnet_rebuilds_exactly_in_the_default_space(proxies):
    space = build_space({})
    shipped = load_recipe("prune-resnet")
    seed = translate("prune-resnet", shipped.steps, space, proxies)
    assert seed.params["structured"] == "channel" and seed.params["channel.ratio"] == 0.5
    assert seed.params["train"] == "finetune" and seed.params["finetune.epochs"] == 12
    assert {seed.params[s] for s in ("sparsify", "factorize", "quantize")} == {"none"}
    assert ("channel.per_group" in seed.params) == bool(proxies.tolerated)  # every param the sampler would draw
    # options the space does not search travel with the trial
    assert seed.options == {"channel": {"round_to": 8}, "finetune": {"weight_decay": 0.0005, "patience": 0}}
    assert data(space.steps(seed.params, proxies, seed.options)) == data(shipped.steps)
    assert data(space.steps(seed.params, proxies)) != data(shipped.steps)  # without them it is not the recipe


def test_three_stage_recipe_with_nested_options_rebuilds_exactly():
    space = build_space({"params": {"distill.finetune.epochs": {"choices": [2, 8]}}})
    r = recipe("  - magnitude: {sparsity: 0.8, scope: layer}\n"
               "  - distill: {temperature: 2, finetune: {epochs: 8, lr: 0.003, patience: 0}}\n"
               "  - weight-sharing: {bits: 4, iterations: 20}\n")
    seed = translate("x", r.steps, space, PROXIES)
    assert seed.params["distill.finetune.epochs"] == 8 and seed.params["weight-sharing.bits"] == 4
    assert seed.params["weight-sharing.keep_ends"] is False
    assert data(space.steps(seed.params, PROXIES, seed.options)) == data(r.steps)


@pytest.mark.parametrize(("steps", "why"), [
    ("  - adv-finetune: {method: pgd-at, eps: 0.1}\n", "its step 'adv-finetune' is not in the search space"),
    ("  - channel: {ratio: 0.7}\n", "its channel.ratio is 0.7; the space draws it in [0.1, 0.6]"),
    ("  - finetune: {epochs: 8}\n", "its finetune.epochs is 8; the space draws it among [1, 3, 6, 12]"),
    ("  - half: {dtype: bf16}\n", "its half.dtype is 'bf16'; the space draws it fixed at 'fp16'"),
    ("  - finetune: {epochs: 1}\n  - magnitude: {sparsity: 0.5}\n", "comes after a later stage"),
    ("  - int8-dynamic: {}\n  - half: {}\n", "it has two quantize steps (int8-dynamic, half)"),
])
def test_recipes_the_space_cannot_express_are_refused_with_the_reason(steps, why):
    with pytest.raises(NotExpressible, match=re.escape(why)):
        translate("x", recipe(steps).steps, build_space({}), PROXIES)


def test_a_stage_that_cannot_be_skipped_refuses_recipes_without_it():
    with pytest.raises(NotExpressible, match="the space's quantize stage must hold one of int8-dynamic"):
        translate("x", recipe("  - finetune: {epochs: 3}\n").steps, build_space({"quantize": ["int8-dynamic"]}),
                  PROXIES)


def test_plan_over_the_shipped_recipes_lists_every_skip_once():
    made = plan(build_space({}), PROXIES, task="classification", trials=16)
    assert [s["recipe"] for s in made["enqueued"]] == ["prune-resnet"]
    why = {s["recipe"]: s["why"] for s in made["skipped"]}
    assert len(why) == len(made["skipped"]) == len(ws.shipped_recipes()) - 1
    assert why["demo"] == "its finetune.epochs is 8; the space draws it among [1, 3, 6, 12]"
    assert why["minilm-fast"] == "its task is embedding, the search's is classification"
    lines = describe(made)
    assert lines[0].endswith("queued as the first trials: prune-resnet") and len(lines) == 1 + len(why)


def test_queued_recipes_count_against_trials():
    recipes = [("a", recipe("  - int8-dynamic: {}\n")), ("b", recipe("  - half: {dtype: fp16}\n"))]
    made = plan(build_space({}), PROXIES, task="classification", trials=1, recipes=recipes)
    assert [s["recipe"] for s in made["enqueued"]] == ["a"]
    assert made["skipped"] == [{"recipe": "b", "why": "--trials 1 leaves no room for it"}]


def test_new_study_queues_once_and_no_warm_start_queues_nothing():
    space = build_space({})
    study = optuna.create_study(directions=["minimize", "minimize"])
    made = warm_start(study, space, PROXIES, task="classification", trials=4, enabled=True)
    assert made is not None and len(made["enqueued"]) == 1
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs["warm_start"] == "prune-resnet"
    assert warm_start(study, space, PROXIES, task="classification", trials=4, enabled=True) is None  # resumed
    assert len(study.get_trials()) == 1
    off = optuna.create_study(directions=["minimize", "minimize"])
    assert warm_start(off, space, PROXIES, task="classification", trials=4, enabled=False) == {
        "enabled": False, "enqueued": [], "skipped": []}
    assert off.get_trials() == [] and ws.stored(off)["enabled"] is False


QUICK = {"structured": ["none"], "sparsify": ["none", "magnitude"], "factorize": ["none"], "train": ["none"],
         "quantize": ["int8-dynamic", "half", "weight-sharing"], "params": {"magnitude.sparsity": [0.2, 0.5]},
         "groups": False}
SHIPPED = "  - magnitude: {sparsity: 0.3, scope: layer}\n  - weight-sharing: {bits: 4, iterations: 20}\n"


def test_optimize_runs_the_recipe_first_exactly_and_resume_does_not_repeat_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ws, "shipped_recipes", lambda: [("tiny", recipe(SHIPPED)),
                                                        ("big", recipe("  - channel: {ratio: 0.5}\n"))])
    monkeypatch.setattr(search_pkg, "is_quiet", lambda: False)  # the plan's lines only (the live table stays off)
    s = Settings(model="zoo:digits-mlp", data="digits", out=tmp_path, budget=2.0, trials=2, seed=0, search=QUICK,
                 speed_budget_s=0.2, track=False)
    result = optimize(s, progress=True)
    err = capsys.readouterr().err
    assert "warm start: 1 shipped recipe(s) queued as the first trials: tiny" in err
    assert err.count("warm start: skipped big: its step 'channel' is not in the search space") == 1
    study = optuna.load_study(study_name=s.study_name, storage=s.storage_url)
    first = study.get_trials()[0]
    assert first.user_attrs["warm_start"] == "tiny" and first.state.name == "COMPLETE"
    assert first.user_attrs["steps"] == [{c.config_name: c.to_dict()["_data"]} for c in recipe(SHIPPED).steps]
    assert result["warm_start"]["enqueued"][0]["recipe"] == "tiny"
    assert result["warm_start"]["skipped"] == [{"recipe": "big", "why": "its step 'channel' is not in the search "
                                                                         "space"}]
    on_disk = json.loads((tmp_path / "pareto.json").read_text())
    assert on_disk["warm_start"] == result["warm_start"] and result["trials"]["finished"] == 2
    optimize(Settings(**{**s.to_dict(), "out": tmp_path, "trials": 3}), progress=True)  # resume
    assert "warm start" not in capsys.readouterr().err  # listed once, when the study was created
    trials = optuna.load_study(study_name=s.study_name, storage=s.storage_url).get_trials()
    measured = [t for t in trials if "repeat_of" not in t.user_attrs]  # a draw of a measured pipeline is replayed
    assert len(measured) == 3 and sum(t.user_attrs.get("warm_start") == "tiny" for t in measured) == 1


def test_cli_no_warm_start_reaches_pareto_json(tmp_path):
    import yaml

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"search": QUICK}))
    res = CliRunner().invoke(build_app(), ["optimize", "zoo:digits-mlp", "--out", str(tmp_path / "o"), "--trials",
                                           "1", "--space", str(space), "--data", "digits", "--budget", "2",
                                           "--speed-budget", "0.2", "--no-track", "--no-warm-start", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "pareto.json").read_text())["warm_start"] == {
        "enabled": False, "enqueued": [], "skipped": []}
