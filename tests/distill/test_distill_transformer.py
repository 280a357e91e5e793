"""Transformer students: layer dropping initialised from the teacher (saved and rebuilt with the new
depth), and embedding distillation with hidden-state and self-attention transfer on a tiny BERT."""

from __future__ import annotations

import copy

import pytest
import torch

from slimguard.core.errors import ConfigError
from slimguard.data.core import DataBundle
from slimguard.distill import DistillConfig, DropLayersConfig, distill, drop_layers_
from slimguard.train.loop import FinetuneConfig

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_bert():
    import transformers

    from slimguard.models.sources import SentenceEmbedder, minilm_dir
    from slimguard.models.spec import ModelInfo, set_info

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    model = SentenceEmbedder(transformers.BertModel(cfg, add_pooling_layer=False))
    model.tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    set_info(model, ModelInfo(source={"kind": "hf", "config": cfg.to_dict(), "pooling": "mean",
                                      "tokenizer_dir": str(minilm_dir())}, task="embedding"))
    return model.eval()


@pytest.fixture(scope="module")
def texts() -> DataBundle:
    from slimguard import data

    full = data.load("docs-text")
    return DataBundle(meta=full.meta, train=full.train.subset(96, name="train"), val=full.val.subset(40, name="val"),
                      test=full.test.subset(40, name="test"), calib=full.calib)


def test_drop_layers_keeps_teacher_weights_and_round_trips(tiny_bert, tmp_path) -> None:
    from slimguard.artifact import load, save

    student = drop_layers_(copy.deepcopy(tiny_bert), [0, 3])
    layers = student.encoder.encoder.layer
    assert len(layers) == 2 and student.encoder.config.num_hidden_layers == 2
    for k, v in layers[1].state_dict().items():
        assert torch.equal(v, tiny_bert.encoder.encoder.layer[3].state_dict()[k]), k
    assert len(tiny_bert.encoder.encoder.layer) == 4  # the teacher keeps its depth
    back = load(save(student, tmp_path / "s.slim"))
    assert len(back.encoder.encoder.layer) == 2
    enc = tiny_bert.tokenize(["Layer dropping keeps the chosen layers.", "A second sentence."])
    with torch.no_grad():
        assert torch.allclose(back(**enc), student.eval()(**enc), atol=1e-6)


@pytest.mark.parametrize("keep,match", [([0, 9], "out of range"), ([1, 1], "at most once"), ([], "at least one")])
def test_bad_layer_choice(tiny_bert, keep, match) -> None:
    with pytest.raises(ConfigError, match=match):
        drop_layers_(copy.deepcopy(tiny_bert), keep)


def test_drop_layers_recipe_step(tiny_bert, texts) -> None:
    from slimguard.transforms import run_step

    student = copy.deepcopy(tiny_bert)
    out = run_step(student, DropLayersConfig(keep=[1, 2, 3]), texts, progress=False)
    assert out == {"layers_before": 4, "layers_after": 3, "kept": [1, 2, 3]}


def test_embedding_distillation_with_hidden_and_attention_transfer(tiny_bert, texts) -> None:
    student = drop_layers_(copy.deepcopy(tiny_bert), [0, 2])
    pre = "encoder.encoder.layer"
    impl = tiny_bert.encoder.config._attn_implementation
    cfg = DistillConfig(max_length=48, finetune=FinetuneConfig(epochs=4, lr=5e-3, batch_size=16, patience=0),
                        features={f"{pre}.0": f"{pre}.1", f"{pre}.1": f"{pre}.3"},
                        attention={f"{pre}.1.attention.self": f"{pre}.3.attention.self"})
    history = distill(tiny_bert, student, texts, cfg, progress=False)
    losses = [e["train_loss"] for e in history["epochs"]]
    assert losses[-1] < 0.97 * losses[0], losses
    assert not history["teacher_cached"] and history["projections"] == 0
    # attention probabilities need the eager implementation during training; it is restored afterwards
    assert tiny_bert.encoder.config._attn_implementation == impl
    assert student.encoder.config._attn_implementation == impl


def test_embedding_output_only_distillation_caches_teacher(tiny_bert, texts) -> None:
    student = drop_layers_(copy.deepcopy(tiny_bert), [3])
    cfg = DistillConfig(max_length=48, embedding_loss="mse",
                        finetune=FinetuneConfig(epochs=2, lr=3e-3, batch_size=32, patience=0))
    history = distill(tiny_bert, student, texts, cfg, progress=False)
    assert history["teacher_cached"] and history["best_val_score"] > 0.5
