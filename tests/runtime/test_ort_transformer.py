"""The ORT int8 path for transformer encoders: the ``ort-int8`` step, the artifact round trip, the graph
checks, length-sorted ``encode`` and the ``minilm-fast`` recipe. A 2-layer BERT with random weights and a
small word-level vocabulary stands in for MiniLM (the real model runs in ``benchmarks/encoder_cpu.py``)."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

import onnx  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tests.hf_support import save_tiny_bert  # noqa: E402

import slimguard as sg  # noqa: E402
from slimguard.artifact import load, save  # noqa: E402
from slimguard.core.errors import ArtifactError, ConfigError, ModelError  # noqa: E402
from slimguard.core.recipe import load as load_recipe  # noqa: E402
from slimguard.runtime.ort_transformer import OrtEncoder, OrtInt8Config, check_graph  # noqa: E402

WORDS = ("the a model of on int8 runtime graph sentence longer short text fast slow weights layer attention "
         "compression encoder batch token cpu").split()
TEXTS = ["the model", "a much longer sentence of text on the int8 runtime graph of the encoder",
         "short text", "fast", "the attention layer of a sentence encoder on cpu",
         "weights of the model on a batch of token text"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A Hugging Face folder: 2-layer BERT (hidden 32, 4 heads), random weights, word-level tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), WORDS, layers=2)


@pytest.fixture
def tiny(tiny_dir):
    model = sg.models.load_model(f"hf:{tiny_dir}")
    assert hasattr(model, "encode")
    return model.eval()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1)


def test_step_runs_the_encoder_in_int8_on_ort(tiny):
    ref = tiny.encode(TEXTS)
    result = sg.quantize_(tiny, OrtInt8Config())
    assert isinstance(tiny.encoder, OrtEncoder)
    # 2 layers x (q, k, v, attention output, FFN in, FFN out) = 12 weight MatMuls, all int8
    assert result["int8_ops"].get("MatMulInteger", 0) == 12
    out = tiny.encode(TEXTS)
    assert out.shape == ref.shape
    assert _cos(out, ref).min() > 0.99  # per-channel int8 of a small random model: measured 0.9999


def test_optimize_fuses_attention_and_quantizes_it(tiny):
    ref = tiny.encode(TEXTS)
    result = sg.quantize_(tiny, OrtInt8Config(optimize=True))
    assert result["int8_ops"].get("QAttention", 0) == 2  # one fused, int8 attention per layer
    assert _cos(tiny.encode(TEXTS), ref).min() > 0.99


@pytest.mark.parametrize("optimize", [False, True])
def test_embedding_tables_are_stored_in_int8_unless_asked_not_to(tiny_dir, optimize):
    """Default: the word, position and token-type tables in int8 (plain Gather lookups, or the optimizer's
    fused embedding layer), a smaller graph, and embeddings that still agree; ``false`` keeps them float."""
    sizes, outs = {}, {}
    for embeddings in (True, False):
        model = sg.models.load_model(f"hf:{tiny_dir}").eval()
        ref = model.encode(TEXTS)
        tables = sum(m.weight.numel() for m in model.encoder.modules() if isinstance(m, nn.Embedding))
        result = sg.quantize_(model, OrtInt8Config(optimize=optimize, quantize_embeddings=embeddings))
        assert result["int8_embedding_tables"] == ((1 if optimize else 3) if embeddings else 0)
        sizes[embeddings], outs[embeddings] = result["graph_bytes"], model.encode(TEXTS)
        assert _cos(outs[embeddings], ref).min() > 0.99
    # each table entry: 4 bytes in float, 1 in int8 (less the scales, zero points and dequantize nodes added:
    # measured 5,368 of 6,816 bytes saved for this tiny model's 2,272 entries)
    assert sizes[False] - sizes[True] > 0.6 * 3 * tables


def test_quantize_embeddings_that_changes_nothing_says_so(tiny):
    with pytest.warns(UserWarning, match="no embedding table was stored in int8"):
        result = sg.quantize_(tiny, OrtInt8Config(keep_float=["embeddings"]))
    assert result["int8_embedding_tables"] == 0


def test_keep_float_leaves_the_named_layer_in_float(tiny):
    base = sg.quantize_(tiny, OrtInt8Config(keep_float=["layer.1/output/dense"]))
    assert base["int8_ops"]["MatMulInteger"] == 11
    assert base["float_matmuls"] >= 1


def test_artifact_round_trip_runs_the_same_graph(tiny, tmp_path):
    sg.quantize_(tiny, OrtInt8Config())
    before = tiny.encode(TEXTS)
    path = save(tiny, tmp_path / "m.slim")
    back = load(path)
    assert isinstance(back.encoder, OrtEncoder)
    assert back.encoder.graph_bytes() == tiny.encoder.graph_bytes()
    torch.testing.assert_close(back.encode(TEXTS), before, atol=1e-6, rtol=0)


def test_step_refuses_a_model_that_is_not_an_embedder():
    with pytest.raises(ModelError, match="sentence embedders"):
        sg.quantize_(nn.Linear(4, 4), OrtInt8Config())


def test_step_refuses_to_run_twice(tiny):
    sg.quantize_(tiny, OrtInt8Config())
    with pytest.raises(ModelError, match="already runs on ONNX Runtime"):
        sg.quantize_(tiny, OrtInt8Config())


def _graph(tiny) -> onnx.ModelProto:
    sg.quantize_(tiny, OrtInt8Config())
    return onnx.load_from_string(tiny.encoder.graph_bytes())


def test_graph_with_external_data_is_refused_before_ort_reads_it(tiny):
    proto = _graph(tiny)
    init = proto.graph.initializer[0]
    init.data_location = onnx.TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    blob = proto.SerializeToString()
    with pytest.raises(ArtifactError, match="external data"):
        check_graph(blob)
    # a module whose buffer was swapped for such a graph refuses to build its session
    enc = tiny.encoder
    enc.graph = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    with pytest.raises(ArtifactError, match="external data"):
        tiny.encode(TEXTS[:1])


def test_graph_with_a_foreign_operator_domain_is_refused(tiny):
    proto = _graph(tiny)
    proto.graph.node[0].domain = "ai.custom.ops"
    with pytest.raises(ArtifactError, match="not allowed"):
        check_graph(proto.SerializeToString())
    with pytest.raises(ArtifactError, match="not a valid ONNX model"):
        check_graph(b"\xff" * 64)


@pytest.mark.parametrize("bad", [-1, True, 2**31, "12"])
def test_encoder_size_from_a_manifest_is_checked(bad):
    with pytest.raises(ArtifactError, match="nbytes"):
        OrtEncoder(nbytes=bad)


def test_encode_batches_longest_first_and_keeps_the_order(tiny):
    seen: list[list[str]] = []
    tokenize = tiny.tokenize

    def spy(texts, max_length=128):
        seen.append(list(texts))
        return tokenize(texts, max_length)

    tiny.tokenize = spy
    out = tiny.encode(TEXTS, batch_size=2)
    lengths = [len(t) for batch in seen for t in batch]
    assert lengths == sorted(lengths, reverse=True)
    one_by_one = torch.cat([tiny.encode([t]) for t in TEXTS])  # each text alone: no padding at all
    torch.testing.assert_close(out, one_by_one, atol=1e-5, rtol=0)


def test_minilm_fast_recipe_is_shipped_and_ends_on_ort():
    recipe = load_recipe("minilm-fast")
    assert recipe.model == "minilm" and recipe.task == "embedding"
    assert recipe.budget == {"min_cosine_mean": 0.99, "min_cosine_min": 0.97}
    assert isinstance(recipe.steps[-1], OrtInt8Config)
    assert recipe.steps[-1].call_overhead_tokens == 64  # padding-aware batches, chosen on validation texts


def _calls(model) -> list[tuple[int, int]]:
    """Record the (rows, padded length) of every call of ``model``'s forward."""
    seen: list[tuple[int, int]] = []
    forward = model.forward

    def spy(input_ids, attention_mask=None):
        seen.append(tuple(input_ids.shape))
        return forward(input_ids, attention_mask)

    model.forward = spy
    return seen


