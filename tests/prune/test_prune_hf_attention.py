"""Structured pruning of attention heads and MLP neurons in Hugging Face models (Llama with grouped-query
attention, GPT-2, ViT, DistilBERT, BERT, RoBERTa), torch's nn.MultiheadAttention, and GroupNorm CNNs.

Every model is built from a tiny transformers config with seeded random weights (no download). The checks:
each family is pruned for real through ``sg.prune_`` with a dict batch (parameters of the pruned modules halve
at ratio 0.5, outputs keep their shape); heads and neurons whose weights are zero are the ones removed, and
removing them leaves the outputs unchanged (which also checks the rows cut in fused projections and the
head-count bookkeeping); a tiny ratio changes the outputs only a little; nothing removed is an error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import slimguard as sg
from slimguard.core.errors import ConfigError
from slimguard.prune.attention import HeadRule, MLPRule, _heads_of
from slimguard.prune.blocks import BertLayerRule
from slimguard.prune.mha import PrunedMultiheadAttention
from slimguard.prune.rules import rule_for
from slimguard.prune.structured import ChannelPruningConfig, prune_channels

transformers = pytest.importorskip("transformers")

IDS = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
TEXT = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
IMAGES = {"pixel_values": torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


def _seeded(build):
    def make(**overrides):
        torch.manual_seed(0)
        return build(**overrides).eval()

    return make


@_seeded
def _llama(kv_heads: int = 2, attn: str = "sdpa"):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=kv_heads, max_position_embeddings=32,
                                   attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg)


@_seeded
def _gpt2(cross: bool = False):
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, add_cross_attention=cross)
    return transformers.GPT2LMHeadModel(cfg)


@_seeded
def _vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_labels=3)
    return transformers.ViTForImageClassification(cfg)


@_seeded
def _distilbert():
    cfg = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                        max_position_embeddings=32)
    return transformers.DistilBertForSequenceClassification(cfg)


@_seeded
def _bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertForSequenceClassification(cfg)


@_seeded
def _roberta():
    cfg = transformers.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40, pad_token_id=1)
    return transformers.RobertaForSequenceClassification(cfg)


# name, factory, batch, per pruned block (heads before/after, or FFN neurons before/after)
FAMILIES = [
    ("llama-gqa", _llama, TEXT, {"model.layers.1.self_attn": {"heads": [8, 4]},
                                 "model.layers.1.mlp": {"ffn": [96, 48]}}),
    ("gpt2", _gpt2, TEXT, {"transformer.h.1.attn": {"heads": [4, 2]}, "transformer.h.1.mlp": {"ffn": [128, 64]}}),
    ("vit", _vit, IMAGES, {"vit.layers.1.attention": {"heads": [4, 2]}, "vit.layers.1.mlp": {"ffn": [64, 32]}}),
    ("distilbert", _distilbert, TEXT, {"distilbert.transformer.layer.1.attention": {"heads": [4, 2]},
                                       "distilbert.transformer.layer.1.ffn": {"ffn": [64, 32]}}),
    ("bert", _bert, TEXT, {"bert.encoder.layer.1": {"heads": [4, 2], "ffn": [64, 32]}}),
    ("roberta", _roberta, TEXT, {"roberta.encoder.layer.1": {"heads": [4, 2], "ffn": [64, 32]}}),
]
IDS_OF = [f[0] for f in FAMILIES]


def _out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,factory,batch,blocks", FAMILIES, ids=IDS_OF)
def test_each_family_is_pruned_for_real(name, factory, batch, blocks):
    model = factory()
    before = _out(model, batch)
    sizes = {n: _params(m) for n, m in model.named_modules()}
    result = sg.prune_(model, ChannelPruningConfig(ratio=0.5), example_inputs=batch)
    after = _out(model, batch)
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert not torch.allclose(after, before)  # it changed something
    for block, counts in blocks.items():
        assert result["blocks"][block] == counts
    assert result["skipped"] == {}
    # the pruned modules lose half their parameters (the output projections' biases stay, hence <= 0.53)
    held = sum(sizes[n] for n in result["blocks"])
    left = sum(_params(model.get_submodule(n)) for n in result["blocks"])
    assert 0.5 <= left / held <= 0.53, left / held
    # and nothing else changed: the whole model drops by exactly what they lost
    assert result["params_before"] - result["params_after"] == held - left
    assert result["params_after"] == _params(model)
    _check_bookkeeping(model)


def _check_bookkeeping(model: nn.Module) -> None:
    """Every head-count and size attribute a pruned module keeps agrees with its projections."""
    for _, m in model.named_modules():
        rule = rule_for(m)
        if isinstance(rule, HeadRule):
            h, lay = _heads_of(m, rule.layout, ""), rule.layout
            want = {**dict.fromkeys(lay.heads, h.nq), **dict.fromkeys(lay.kv_heads, h.nkv),
                    **dict.fromkeys(lay.groups, h.nq // h.nkv), **dict.fromkeys(lay.widths, h.nq * h.d)}
            assert {k: getattr(m, k) for k in want if hasattr(m, k)} == {k: v for k, v in want.items() if hasattr(m, k)}
        elif isinstance(rule, MLPRule):
            second = getattr(m, rule.layout.second)
            for k in rule.layout.sizes:
                assert getattr(m, k, rule_for(second).in_channels(second)) == rule_for(second).in_channels(second)
        elif isinstance(rule, BertLayerRule):
            sa = m.attention.self
            assert sa.num_attention_heads * sa.attention_head_size == sa.all_head_size == sa.query.out_features


def _zero(proj: nn.Module, role: str, start: int, length: int) -> None:
    """Zero positions start..start+length of ``proj``'s outputs (with bias) or inputs."""
    dim = rule_for(proj).weight_dims[role]
    proj.weight.narrow(dim, start, length).zero_()
    if role == "out" and proj.bias is not None:
        proj.bias.narrow(0, start, length).zero_()


