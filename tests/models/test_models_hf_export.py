"""``export_hf`` of models pruned through ``sg.prune_``: the folder loads with ``from_pretrained`` and computes
what the pruned model does, whether its config can describe the pruned shape (written smaller) or not
(zero-padded, with a warning and a ``slimguard`` record of the zeros in config.json).

Every family is a tiny model built from a transformers config with seeded random weights (tests/hf_support.py);
outputs are compared on real inputs (tokenized sentences, images) within 1e-5.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slimguard as sg
from hf_support import VOCAB, build_family, save_tokenizer
from slimguard.core.errors import ModelError
from slimguard.models.hf import TASKS, export_hf
from slimguard.models.sources import load_model
from slimguard.models.spec import info
from slimguard.prune.structured import ChannelPruningConfig

transformers = pytest.importorskip("transformers")

TEXTS = ["the film was good", "a bad movie with a long and dull story", "great actor", "the end"]
IMAGES = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))

# the projections that hold a head / an FFN neuron, under the module the record names:
# attention (q, k, v, o; one path three times: fused [q | k | v]) and FFN (up projections, down projection)
PARTS = {
    "bert": (("self.query", "self.key", "self.value", "output.dense"), (("intermediate.dense",), "output.dense")),
    "distilbert": (("q_lin", "k_lin", "v_lin", "out_lin"), (("lin1",), "lin2")),
    "gpt2": (("c_attn", "c_attn", "c_attn", "c_proj"), (("c_fc",), "c_proj")),
    "vit": (("q_proj", "k_proj", "v_proj", "o_proj"), (("fc1",), "fc2")),
    "llama": (("q_proj", "k_proj", "v_proj", "o_proj"), (("gate_proj", "up_proj"), "down_proj")),
}
PARTS["roberta"], PARTS["llama-gqa"] = PARTS["bert"], PARTS["llama"]
# the blocks of layer 0 and layer 1 (names under the slimguard wrapper), given different ratios below
BLOCKS = {
    "bert": (["model.bert.encoder.layer.0"], ["model.bert.encoder.layer.1"]),
    "distilbert": ([f"model.distilbert.transformer.layer.0.{p}" for p in ("attention", "ffn")],
                   [f"model.distilbert.transformer.layer.1.{p}" for p in ("attention", "ffn")]),
    "gpt2": ([f"model.transformer.h.0.{p}" for p in ("attn", "mlp")],
             [f"model.transformer.h.1.{p}" for p in ("attn", "mlp")]),
    "vit": ([f"model.vit.layers.0.{p}" for p in ("attention", "mlp")],
            [f"model.vit.layers.1.{p}" for p in ("attention", "mlp")]),
    "llama": ([f"model.model.layers.0.{p}" for p in ("self_attn", "mlp")],
              [f"model.model.layers.1.{p}" for p in ("self_attn", "mlp")]),
}
BLOCKS["roberta"] = (["model.roberta.encoder.layer.0"], ["model.roberta.encoder.layer.1"])
BLOCKS["llama-gqa"] = BLOCKS["llama"]

# family, ratio of layer 0, of layer 1, whether the folder is padded, config values it must hold
# (heads 4 -> 2 and 3; FFN 64 -> 32 and 48; GPT-2's FFN 128 -> 64 and 96; Llama: 4 heads in 2 KV groups)
CASES = [
    ("bert", 0.5, 0.25, True, {"num_attention_heads": 4, "intermediate_size": 48}),  # heads: back to 4
    ("roberta", 0.5, 0.25, True, {"num_attention_heads": 4, "intermediate_size": 48}),
    ("distilbert", 0.5, 0.25, True, {"n_heads": 4, "hidden_dim": 48}),
    ("gpt2", 0.5, 0.25, True, {"n_head": 4, "n_inner": 96}),
    ("vit", 0.5, 0.25, True, {"num_attention_heads": 3, "head_dim": 8, "intermediate_size": 48}),
    ("llama", 0.5, 0.25, True, {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48}),
    # 8 query heads in 2 groups of 4: layer 0 keeps one group (4 + 1 KV), layer 1 three heads per group (6 + 2);
    # padded to 2 groups of 4, each kept query head stays in its key/value head's group
    ("llama-gqa", 0.5, 0.25, True, {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 4}),
    ("llama", 0.5, 0.5, False, {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                                "intermediate_size": 32}),  # the same in every layer: the config says it
    ("vit", 0.5, 0.5, False, {"num_attention_heads": 2, "head_dim": 8, "intermediate_size": 32}),
]
IDS = [f"{c[0]}-{'padded' if c[3] else 'smaller'}" for c in CASES]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    folders = {name: build_family(name, root / name) for name in PARTS if name != "llama-gqa"}
    torch.manual_seed(0)
    gqa = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=2, eos_token_id=2, pad_token_id=0,
        architectures=["LlamaForCausalLM"]))
    gqa.save_pretrained(str(root / "llama-gqa"))
    save_tokenizer(root / "llama-gqa")
    return {**folders, "llama-gqa": root / "llama-gqa"}


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """What transformers' own model takes: token ids and mask, or images as the wrapper normalises them."""
    if info(model).task == "image-classification":
        return {"pixel_values": (IMAGES - model.mean) / model.std}
    return dict(model.tokenize(TEXTS))


