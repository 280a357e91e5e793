"""Hugging Face folders load by task with their heads and tokenizer, evaluate with the task's metric, and
survive as artifacts with the folder gone; ``export_hf`` writes folders transformers loads back.

Every family is a tiny model built from a transformers config with random weights (tests/hf_support.py)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hf_support import FAMILIES, build_family
from slimguard.core.errors import ModelError
from slimguard.data.core import DataMeta, Split
from slimguard.evaluate import evaluate
from slimguard.models.hf import TASKS, export_hf
from slimguard.models.sources import load_model
from slimguard.models.spec import info

TEXTS = ["the film was good", "a bad movie", "great actor and a fine scene", "awful plot with a dull story",
         "the story was long", "short film", "it is good", "this is bad"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: build_family(name, root / name) for name in FAMILIES}


def _text_split(labels: list[int] | None) -> Split:
    meta = DataMeta(name="t", task="classification" if labels else "embedding", input_shape=(), num_classes=3,
                    mean=[], std=[], low=0.0, high=0.0, kind="text")
    return Split("test", list(TEXTS), None if labels is None else torch.tensor(labels), meta)


def _image_split() -> Split:
    g = torch.Generator().manual_seed(0)
    meta = DataMeta(name="i", task="classification", input_shape=(1, 16, 16), num_classes=10, mean=[0.5],
                    std=[0.25], low=0.0, high=1.0)
    return Split("test", torch.rand(12, 1, 16, 16, generator=g), torch.arange(12) % 10, meta)


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if info(model).task == "image-classification":
            return model(torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)))
        tokenize = model.tokenize
        return model(**tokenize(TEXTS[:2]))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loads_with_its_task_and_head(folders: dict[str, Path], family: str) -> None:
    import transformers

    model = load_model(f"hf:{folders[family]}")
    task = FAMILIES[family]
    assert info(model).task == task
    out = _outputs(model)
    config = transformers.AutoConfig.from_pretrained(str(folders[family]))
    want = {"sequence-classification": (2, 3), "image-classification": (2, 10), "embedding": (2, 32)}.get(task)
    want = want or (2, out.shape[1], config.vocab_size)  # a causal LM: next-token logits
    assert tuple(out.shape) == want  # the head is kept: labels or vocabulary, not hidden states
    inner = model.encoder if task == "embedding" else model.model
    assert type(inner).__name__ == config.architectures[0]


@pytest.mark.parametrize(("family", "keys"), [
    ("bert", {"accuracy", "f1_macro"}), ("distilbert", {"accuracy", "f1_macro"}), ("roberta", {"accuracy", "f1_macro"}),
    ("llama", {"perplexity"}), ("gpt2", {"perplexity"}), ("bert-embed", {"cosine_mean", "cosine_min"}),
    ("vit", {"accuracy", "f1_macro"}),
])
def test_each_task_is_scored_with_its_metric(folders: dict[str, Path], family: str, keys: set[str]) -> None:
    model = load_model(f"hf:{folders[family]}")
    split = _image_split() if family == "vit" else _text_split([0, 1, 0, 1, 2, 2, 0, 1])
    if family == "bert-embed":
        split = _text_split(None)
    got = evaluate(model, split, measure_latency=False, measure_size=False)
    assert keys <= set(got)
    if "perplexity" in got:  # random weights over a 40-token vocabulary: near uniform, so near 40
        assert 5.0 < got["perplexity"] < 200.0
    if "cosine_mean" in got:  # no reference given: the model is its own, so fidelity is exact
        assert got["cosine_mean"] == pytest.approx(1.0, abs=1e-5)


def test_unlabelled_text_scores_agreement_and_kl_to_the_original(folders: dict[str, Path]) -> None:
    model = load_model(f"hf:{folders['bert']}")
    alone = evaluate(model, _text_split(None), measure_latency=False, measure_size=False)
    assert alone["agreement"] == 1.0 and alone["kl"] == pytest.approx(0.0, abs=1e-6)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.classifier.weight.mul_(-1.0)
    vs = evaluate(changed, _text_split(None), reference=model, measure_latency=False, measure_size=False)
    assert vs["kl"] > 1e-4 and vs["agreement"] < 1.0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_artifact_loads_with_the_source_folder_gone(folders: dict[str, Path], family: str, tmp_path: Path) -> None:
    from slimguard.artifact import load, read_manifest, save

    folder = shutil.copytree(folders[family], tmp_path / family)
    model = load_model(f"hf:{folder}")
    before = _outputs(model)
    path = save(model, tmp_path / "m.slim")
    shutil.rmtree(folder)
    again = load(path)
    assert torch.allclose(_outputs(again), before, atol=1e-6)
    source = read_manifest(path)["model"]["source"]
    assert source["task"] == FAMILIES[family] and "tokenizer_dir" not in source
    assert bool(source.get("tokenizer")) == (FAMILIES[family] != "image-classification")


def test_missing_tokenizer_is_an_error_naming_the_files(tmp_path: Path) -> None:
    folder = build_family("bert", tmp_path / "bert", tokenizer=False)
    with pytest.raises(ModelError, match=r"tokenizer.*tokenizer\.json.*vocab\.txt"):
        load_model(f"hf:{folder}")


def test_task_option_overrides_the_config(folders: dict[str, Path]) -> None:
    model = load_model(f"hf:{folders['bert']}", task="embedding")
    assert info(model).task == "embedding" and _outputs(model).shape == (2, 32)
    with pytest.raises(ModelError, match="unknown hf task 'translation'; allowed: causal-lm, embedding"):
        load_model(f"hf:{folders['bert']}", task="translation")
    assert set(TASKS.names()) == {"causal-lm", "embedding", "image-classification", "sequence-classification"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_hf_folder_loads_in_transformers(folders: dict[str, Path], family: str, tmp_path: Path) -> None:
    import transformers

    model = load_model(f"hf:{folders[family]}")
    out = export_hf(model, tmp_path / "export")
    auto = getattr(transformers, TASKS.get(FAMILIES[family]).auto_class)
    back = auto.from_pretrained(str(out), local_files_only=True).eval()
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in (model.encoder if family ==
                                                                                 "bert-embed" else model.model)
                                                            .parameters())


def _shrink_linear(layer: nn.Linear, keep_out: int | None = None, keep_in: int | None = None) -> nn.Linear:
    out_f, in_f = keep_out or layer.out_features, keep_in or layer.in_features
    new = nn.Linear(in_f, out_f, bias=layer.bias is not None)
    with torch.no_grad():
        new.weight.copy_(layer.weight[:out_f, :in_f])
        if layer.bias is not None:
            new.bias.copy_(layer.bias[:out_f])
    return new


def test_export_hf_writes_pruned_ffn_sizes_into_the_config(folders: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    bert = load_model(f"hf:{folders['bert']}")
    for layer in bert.model.bert.encoder.layer:  # FFN neurons 64 -> 24, as structured pruning leaves them
        layer.intermediate.dense = _shrink_linear(layer.intermediate.dense, keep_out=24)
        layer.output.dense = _shrink_linear(layer.output.dense, keep_in=24)
    out = export_hf(bert, tmp_path / "bert")
    back = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), local_files_only=True)
    assert back.config.intermediate_size == 24

    llama = load_model(f"hf:{folders['llama']}")
    for layer in llama.model.model.layers:
        mlp = layer.mlp
        mlp.gate_proj, mlp.up_proj = _shrink_linear(mlp.gate_proj, 40), _shrink_linear(mlp.up_proj, 40)
        mlp.down_proj = _shrink_linear(mlp.down_proj, keep_in=40)
    out = export_hf(llama, tmp_path / "llama")
    assert transformers.AutoConfig.from_pretrained(str(out)).intermediate_size == 40


def test_export_hf_refuses_what_transformers_cannot_rebuild(folders: dict[str, Path], tmp_path: Path) -> None:
    import slimguard as sg

    # layers of different widths are written zero-padded (tests/models/test_models_hf_export.py); quantized
    # layers are slimguard's own modules, which transformers cannot build
    quantized = load_model(f"hf:{folders['bert']}")
    sg.quantize_(quantized, sg.Int8DynamicConfig())
    with pytest.raises(ModelError, match="DynamicInt8Linear, which transformers cannot rebuild"):
        export_hf(quantized, tmp_path / "q")