@torch.no_grad()
def _zero_first_half(model: nn.Module) -> None:
    """Zero what pruning at 0.5 should remove: the first half of the KV heads with their query heads and the
    first half of the FFN neurons of every block (their scores become 0, the lowest)."""
    for _, m in model.named_modules():
        rule = rule_for(m)
        if isinstance(rule, HeadRule):
            h = _heads_of(m, rule.layout, "")
            _zero(h.q, "out", h.offsets[0], h.nq // 2 * h.d)
            _zero(h.k, "out", h.offsets[1], h.nkv // 2 * h.d)
            _zero(h.v, "out", h.offsets[2], h.nkv // 2 * h.d)
            _zero(h.o, "in", 0, h.nq // 2 * h.d)
        elif isinstance(rule, MLPRule):
            second = getattr(m, rule.layout.second)
            n = rule_for(second).in_channels(second)
            for first in rule.layout.firsts:
                _zero(getattr(m, first), "out", 0, n // 2)
            _zero(second, "in", 0, n // 2)
        elif isinstance(rule, BertLayerRule):
            sa, d = m.attention.self, m.attention.self.attention_head_size
            half = sa.num_attention_heads // 2 * d
            for lin in (sa.query, sa.key, sa.value):
                _zero(lin, "out", 0, half)
            _zero(m.attention.output.dense, "in", 0, half)
            n = m.intermediate.dense.out_features
            _zero(m.intermediate.dense, "out", 0, n // 2)
            _zero(m.output.dense, "in", 0, n // 2)


@pytest.mark.parametrize("name,factory,batch", [f[:3] for f in FAMILIES], ids=IDS_OF)
def test_removing_zeroed_heads_and_neurons_is_exact(name, factory, batch):
    model = factory()
    _zero_first_half(model)
    before = _out(model, batch)
    prune_channels(model, ChannelPruningConfig(ratio=0.5), batch)
    # float tolerance only: sums over fewer terms round differently
    torch.testing.assert_close(_out(model, batch), before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_grouped_query_attention_keeps_groups_consistent(attn):
    model = _llama(kv_heads=2, attn=attn)  # 8 query heads in 2 groups of 4, head_dim 8
    prune_channels(model, ChannelPruningConfig(ratio=0.5), TEXT)
    for layer in model.model.layers:
        a = layer.self_attn
        assert (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features) == (32, 8, 8)  # 1 whole group
        assert (a.o_proj.in_features, a.head_dim, a.num_key_value_groups) == (32, 8, 4)
        assert layer.mlp.intermediate_size == layer.mlp.down_proj.in_features == 48
    # the KV cache sees the pruned heads: decoding the last token after the others gives the full forward
    with torch.no_grad():
        full = model(input_ids=IDS).logits[:, -1]
        cache = model(input_ids=IDS[:, :-1], use_cache=True).cache
        step = model(input_ids=IDS[:, -1:], cache=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_ratio_too_small_for_a_whole_group_prunes_query_heads_evenly_per_group(attn):
    model = _llama(kv_heads=2, attn=attn)  # 2 groups of 4 query heads; 0.25 of 2 groups rounds to none
    with torch.no_grad():  # query heads 1 (group 0) and 6 (group 1) carry nothing
        for layer in model.model.layers:
            for head in (1, 6):
                _zero(layer.self_attn.q_proj, "out", head * 8, 8)
                _zero(layer.self_attn.o_proj, "in", head * 8, 8)
    before = _out(model, TEXT)
    result = prune_channels(model, ChannelPruningConfig(ratio=0.0, head_ratio=0.25), TEXT)
    a = model.model.layers[1].self_attn
    assert result["blocks"]["model.layers.1.self_attn"] == {"heads": [8, 6]}
    assert (a.q_proj.out_features, a.k_proj.out_features, a.num_key_value_groups) == (48, 16, 3)
    torch.testing.assert_close(_out(model, TEXT), before, atol=1e-5, rtol=1e-4)


def test_llama_config_gets_the_pruned_sizes_so_it_rebuilds_the_pruned_model():
    model = _llama()
    before = _out(model, TEXT)
    result = prune_channels(model, ChannelPruningConfig(ratio=0.5), TEXT)
    assert result["config"] == {"": {"num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 48}}
    twin = type(model)(model.config).eval()  # what from_pretrained builds from the saved config
    twin.load_state_dict(model.state_dict(), strict=True)  # every shape fits
    torch.testing.assert_close(_out(twin, TEXT), _out(model, TEXT), atol=0, rtol=0)
    assert _out(twin, TEXT).shape == before.shape
    # a layer left whole disagrees with the others: the config keeps what it said
    model = _llama()
    result = prune_channels(model, ChannelPruningConfig(ratio=0.5, ignore=["model.layers.1"]), TEXT)
    assert result["config"] == {} and model.config.num_attention_heads == 8 and model.config.intermediate_size == 96
    assert "model.layers.1.self_attn" not in result["blocks"]
    model = _llama()  # layers pruned to different widths: no single intermediate_size describes them
    ratios = {"model.layers.0.mlp": 0.5, "model.layers.1.mlp": 0.25}
    result = prune_channels(model, ChannelPruningConfig(ratio=0.0, ratios=ratios), TEXT)
    assert [layer.mlp.intermediate_size for layer in model.model.layers] == [48, 72]
    assert result["config"] == {} and model.config.intermediate_size == 96


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_multi_query_attention_loses_query_heads_and_keeps_its_kv_head(attn):
    model = _llama(kv_heads=1, attn=attn)
    before = _out(model, TEXT)
    result = prune_channels(model, ChannelPruningConfig(ratio=0.5, ffn_ratio=0.0), TEXT)
    a = model.model.layers[0].self_attn
    assert (a.q_proj.out_features, a.k_proj.out_features, a.num_key_value_groups) == (32, 8, 4)
    assert result["blocks"]["model.layers.0.self_attn"] == {"heads": [8, 4]}
    after = _out(model, TEXT)  # eager attention repeats the KV head num_key_value_groups times: 4 now, not 8
    assert after.shape == before.shape and torch.isfinite(after).all()


def test_a_tiny_ratio_changes_outputs_only_a_little():
    model = _llama()
    before = _out(model, TEXT)
    result = prune_channels(model, ChannelPruningConfig(ratio=0.05), TEXT)  # 5 of 96 FFN neurons, no head
    after = _out(model, TEXT)
    assert result["blocks"]["model.layers.0.mlp"] == {"ffn": [96, 91]}
    assert result["skipped"]["model.layers.0.self_attn"] == "the ratio removes none of its 8 heads"
    assert result["params_after"] < result["params_before"]
    # measured: 0.017 relative change of the logits (random weights, the 5 smallest neurons of 96 removed)
    change = (after - before).norm() / before.norm()
    assert change < 0.05, change


def test_nothing_removed_is_an_error_naming_what_was_left_unless_allowed():
    model = _llama()
    want = (r"removed nothing \(model\.layers\.0\.self_attn: the ratio removes none of its 8 heads; "
            r"model\.layers\.0\.mlp: .* 96 FFN neurons.*allow_empty=True")
    with pytest.raises(ConfigError, match=want):
        prune_channels(model, ChannelPruningConfig(ratio=0.001), TEXT)
    before = _params(model)
    result = prune_channels(model, ChannelPruningConfig(ratio=0.001, allow_empty=True), TEXT)
    assert result["params_after"] == before == _params(model)
    assert ChannelPruningConfig.from_dict({"ratio": 0.3, "allow_empty": True}).allow_empty  # a recipe key


def test_what_has_no_rule_is_reported_by_name():
    model = _gpt2(cross=True)  # GPT-2 cross-attention (q_attn + c_attn of width 2E) has no head layout
    enc = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    batch = {**TEXT, "encoder_hidden_states": enc}
    result = prune_channels(model, ChannelPruningConfig(ratio=0.5), batch)
    assert result["skipped"] == {f"transformer.h.{i}.crossattention": "no pruning rule for GPT2Attention"
                                 for i in range(2)}
    assert result["blocks"]["transformer.h.0.attn"] == {"heads": [4, 2]}
    assert _out(model, batch).shape == (2, 9, 64)


# ---- torch's nn.MultiheadAttention ------------------------------------------------------------------
MASKS = {
    "none": {},
    "padding": {"key_padding_mask": torch.tensor([[False] * 7, [False] * 5 + [True] * 2])},
    "float-mask": {"attn_mask": torch.randn(5, 7, generator=torch.Generator().manual_seed(2))},
    "bool-mask-per-head-weights": {"attn_mask": torch.rand(5, 7, generator=torch.Generator().manual_seed(3)) > 0.7,
                           "key_padding_mask": torch.tensor([[False] * 7, [False] * 6 + [True]]),
                           "average_attn_weights": False},
    "no-weights": {"need_weights": False},
}


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("kdim", [None, 24], ids=["packed", "kdim-vdim"])
@pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
def test_converted_multihead_attention_matches_torch(batch_first, kdim, mask):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    new = PrunedMultiheadAttention.from_torch(mha).eval()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, e, generator=g) for n, e in ((5, 32), (7, mha.kdim), (7, mha.vdim)))
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    want, got = mha(q, k, v, **MASKS[mask]), new(q, k, v, **MASKS[mask])
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    if want[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)


class AttnNet(nn.Module):
    """Linear -> nn.MultiheadAttention (self-attention, 4 heads) -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_multihead_attention_heads_go_and_zeroed_heads_go_exactly():
    torch.manual_seed(0)
    model = AttnNet().eval()
    x = torch.rand(3, 6, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # heads 1 and 3 (of 4, 8 wide) carry nothing
        for section in range(3):
            for head in (1, 3):
                rows = slice(section * 32 + head * 8, section * 32 + head * 8 + 8)
                model.attn.in_proj_weight[rows] = 0
                model.attn.in_proj_bias[rows] = 0
        for head in (1, 3):
            model.attn.out_proj.weight[:, head * 8 : head * 8 + 8] = 0
    before = model(x)
    result = prune_channels(model, ChannelPruningConfig(ratio=0.5), x[:1])
    assert isinstance(model.attn, PrunedMultiheadAttention) and model.attn.num_heads == 2
    assert (model.attn.q_proj.out_features, model.attn.out_proj.in_features, model.attn.head_dim) == (16, 16, 8)
    assert result["blocks"]["attn"] == {"heads": [4, 2]}
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
    # the replacement is in the artifact allowlist: its constructor arguments rebuild the same tensors
    from slimguard.core.modules import CLASSES, module_spec

    spec = module_spec(model.attn)
    twin = CLASSES.get(spec["class"])(**spec["init"])
    twin.load_state_dict(model.attn.state_dict())
    h = model.proj(x)
    torch.testing.assert_close(twin.eval()(h, h, h)[0], model.attn(h, h, h)[0], atol=0, rtol=0)


def test_transformer_encoder_with_padding_mask_runs_after_head_pruning():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2).eval()
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    holder = nn.Sequential(enc)
    result = prune_channels(holder, ChannelPruningConfig(ratio=0.5), x)
    assert result["blocks"]["0.layers.0.self_attn"] == {"heads": [4, 2]}
    assert result["blocks"]["0.layers.1"] == {"ffn": [64, 32]}
    assert enc.use_nested_tensor is False  # its nested-tensor kernel needs the packed projection
    with torch.no_grad():  # eval + padding mask: the path that took torch's fused kernel before
        out = enc(x, src_key_padding_mask=pad)
    assert out.shape == (2, 6, 32) and torch.isfinite(out).all()


# ---- GroupNorm CNN ----------------------------------------------------------------------------------
class GroupNormResNet(nn.Module):
    """Conv -> GroupNorm(4) -> residual block of two convs with GroupNorm(4) -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.GroupNorm(4, 24), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1), nn.GroupNorm(4, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = torch.relu(self.b(self.a(s)) + s)
        return self.head(y.mean((2, 3)))


def test_groupnorm_cnn_loses_whole_groups():
    torch.manual_seed(0)
    model = GroupNormResNet().eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    before = model(x)
    sizes = _params(model)
    result = sg.prune_(model, ChannelPruningConfig(ratio=0.5), example_inputs=x[:1])
    for gn, channels in ((model.stem[1], 8), (model.a[1], 12), (model.b[1], 8)):
        assert (gn.num_channels, gn.num_groups) == (channels, 2)  # 2 of 4 groups, group width kept
    assert (model.stem[0].out_channels, model.a[0].out_channels, model.b[0].out_channels) == (8, 12, 8)
    assert model(x).shape == before.shape
    assert 0.2 < result["params_after"] / sizes < 0.3  # the convs lose half their inputs and outputs