def _logits(hf_model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model.eval()(**inputs).logits


def _scaled(model: nn.Module) -> nn.Module:
    """Matrices 10x larger (std 0.2, not transformers' 0.02), so outputs are of order 1 and a wrong head or
    neuron moves them far beyond the 1e-5 tolerance."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
    return model


def _pruned(folder: Path, family: str, first: float, second: float) -> nn.Module:
    model = _scaled(load_model(f"hf:{folder}"))
    inputs = _inputs(model)
    before = _logits(model.model, inputs)
    ratios = {**dict.fromkeys(BLOCKS[family][0], first), **dict.fromkeys(BLOCKS[family][1], second)}
    example = IMAGES[:1] if family == "vit" else inputs
    sg.prune_(model, ChannelPruningConfig(ratio=0.0, ratios=ratios), example_inputs=example)
    assert (_logits(model.model, inputs) - before).abs().max() > 0.05  # pruning changed the model
    return model


def _export(model: nn.Module, out: Path) -> tuple[Path, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = export_hf(model, out)
    return folder, [str(w.message) for w in caught if "export --format hf" in str(w.message)]


def _out_slice(proj: nn.Module, start: int, stop: int) -> list[torch.Tensor]:
    """Weight (and bias) of outputs start..stop of a Linear or a Conv1D (weight (in, out))."""
    linear = isinstance(proj, nn.Linear)
    weight = proj.weight[start:stop] if linear else proj.weight[:, start:stop]
    return [weight] + ([proj.bias[start:stop]] if proj.bias is not None else [])


def _in_slice(proj: nn.Module, start: int, stop: int) -> torch.Tensor:
    return proj.weight[:, start:stop] if isinstance(proj, nn.Linear) else proj.weight[start:stop]


def _recorded_zeros(back: nn.Module, family: str, record: dict) -> list[torch.Tensor]:
    """Every weight and bias slice that the record says belongs to a zero head or neuron."""
    (q, k, v, o), (ups, down) = PARTS[family]
    cfg = back.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    nq, nkv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    out = []
    for name, ranges in record.get("zero_heads", {}).items():
        att = back.get_submodule(name)
        for a, b in ranges:
            out += [*_out_slice(att.get_submodule(q), a * d, b * d), _in_slice(att.get_submodule(o), a * d, b * d)]
            if nkv == nq:  # as many key/value heads as query heads: the same ones go
                kv = [(k, nq * d), (v, 2 * nq * d)] if q == k else [(k, 0), (v, 0)]
                for path, offset in kv:
                    out += _out_slice(att.get_submodule(path), offset + a * d, offset + b * d)
    for name, ranges in record.get("zero_key_value_heads", {}).items():
        att = back.get_submodule(name)
        for a, b in ranges:
            offsets = [(k, nq * d), (v, (nq + nkv) * d)] if q == k else [(k, 0), (v, 0)]
            for path, offset in offsets:
                out += _out_slice(att.get_submodule(path), offset + a * d, offset + b * d)
    for name, ranges in record.get("zero_ffn_neurons", {}).items():
        ffn = back.get_submodule(name)
        for a, b in ranges:
            for path in ups:
                out += _out_slice(ffn.get_submodule(path), a, b)
            out.append(_in_slice(ffn.get_submodule(down), a, b))
    return out


@pytest.mark.parametrize(("family", "first", "second", "padded", "config"), CASES, ids=IDS)
def test_pruned_model_exports_a_folder_that_computes_the_same(folders: dict[str, Path], tmp_path: Path, family: str,
                                                             first: float, second: float, padded: bool,
                                                             config: dict[str, int]) -> None:
    model = _pruned(folders[family], family, first, second)
    inputs = _inputs(model)
    want = _logits(model.model, inputs)
    own_config, params = model.model.config.to_dict(), sum(p.numel() for p in model.parameters())
    out, said = _export(model, tmp_path / "out")

    auto = getattr(transformers, TASKS.get(info(model).task).auto_class)
    back = auto.from_pretrained(str(out), local_files_only=True)  # the stock config class, nothing of ours
    torch.testing.assert_close(_logits(back, inputs), want, atol=1e-5, rtol=0)
    assert {k: getattr(back.config, k) for k in config} == config
    assert model.model.config.to_dict() == own_config  # the model itself is left as it was
    assert sum(p.numel() for p in model.parameters()) == params
    if family != "vit":
        assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "config.json").read_text()).get("slimguard")
    if not padded:
        assert said == [] and record is None
        assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in model.model.parameters())
        return
    assert len(said) == 1 and "zero-padded" in said[0] and "--format onnx keeps the smaller shape" in said[0]
    assert record["zero_padded"] is True and record["zero_heads"] and record["zero_ffn_neurons"]
    zeros = _recorded_zeros(back, family, record)
    assert zeros and all(t.numel() > 0 and bool((t == 0).all()) for t in zeros)  # each recorded one is zeros
    again = load_model(f"hf:{out}")  # slimguard reads its padded folder too (the record is data only)
    torch.testing.assert_close(_logits(again.model, inputs), want, atol=1e-5, rtol=0)


def test_bert_ffn_pruned_alike_in_every_layer_is_written_smaller_without_a_warning(folders: dict[str, Path],
                                                                                 tmp_path: Path) -> None:
    model = _scaled(load_model(f"hf:{folders['bert']}"))
    inputs = _inputs(model)
    sg.prune_(model, ChannelPruningConfig(ratio=0.5, head_ratio=0.0), example_inputs=inputs)
    out, said = _export(model, tmp_path / "out")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True)
    assert said == [] and back.config.intermediate_size == 32 and back.config.num_attention_heads == 4
    torch.testing.assert_close(_logits(back, inputs), _logits(model.model, inputs), atol=1e-5, rtol=0)


def test_heads_the_config_cannot_hold_are_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(f"hf:{folders['bert']}")
    model.model.config.num_attention_heads = 2  # a config of 2 heads of 16 cannot hold 4 heads of 8
    with pytest.raises(ModelError, match="has 4 heads of 8, which a bert config of 2 heads of 16 cannot hold"):
        export_hf(model, tmp_path / "out")
