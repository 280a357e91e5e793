"""The search space comes from the registered steps' configs, a search: block restricts it, and every value it
can take is checked by building the step's config before any trial runs."""

from __future__ import annotations

import dataclasses

import optuna
import pytest

import slimguard  # noqa: F401  (fills the registries)
from slimguard.core.config import CONFIGS, Config, register_config
from slimguard.core.errors import ConfigError
from slimguard.core.registry import HANDLERS, register_handler
from slimguard.search.space import DEFAULT_SEARCH, STAGES, Proxies, build_space, stage_steps, verb_of_step


def test_every_stage_holds_only_steps_of_its_verbs():
    space = build_space()
    by_name = {s.name: s for s in STAGES}
    for stage, choices in space.stages.items():
        for step in choices:
            if step != "none":
                assert verb_of_step(step) in by_name[stage].verbs, (stage, step)
    assert [s.name for s in STAGES] == ["structured", "sparsify", "factorize", "train", "quantize"]


def test_stage_candidates_come_from_the_registry_so_a_new_step_is_searchable():
    @register_config("toy-quant-for-search")
    @dataclasses.dataclass
    class ToyQuant(Config):
        bits: int = 8

    @register_handler("quantize", ToyQuant)
    def _toy(model, config, **context):
        return None

    try:
        quantize = next(s for s in STAGES if s.name == "quantize")
        assert "toy-quant-for-search" in stage_steps(quantize)
        assert "gptq" in stage_steps(quantize) and "channel" not in stage_steps(quantize)
        space = build_space({"quantize": ["toy-quant-for-search"], "params": {"toy-quant-for-search.bits": [2, 4]}})
        trial = optuna.trial.FixedTrial({"structured": "none", "sparsify": "none", "factorize": "none",
                                         "train": "none", "toy-quant-for-search.bits": 3})
        steps = space.suggest(trial, Proxies())
        quant = [s for s in steps if s.config_name == "toy-quant-for-search"]
        assert len(quant) == 1 and quant[0].bits == 3
    finally:
        CONFIGS.unregister("toy-quant-for-search")
        HANDLERS.unregister(ToyQuant)


def test_a_search_block_restricts_stages_and_ranges():
    space = build_space({"structured": ["channel"], "sparsify": ["none"], "factorize": ["none"], "train": ["none"],
                         "quantize": ["int8-dynamic"], "params": {"channel.ratio": [0.2, 0.3]}, "groups": False})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        steps = space.suggest(trial, Proxies())
        assert [s.config_name for s in steps] == ["channel", "int8-dynamic"]
        assert 0.2 <= steps[0].ratio <= 0.3
        study.tell(trial, 0.0)
    # the other stages and steps keep the defaults
    assert build_space({"train": ["finetune"]}).stages["quantize"] == tuple(DEFAULT_SEARCH["quantize"])


def test_fixed_values_and_all_choices():
    space = build_space({"quantize": ["int8-static", "half"], "params": {"int8-static.calibration": "all"}})
    assert space.params["half"]["dtype"].fixed == "fp16"
    assert set(space.params["int8-static"]["calibration"].choices) == {
        "percentile", "minmax", "entropy", "mse", "moving-average"}
    steps = space.steps({"structured": "none", "sparsify": "none", "factorize": "none", "train": "none",
                         "quantize": "half"}, Proxies())
    assert [(s.config_name, s.dtype) for s in steps] == [("half", "fp16")]


def test_steps_rebuild_the_same_pipeline_from_a_trials_params():
    space = build_space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    proxies = Proxies({"layer1.0.conv1": 0.5}, ("0", "9"))
    for _ in range(8):
        trial = study.ask()
        drawn = space.suggest(trial, proxies)
        again = space.steps(trial.params, proxies)
        assert [s.to_dict() for s in drawn] == [s.to_dict() for s in again]
        study.tell(trial, 0.0)


def test_groups_shape_channel_ratios_by_sensitivity_and_keep_the_ends_in_float():
    space = build_space({"structured": ["channel"], "quantize": ["weight-only"]})
    proxies = Proxies({"a": 0.5, "b": 0.25}, ("first", "last"))
    params = {"structured": "channel", "sparsify": "none", "factorize": "none", "train": "none",
              "quantize": "weight-only", "channel.ratio": 0.3, "channel.per_group": True, "channel.group_scale": 1.2,
              "weight-only.bits": 4, "weight-only.keep_ends": True}
    channel, quant = space.steps(params, proxies)
    assert channel.ratio == 0.0 and channel.ratios == {"a": pytest.approx(0.6), "b": pytest.approx(0.3)}
    assert set(quant.ignore) == {"first", "last"} and quant.bits == 4
    plain = space.steps({**params, "channel.per_group": False, "weight-only.keep_ends": False}, proxies)
    assert plain[0].ratio == 0.3 and plain[0].ratios == {} and plain[1].ignore == []


@pytest.mark.parametrize(("block", "message"), [
    ({"prune": ["channel"]}, "search: unknown key 'prune'; allowed:"),
    ({"quantize": ["channel"]}, "search.quantize: 'channel' is not a quantize/cluster step; allowed: none,"),
    ({"quantize": ["int9"]}, "unknown step 'int9'; allowed:"),
    ({"sparsify": ["channel"]}, "'channel' is already in stage 'structured'"),
    ({"params": {"magnitude.sparsity": [0.5, 1.5]}}, "sparsity: 1.5 is out of range"),
    ({"params": {"magnitude.level": [1, 2]}}, "magnitude has no option 'level'; allowed:"),
    ({"params": {"magnitude.sparsity": "all"}}, "'all' needs a Literal or boolean option"),
    ({"params": {"finetune.epochs": [1.5, 3]}}, "is an integer option; give an integer range"),
    ({"params": {"gptq.bits": [2, 4]}}, "names step 'gptq', which no stage uses"),
    ({"params": {"channel.ratio": [0.6, 0.2]}}, "a range is [low, high] with low <= high"),
    ({"groups": "yes"}, "search.groups: expected true or false"),
])
def test_bad_search_blocks_are_one_line_config_errors(block, message):
    with pytest.raises(ConfigError) as info:
        build_space(block)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_default_space_searches_the_fine_tuning_length_up_to_the_shipped_recipes():
    from importlib.resources import files

    from slimguard.core.recipe import load as load_recipe

    recipe = load_recipe(files("slimguard") / "recipes" / "prune-resnet.yaml")
    longest = max(s.epochs for s in recipe.steps if s.config_name == "finetune")
    space = build_space()
    for step, path in (("finetune", "epochs"), ("distill", "finetune.epochs")):
        param = space.params[step][path]
        assert not param.is_fixed and max(param.choices) >= longest > min(param.choices)
    params = {"structured": "none", "sparsify": "none", "factorize": "none", "quantize": "none"}
    (ft,) = space.steps({**params, "train": "finetune", "finetune.epochs": longest}, Proxies())
    (kd,) = space.steps({**params, "train": "distill", "distill.finetune.epochs": longest}, Proxies())
    assert ft.epochs == longest and kd.finetune.epochs == longest
