"""Pruned models survive save/load: structural shrinkage (shapes, attributes) and masks."""

from __future__ import annotations

import pytest
import torch

from slimguard.artifact import load, save
from slimguard.core.masks import get_mask, iter_masks
from slimguard.models.spec import ModelInfo, set_info
from slimguard.prune.structured import ChannelPruningConfig
from slimguard.transforms import prune_


def _tiny_embedder():
    from transformers import BertConfig

    from slimguard.models.sources import _build_hf

    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    source = {"kind": "hf", "name": "tiny-bert", "config": cfg.to_dict(), "pooling": "mean"}
    torch.manual_seed(0)
    model = _build_hf(source)
    set_info(model, ModelInfo(source=source, task="embedding", data={}))
    return model.eval()


def test_structured_resnet_roundtrip(tmp_path):
    from slimguard.models import zoo

    model = zoo.create("digits32-resnet", widths=(16, 32, 64)).eval()
    x = torch.rand(3, 1, 32, 32)
    prune_(model, ChannelPruningConfig(ratio=0.5, round_to=4), example_inputs=x[:1])
    back = load(save(model, tmp_path / "r.slim"))
    assert back.layers[1].conv1.out_channels == model.layers[1].conv1.out_channels == 16
    torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)  # exact: same tensors, same modules


def test_pruned_bert_embedder_roundtrip(tmp_path):
    model = _tiny_embedder()
    ids = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    prune_(model, ChannelPruningConfig(ratio=0.5, head_ratio=0.25), example_inputs={"input_ids": ids[:1]})
    sa = model.encoder.encoder.layer[1].attention.self
    assert (sa.num_attention_heads, sa.all_head_size) == (3, 24)
    back = load(save(model, tmp_path / "b.slim"))
    sb = back.encoder.encoder.layer[1].attention.self
    assert (sb.num_attention_heads, sb.all_head_size, sb.query.out_features) == (3, 24, 24)
    assert back.encoder.encoder.layer[0].intermediate.dense.out_features == 32
    torch.testing.assert_close(back(ids, mask), model(ids, mask), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("config", [
    {"kind": "magnitude", "sparsity": 0.8},
    {"kind": "nm", "n": 2, "m": 4},
])
def test_masks_survive_save_load(config, tmp_path, zoo_model):
    from slimguard.prune.magnitude import MagnitudePruningConfig
    from slimguard.prune.nm import NMSparsityConfig, has_nm_pattern

    model = zoo_model("digits-mlp")
    kind = config.pop("kind")
    cfg = MagnitudePruningConfig(**config) if kind == "magnitude" else NMSparsityConfig(**config)
    prune_(model, cfg)
    path = save(model, tmp_path / "m.slim")
    back = load(path)
    masks = {n: m.clone() for n, _, _, m in iter_masks(model)}
    back_masks = {n: m for n, _, _, m in iter_masks(back)}
    assert set(masks) == set(back_masks) and masks
    for n, m in masks.items():
        assert torch.equal(m, back_masks[n]), n  # rebuilt from the stored zeros: the same pattern
    w = back[2].weight
    if kind == "nm":
        assert has_nm_pattern(w, 2, 4) and int((w != 0).sum()) == w.numel() // 2
    # a training step after loading cannot revive pruned weights
    from slimguard.core.masks import apply_masks

    with torch.no_grad():
        w.add_(1.0)
    apply_masks(back)
    assert torch.equal(w != 0, get_mask(back[2], "weight"))