def test_padding_aware_batches_cut_the_long_tail_and_keep_the_answers(tiny, tmp_path):
    texts = [*(["the model"] * 6), TEXTS[1], "short text"]
    sg.quantize_(tiny, OrtInt8Config(call_overhead_tokens=4))
    assert tiny.encoder.call_overhead_tokens == 4
    seen = _calls(tiny)
    out = tiny.encode(texts, batch_size=8)
    # the long text runs alone; the seven short ones pad to 4 tokens, not to the long one's 16
    long_len = len(tiny.tokenizer(TEXTS[1])["input_ids"])
    assert seen == [(1, long_len), (7, 4)]
    one_by_one = torch.cat([tiny.encode([t]) for t in texts])
    assert _cos(out, one_by_one).min() > 0.999  # int8 activations are quantized per call: not bit-equal
    back = load(save(tiny, tmp_path / "m.slim"))  # the setting travels in the artifact
    assert back.encoder.call_overhead_tokens == 4
    seen_back = _calls(back)
    back.encode(texts, batch_size=8)
    assert seen_back == seen[:2]


def test_fixed_batches_without_a_call_cost(tiny):
    assert OrtInt8Config().call_overhead_tokens == 64  # padding-aware by default
    sg.quantize_(tiny, OrtInt8Config(call_overhead_tokens=0))
    seen = _calls(tiny)
    tiny.encode([*(["the model"] * 6), TEXTS[1], "short text"], batch_size=8)
    assert len(seen) == 1  # one batch of 8, padded to the longest


