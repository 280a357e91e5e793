"""The shared torch helpers (``slimguard.core.torch_utils``): name selection, eval mode, forward on a batch,
device, accuracy. Every package uses these instead of its own copy, so their semantics are pinned here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError
from slimguard.core.torch_utils import accuracy, device_of, eval_mode, forward, matches, select_modules, to_device


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    return nn.Sequential(enc, nn.Dropout(0.5), nn.Linear(4, 3))  # names: "", 0, 0.0, 0.1, 1, 2


# ---- selection by name or prefix ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,patterns,expected", [
    ("enc", ["enc"], True),               # the name itself
    ("enc.fc", ["enc"], True),            # under it
    ("enc.fc.weight", ["enc.fc"], True),  # tensor names too
    ("encoder", ["enc"], False),          # a longer name is not under a prefix
    ("encoder.fc", ["enc"], False),
    ("a.enc", ["enc"], False),            # only from the root down
    ("enc", ["enc.fc"], False),           # a parent is not under its child
    ("fc", ["enc", "fc"], True),          # any of several
    ("fc", [], False),                    # nothing selected by no patterns
    ("", [""], True),                     # the empty pattern is the root only
    ("fc", [""], False),
])
def test_matches_table(name, patterns, expected):
    assert matches(name, patterns) is expected


def test_select_modules_by_kind_leaves_out_ignored_subtrees():
    net = _net()
    assert list(select_modules(net, nn.Linear)) == ["0.0", "2"]
    assert list(select_modules(net, nn.Linear, ["0"])) == ["2"]          # "0" covers "0.0"
    assert list(select_modules(net, (nn.Linear, nn.BatchNorm1d), ["0.0"])) == ["0.1", "2"]
    assert list(select_modules(net, nn.Sequential)) == ["", "0"]         # the root counts when of the kind


def test_select_modules_refuses_an_ignore_entry_that_names_no_module():
    with pytest.raises(ConfigError, match=r"ignore: 'enc' names no module; modules are e\.g\. 0, 0\.0"):
        select_modules(_net(), nn.Linear, ["enc"])


# ---- eval mode ---------------------------------------------------------------------------------------------
def _modes(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("requires_grad", [None, False, True])
def test_eval_mode_restores_every_mode_and_flag_even_when_the_body_raises(requires_grad):
    net = _net().train()
    net[0][1].eval()                       # a frozen BatchNorm inside a training model keeps its own mode
    net[2].weight.requires_grad_(False)    # a frozen weight keeps its flag
    modes, flags = _modes(net), _flags(net)
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net, requires_grad=requires_grad) as got:
        assert got is net
        assert not any(_modes(net).values())
        if requires_grad is None:
            assert _flags(net) == flags
        else:
            assert set(_flags(net).values()) == {requires_grad}
        raise RuntimeError("boom")
    assert _modes(net) == modes and modes["0.1"] is False and modes["0"] is True
    assert _flags(net) == flags and flags["2.weight"] is False


def test_eval_mode_from_eval_stays_eval_and_gives_gradients_only_to_float_parameters():
    net = nn.Linear(2, 2).eval()
    net.register_parameter("codes", nn.Parameter(torch.zeros(2, dtype=torch.int8), requires_grad=False))
    with eval_mode(net, requires_grad=True):
        assert net.weight.requires_grad and not net.codes.requires_grad  # an int tensor cannot require grad
    assert not net.training and net.weight.requires_grad


def test_eval_mode_turns_dropout_off_inside_the_block():
    torch.manual_seed(0)
    drop, x = nn.Dropout(0.5).train(), torch.ones(1000)
    with eval_mode(drop):
        assert torch.equal(drop(x), x)
    assert (drop(x) == 0).any()


# ---- forward on a batch, device ----------------------------------------------------------------------------
class _Args(nn.Module):
    def forward(self, *args, **kwargs):
        return args, kwargs


@pytest.mark.parametrize("batch,args,kwargs", [
    (torch.ones(2), 1, []),                                      # a tensor: the one argument
    ((torch.ones(2), torch.zeros(2)), 2, []),                    # a tuple: positional arguments
    ({"input_ids": torch.ones(2), "attention_mask": torch.zeros(2)}, 0, ["input_ids", "attention_mask"]),
    (["a text", "another"], 1, []),                              # a list of texts: the one argument
])
def test_forward_calls_the_model_on_tensor_tuple_dict_and_list_batches(batch, args, kwargs):
    got_args, got_kwargs = forward(_Args(), batch)
    assert len(got_args) == args and list(got_kwargs) == kwargs
    if isinstance(batch, list):
        assert got_args[0] is batch


def test_device_of_reads_parameters_then_buffers_then_defaults_to_cpu():
    assert device_of(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    buffers_only = nn.Module()
    buffers_only.register_buffer("codes", torch.zeros(2, device="meta"))
    assert device_of(buffers_only) == torch.device("meta")
    assert device_of(nn.ReLU()) == torch.device("cpu")


def test_to_device_moves_tensors_inside_dicts_and_tuples_and_leaves_texts():
    meta = torch.device("meta")
    moved = to_device({"ids": torch.ones(2), "pair": (torch.ones(1), torch.zeros(1))}, meta)
    assert moved["ids"].device == meta and all(t.device == meta for t in moved["pair"])
    texts = ["a", "b"]
    assert to_device(texts, meta) is texts


# ---- accuracy ----------------------------------------------------------------------------------------------
def test_accuracy_is_exact_on_a_hand_made_case_across_batches():
    # logits = x, so the prediction is the position of each row's largest entry: 0, 1, 2, 0, 1
    model = nn.Identity()
    x = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0], [0, 5, 0]])
    y = torch.tensor([0, 1, 1, 2, 1])  # right, right, wrong, wrong, right
    for batch_size in (1, 2, 512):
        assert accuracy(model, x, y, batch_size=batch_size) == 3 / 5
    assert accuracy(model, x, torch.tensor([0, 1, 2, 0, 1])) == 1.0
    assert math.isnan(accuracy(model, x[:0], y[:0]))


def test_accuracy_scores_in_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.9), nn.Identity()).train()
    x = torch.eye(50) + 0.01
    y = torch.arange(50)
    assert accuracy(model, x, y) == 1.0  # dropout would zero most rows and turn their argmax to 0
    assert model.training and model[0].training
