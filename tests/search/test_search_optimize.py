"""``optimize`` end to end on the digits MLP with a small space and a few trials: selection on validation only,
the front, the files it writes, resuming, pruning hopeless trials, Ctrl-C, determinism and progress."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
import yaml

import slimguard  # noqa: F401  (fills the registries)
from slimguard.artifact import slim as artifact
from slimguard.core.errors import ConfigError
from slimguard.core.recipe import load as load_recipe
from slimguard.search import Settings, optimize
from slimguard.search import objectives as objectives_mod
from slimguard.search.outputs import NothingFeasible
from slimguard.search.pareto import dominates
from slimguard.search.progress import summary
from slimguard.search.space import Proxies, build_space
from slimguard.search.study import make_sampler, set_constraint
from slimguard.search.tracking import tracking_status

# quantization only: every trial takes about a second on the digits MLP
QUICK = {"structured": ["none"], "sparsify": ["none", "magnitude"], "factorize": ["none"], "train": ["none"],
         "quantize": ["int8-dynamic", "half", "weight-sharing"], "params": {"magnitude.sparsity": [0.2, 0.5]},
         "groups": False}


def settings(tmp_path, **changes) -> Settings:
    base = {"model": "zoo:digits-mlp", "data": "digits", "out": tmp_path, "budget": 2.0, "trials": 4, "seed": 0,
            "search": QUICK, "speed_budget_s": 0.2, "track": False}
    return Settings(**{**base, **changes})


def load_study(s: Settings):
    return optuna.load_study(study_name=s.study_name, storage=s.storage_url)


def measured(study) -> list:
    """The study's trials that measured their pipeline (a draw of an already measured one is a replayed repeat,
    which does not count against --trials)."""
    return [t for t in study.get_trials() if "repeat_of" not in t.user_attrs]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One search, with every test-split scoring recorded."""
    out = tmp_path_factory.mktemp("opt")
    scored: list[str] = []
    real = objectives_mod.score
    mp = pytest.MonkeyPatch()

    def counting(model, split):
        scored.append(split.name)
        return real(model, split)

    mp.setattr(objectives_mod, "score", counting)
    try:
        s = settings(out, track=True)
        result = optimize(s, progress=False)
    finally:
        mp.undo()
    return s, result, scored


def test_test_split_is_scored_once_per_pareto_point_after_the_search(run):
    _, result, scored = run
    test = [name for name in scored if name == "test"]
    assert len(test) == len(result["points"]) + 1  # the original once, each point once
    first_test = scored.index("test")
    assert all(name != "test" for name in scored[:first_test])
    assert scored[first_test:].count("val") == 0  # nothing is chosen after the test split is read


def test_front_is_feasible_and_non_dominated_among_completed_trials(run):
    s, result, _ = run
    study = load_study(s)
    done = [t for t in measured(study) if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs["steps"]]
    assert len(measured(study)) == s.trials
    feasible = [t for t in done if t.user_attrs["val_accuracy_drop_points"] <= s.budget]
    front = {p["trial"] for p in result["points"]}
    assert front
    for t in feasible:
        dominated = any(dominates(u.values, t.values) for u in feasible)
        assert (t.number in front) == (not dominated), t.number
    for p in result["points"]:
        assert p["val_accuracy_drop_points"] <= s.budget
        assert p["objectives"]["size"] == pytest.approx(p["size_ratio"])
        assert p["objectives"]["latency"] == pytest.approx(1 / p["speed_ratio"])
        assert p["speed_ci95"][0] <= p["speed_ratio"] <= p["speed_ci95"][1]
        assert p["size_ratio"] == pytest.approx(p["bytes"] / result["baseline"]["bytes"])
        assert 0 <= p["test_accuracy"] <= 1 and p["test_n"] == 360