@pytest.mark.parametrize(("lengths", "items", "call", "want"), [
    ([], 32, 64, []),
    ([9], 32, 64, [(0, 1)]),
    ([10] * 5, 2, 0, [(0, 2), (2, 4), (4, 5)]),  # equal work whatever the cuts: the fewest calls
    ([100, 10, 10, 10], 32, 8, [(0, 1), (1, 4)]),  # pad three rows to 100 (270 tokens) or pay one call (8)
    ([100, 10, 10, 10], 32, 500, [(0, 4)]),  # a call dearer than the padding: one batch
    ([20] * 70, 32, 64, [(0, 32), (32, 64), (64, 70)]),
])
def test_padding_groups_minimise_padded_tokens_plus_calls(lengths, items, call, want):
    from slimguard.models.hf import padding_groups

    assert padding_groups(lengths, items, call) == want


def test_padding_groups_are_exact_against_brute_force():
    import itertools
    import random

    from slimguard.models.hf import padding_groups

    def work(lengths: list[int], call: int, runs: list[tuple[int, int]]) -> int:
        return sum(call + (b - a) * lengths[a] for a, b in runs)

    rng = random.Random(0)
    for _ in range(200):
        n, items, call = rng.randint(1, 8), rng.randint(1, 4), rng.choice([0, 3, 10, 40])
        lengths = sorted((rng.randint(1, 60) for _ in range(n)), reverse=True)
        partitions = [list(itertools.pairwise([0, *cuts, n])) for r in range(n)
                      for cuts in itertools.combinations(range(1, n), r)]
        least = min(work(lengths, call, p) for p in partitions if all(b - a <= items for a, b in p))
        got = padding_groups(lengths, items, call)
        assert work(lengths, call, got) == least
        assert all(b - a <= items for a, b in got) and got[0][0] == 0 and got[-1][1] == n


def test_padding_groups_refuse_unsorted_lengths():
    from slimguard.models.hf import padding_groups

    with pytest.raises(ValueError, match="sorted longest first"):
        padding_groups([3, 9], 32, 64)


@pytest.mark.parametrize("name", ["no-such-recipe", "../recipes/minilm-fast", ""])
def test_a_name_that_is_neither_a_file_nor_a_shipped_recipe_is_a_user_error(name):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(name)


def test_params_count_the_graphs_weights_not_its_bytes() -> None:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from slimguard.runtime.measure import count_nonzero, count_params

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")  # one zero among 12
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    blob = helper.make_model(graph).SerializeToString()
    enc = OrtEncoder.from_bytes(blob)
    assert len(blob) > 12
    assert count_params(enc) == 12 and count_nonzero(enc) == 11
    assert onnx.load_from_string(enc.graph_bytes()).graph.initializer[0].name == "w"