def test_files_rerun_the_chosen_point(run):
    s, result, _ = run
    out = s.out
    on_disk = json.loads((out / "pareto.json").read_text())
    assert on_disk["points"] == json.loads(json.dumps(result["points"]))
    point = result["chosen_point"]
    recipe = load_recipe(out / "best.yaml")
    assert [{st.config_name: st.to_dict()["_data"]} for st in recipe.steps] == point["steps"]
    assert recipe.budget == {"max_accuracy_drop": s.budget} and recipe.model == s.model
    model = artifact.load(out / "model.slim")
    from slimguard import data

    val = data.load("digits").val
    acc = float((model(val.x).argmax(-1) == val.y).float().mean())
    assert acc == pytest.approx(point["val_accuracy"], abs=1e-6)
    assert (out / "model.slim").stat().st_size == pytest.approx(point["bytes"], rel=0.05)
    page = (out / "report.html").read_text()
    assert "<svg" in page and f"trial {point['trial']}:" in page and "<script" not in page


def test_tensorboard_events_are_written(run):
    s, _, _ = run
    if not tracking_status()["tensorboard"]:
        pytest.skip("tensorboard is not installed")
    assert list((s.out / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_runs_only_the_missing_trials_and_refuses_other_settings(run):
    s, _, _ = run
    before = len(measured(load_study(s)))
    optimize(settings(s.out), progress=False)
    assert len(measured(load_study(s))) == before
    optimize(settings(s.out, trials=s.trials + 1), progress=False)
    assert len(measured(load_study(s))) == before + 1
    with pytest.raises(ConfigError, match="was made with another budget"):
        optimize(settings(s.out, budget=0.5), progress=False)


def test_progress_summary_counts_and_estimates(run):
    s, _, _ = run
    study = load_study(s)
    got = summary(study, trials=10, budget=s.budget, started=0.0, done_at_start=0, now=20.0)
    n = len(measured(study))
    assert got["done"] == n and got["total"] == 10
    assert got["eta_s"] == pytest.approx(20.0 / n * (10 - n))
    sizes = [t.user_attrs["size_ratio"] for t in study.get_trials() if t.state.name == "COMPLETE"
             and t.user_attrs["val_accuracy_drop_points"] <= s.budget and t.user_attrs["steps"]]
    assert got["best_size_ratio"] == pytest.approx(min(sizes))


def test_hopeless_trials_are_pruned_after_their_last_step(tmp_path):
    space = {**QUICK, "sparsify": ["magnitude"], "quantize": ["none"], "params": {"magnitude.sparsity": [0.97, 0.99]}}
    s = settings(tmp_path, search=space, trials=2, budget=0.5, objectives=("size",))
    with pytest.raises(NothingFeasible, match="none of the study's 2 finished trials"):
        optimize(s, progress=False)
    trials = load_study(s).get_trials()
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"]
    assert all(t.user_attrs["val_accuracy_drop_points"] > 0.5 for t in trials)
    # one objective: the intermediate validation drop is also Optuna's intermediate value
    assert all(t.intermediate_values == {0: pytest.approx(t.user_attrs["val_accuracy_drop_points"])} for t in trials)
    assert not list((tmp_path / "trials").glob("*.slim"))  # stopped before the artifact and the timing


def test_ctrl_c_leaves_a_resumable_study(tmp_path, monkeypatch):
    real = objectives_mod.Evaluator.run
    calls = {"n": 0}

    def interrupt_second(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(objectives_mod.Evaluator, "run", interrupt_second)
    s = settings(tmp_path, trials=3)
    with pytest.raises(KeyboardInterrupt):
        optimize(s, progress=False)
    states = [t.state.name for t in load_study(s).get_trials()]
    assert states == ["COMPLETE", "FAIL"]
    monkeypatch.setattr(objectives_mod.Evaluator, "run", real)
    result = optimize(s, progress=False)
    assert [t.state.name for t in load_study(s).get_trials()][:2] == ["COMPLETE", "FAIL"]
    assert result["trials"]["finished"] == 3 and result["trials"]["complete"] == 2


def _proposals(seed: int, tmp_path) -> list[dict]:
    """Ten trials of the real sampler over the default space, with the budget constraint recorded as optimize
    records it, on a synthetic objective (the pipelines' own determinism is the space's test)."""
    s = settings(tmp_path, search={}, seed=seed, trials=10)
    space = build_space(s.search)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(s))
    for _ in range(10):
        trial = study.ask()
        steps = space.suggest(trial, Proxies({"0": 0.5}, ("1", "5")))
        set_constraint(trial, len(steps) - 3.0)
        study.tell(trial, [float(len(steps)), float(sum(len(str(x.to_dict())) for x in steps))])
    return [t.params for t in study.get_trials()]


def test_same_seed_same_pipelines(tmp_path):
    assert _proposals(7, tmp_path) == _proposals(7, tmp_path)
    assert _proposals(7, tmp_path) != _proposals(8, tmp_path)


def test_settings_errors_are_one_line_config_errors(tmp_path):
    for changes, message in (({"objectives": ("size", "speed")}, "'speed' is not allowed"),
                             ({"target": "tpu"}, "--target: 'tpu' is not allowed; allowed: torch, ort"),
                             ({"objectives": ("robustness",), "robust_eps": 0.0}, "--robust-eps: 0.0"),
                             ({"objectives": ("robustness",), "max_examples": 0}, "--max-examples: 0; use 1 or more"),
                             ({"budget": -1.0}, "--budget: -1.0 is out of range"),
                             ({"sampler": "grid"}, "--sampler: 'grid' is not allowed"),
                             ({"storage": "nowhere"}, "is not a database URL")):
        with pytest.raises(ConfigError, match=message):
            optimize(settings(tmp_path, **changes), progress=False)


def test_best_yaml_is_plain_yaml(run):
    s, _, _ = run
    raw = yaml.safe_load((s.out / "best.yaml").read_text())
    assert set(raw) == {"name", "description", "model", "data", "task", "seed", "budget", "steps"}


def test_compress_reruns_best_yaml_to_the_same_model(run, tmp_path):
    from slimguard import data
    from slimguard.pipeline import compress

    s, result, _ = run
    done = compress(load_recipe(s.out / "best.yaml"), tmp_path, progress=False)
    model = artifact.load(done["artifact"])
    val = data.load("digits").val
    acc = float((model(val.x).argmax(-1) == val.y).float().mean())
    assert acc == pytest.approx(result["chosen_point"]["val_accuracy"], abs=1e-6)  # same seed, same steps


@pytest.mark.parametrize(("curve", "epochs", "hopeless"), [
    ([84.1, 83.8, 83.8], 12, True),          # a plateau far over the budget: stop
    ([24.0, 2.0, 1.8], 12, False),           # recovering fast: the remaining epochs can close the gap
    ([9.0, 5.0, 3.0, 2.0], 12, False),       # 1.5 points/epoch x 8 epochs left covers the 1 point missing
    ([9.0, 5.0, 3.0, 2.9, 2.8], 12, True),   # 0.1 points/epoch x 7 left does not
    ([30.0, 20.0], 12, False),               # too early to judge
    ([5.0, 4.9, 4.8], 3, False),             # the last epoch is judged by the budget itself
    ([3.0, 0.5, 0.9], 12, False),            # already within the budget once (the best epoch is restored)
])
def test_hopeless_curve(curve, epochs, hopeless):
    assert objectives_mod.hopeless_curve(curve, epochs, 1.0) is hopeless


def test_long_training_that_cannot_reach_the_budget_stops_after_a_few_epochs(tmp_path):
    # 97% of the weights zeroed, fine-tuned gently: validation accuracy stays far below the original's
    space = {**QUICK, "sparsify": ["magnitude"], "train": ["finetune"], "quantize": ["none"],
             "params": {"magnitude.sparsity": [0.97, 0.97], "finetune.epochs": 12, "finetune.lr": 1e-4}}
    s = settings(tmp_path, search=space, trials=1, budget=0.5)
    with pytest.raises(NothingFeasible):
        optimize(s, progress=False)
    (trial,) = load_study(s).get_trials()
    assert trial.state.name == "PRUNED"
    assert trial.user_attrs["pruned_at_epoch"] == objectives_mod.RULE_MIN_EPOCHS - 1  # of 12 epochs
    curve = trial.user_attrs["train_curve"]
    assert len(curve) == objectives_mod.RULE_MIN_EPOCHS and min(curve) > 50
    assert trial.user_attrs["val_accuracy_drop_points"] == pytest.approx(min(curve))


def test_watched_training_builds_the_same_model_as_the_step_runner():
    from slimguard import data, zoo
    from slimguard.core.config import config_class

    bundle = data.load("digits")
    ev = objectives_mod.Evaluator(zoo.load("digits-mlp", progress=False), bundle, 1.0)
    steps = [config_class("magnitude").from_fields({"sparsity": 0.5}),
             config_class("distill").from_fields({"finetune": {"epochs": 2}})]
    seen: list[tuple[int, int, int]] = []
    watched = ev.build(steps, on_epoch=lambda i, epoch, epochs, model: seen.append((i, epoch, epochs)))
    plain = ev.build(steps)
    assert seen == [(1, 0, 2), (1, 1, 2)]
    for (name, a), (_, b) in zip(watched.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    from slimguard.models.spec import maybe_info

    assert maybe_info(watched).history == maybe_info(plain).history
    assert [h["verb"] for h in maybe_info(watched).history[-2:]] == ["prune", "distill"]


def test_target_ort_scores_and_times_onnx_runtime_sessions(tmp_path, monkeypatch):
    from slimguard.runtime.onnx import OrtModel

    timed: list[tuple[str, str]] = []
    real = objectives_mod.compare_speed

    def spy(models, *args, **kwargs):
        timed.append((type(models["baseline"]).__name__, type(models["candidate"]).__name__))
        assert kwargs["threads"] == 1 and models["candidate"].session.get_session_options().intra_op_num_threads == 1
        return real(models, *args, **kwargs)

    monkeypatch.setattr(objectives_mod, "compare_speed", spy)
    space = {**QUICK, "quantize": ["int8-dynamic", "half"]}
    s = settings(tmp_path, search=space, trials=2, target="ort")
    result = optimize(s, progress=False)
    assert timed and set(timed) == {(OrtModel.__name__, OrtModel.__name__)}  # original and candidate on ORT
    assert result["target"] == "ort" and json.loads((tmp_path / "pareto.json").read_text())["target"] == "ort"
    done = [t for t in load_study(s).get_trials() if t.state.name == "COMPLETE"]
    assert done and all(t.user_attrs["target"] == "ort" for t in done)
    best = (tmp_path / "best.yaml").read_text()
    assert best.startswith("# target: ort (") and "target ort" in yaml.safe_load(best)["description"]
    load_recipe(tmp_path / "best.yaml")  # still a recipe compress accepts
    # the point's validation accuracy is the ONNX Runtime session's, on the exported artifact
    ev = objectives_mod.Evaluator(artifact.load(tmp_path / "model.slim"), __import__("slimguard").data.load("digits"),
                                  2.0, target="ort")
    assert isinstance(ev.base_model, OrtModel)
    assert ev.base_val_accuracy == pytest.approx(result["chosen_point"]["val_accuracy"], abs=1e-9)


def test_target_ort_stops_pipelines_it_cannot_run_and_leaves_them_out_by_default(tmp_path):
    assert "weight-only" not in settings(tmp_path, target="ort", search={}).search_block()["quantize"]
    assert "weight-only" in build_space(settings(tmp_path, search={}).search_block()).stages["quantize"]
    space = {**QUICK, "sparsify": ["none"], "quantize": ["weight-only"], "params": {"weight-only.bits": 4}}
    s = settings(tmp_path, search=space, trials=1, target="ort")
    with pytest.raises(NothingFeasible):
        optimize(s, progress=False)
    (trial,) = load_study(s).get_trials()
    assert trial.state.name == "PRUNED" and "do not export to ONNX" in trial.user_attrs["not_deployable"]
    assert trial.user_attrs["val_accuracy_drop_over_budget"] > 0  # infeasible for the sampler


def test_robustness_objective_is_pgd_error_on_bounded_validation_examples(tmp_path):
    from slimguard import data

    s = settings(tmp_path, objectives=("robustness", "size"), trials=3, robust_eps=0.1, robust_steps=3,
                 max_examples=32)
    result = optimize(s, progress=False)
    assert result["robustness"] == {"attack": "pgd-linf", "eps": 0.1, "steps": 3, "max_examples": 32,
                                    "split": "val", "objective_key": "val_robust_error"}
    base = result["baseline"]["val_robust_accuracy"]
    assert 0 < base < result["baseline"]["val_accuracy"]  # the attack bites: robust accuracy below clean
    for p in result["points"]:
        assert p["objectives"]["robustness"] == pytest.approx(1 - p["val_robust_accuracy"])
        assert p["val_robust_accuracy"] * 32 == pytest.approx(round(p["val_robust_accuracy"] * 32))  # 32 examples
    point = result["chosen_point"]
    spec = objectives_mod.Robustness(eps=0.1, steps=3, max_examples=32)
    again = spec.accuracy(artifact.load(tmp_path / "model.slim"), data.load("digits").val, s.seed)
    assert again == pytest.approx(point["val_robust_accuracy"], abs=1e-9)  # validation only, reproducible
    with pytest.raises(ConfigError, match="was made with another robustness"):
        optimize(settings(tmp_path, objectives=("robustness", "size"), trials=3, robust_eps=0.2, robust_steps=3,
                          max_examples=32), progress=False)


def test_a_repeated_pipeline_is_replayed_not_measured_and_does_not_count(tmp_path, monkeypatch):
    # two distinct pipelines in the whole space: after both, every draw repeats one of them
    space = {**QUICK, "sparsify": ["none"], "quantize": ["int8-dynamic", "half"], "params": {}}
    real = objectives_mod.Evaluator.run
    measured: list[str] = []

    def counting(self, steps, *args, **kwargs):
        measured.append(" > ".join(s.config_name for s in steps))
        return real(self, steps, *args, **kwargs)

    monkeypatch.setattr(objectives_mod.Evaluator, "run", counting)
    monkeypatch.setattr("slimguard.search.study.REPEAT_LIMIT", 3)
    s = settings(tmp_path, search=space, trials=4, warm_start=False)
    with pytest.warns(UserWarning, match="space looks exhausted after 2 distinct pipelines"):
        result = optimize(s, progress=False)
    assert sorted(measured) == ["half", "int8-dynamic"]  # each measured once
    trials = load_study(s).get_trials()
    repeats = [t for t in trials if "repeat_of" in t.user_attrs]
    assert len(repeats) == len(trials) - 2 >= 3
    for t in repeats:
        twin = trials[t.user_attrs["repeat_of"]]
        assert t.user_attrs["steps"] == twin.user_attrs["steps"] and t.values == twin.values
        assert t.user_attrs["size_ratio"] == twin.user_attrs["size_ratio"]
    assert result["trials"]["finished"] == 2 and result["trials"]["repeats"] == len(repeats)
    assert result["trials"]["exhausted"]["repeats_in_a_row"] == 3
    assert {p["trial"] for p in result["points"]} <= {t.number for t in trials if "repeat_of" not in t.user_attrs}
    got = summary(load_study(s), trials=4, budget=s.budget, started=0.0, done_at_start=0, now=1.0)
    assert (got["done"], got["repeats"]) == (2, len(repeats))
