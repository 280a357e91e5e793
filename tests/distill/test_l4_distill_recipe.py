"""The layer-dropping distillation recipe (``benchmarks/recipes/minilm-l4-distill.yaml``: keep 4 of 6 layers,
distill on ``docs-prose`` with hidden-state and attention transfer, int8 on ONNX Runtime), its own steps end to
end on a tiny random-config BERT embedder.

The recipe names MiniLM's layout (6 layers, ``encoder.encoder.layer.N``), so the stand-in is a 6-layer BERT
(hidden 32, 4 heads, FFN 64, word-level vocabulary, random weights). Only the training data and length are
swapped for a small text file and a few steps; every other option is the shipped recipe's.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tests.hf_support import save_tiny_bert  # noqa: E402

import slimguard as sg  # noqa: E402
from slimguard.artifact import load, save  # noqa: E402
from slimguard.core.recipe import load as load_recipe  # noqa: E402
from slimguard.distill.core import DistillConfig, LengthGroupedBatches  # noqa: E402
from slimguard.prune.depth import DropLayersConfig, layer_stack  # noqa: E402
from slimguard.runtime.ort_transformer import OrtEncoder, OrtInt8Config  # noqa: E402
from slimguard.transforms import run_step  # noqa: E402

STEPS = 30
RECIPE = Path(__file__).resolve().parents[2] / "benchmarks" / "recipes" / "minilm-l4-distill.yaml"
WORDS = ("the a model of on int8 runtime graph sentence longer short text fast slow weights layer attention "
         "compression encoder batch token cpu small large every").split()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("bert6"), WORDS, layers=6, initializer_range=0.3)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(n),), generator=g))
             for n in torch.randint(2, 12, (120,), generator=g)]
    path = tmp_path_factory.mktemp("texts") / "texts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _small(recipe, source: str, steps: int):
    """The recipe's steps with the distillation trained on ``source`` for ``steps`` steps."""
    out = []
    for step in recipe.steps:
        if isinstance(step, DistillConfig):
            step = dataclasses.replace(step, train_data=source,
                                       finetune=dataclasses.replace(step.finetune, max_steps=steps, batch_size=8,
                                                                    epochs=10, lr=1e-3))
        out.append(step)
    return out


def test_recipe_parses_and_its_steps_validate():
    recipe = load_recipe(str(RECIPE))
    assert [type(s) for s in recipe.steps] == [DropLayersConfig, DistillConfig, OrtInt8Config]
    drop, distill, ort = recipe.steps
    for step in recipe.steps:
        step.validate()
    assert distill.train_data == "docs-prose" and distill.group_by_length
    # every student layer named in the distillation exists after the drop, and maps to the teacher layer it
    # was initialised from
    kept = len(drop.keep)
    for student, teacher in distill.features.items():
        i = int(student.split(".")[3])
        assert i < kept and teacher == f"encoder.encoder.layer.{drop.keep[i]}"
    assert ort.per_channel and recipe.budget == {"min_cosine_mean": 0.99, "min_cosine_min": 0.97}


def test_recipe_steps_run_end_to_end_on_a_small_bert(bert_dir, text_file, tmp_path):
    recipe = load_recipe(str(RECIPE))
    model = sg.models.load_model(f"hf:{bert_dir}").eval()
    original = copy.deepcopy(model)
    data = sg.data.load(f"text:{text_file}")
    texts = list(data.val.x)
    ref = original.encode(texts)

    center = ref.mean(0)

    def fidelity(emb: torch.Tensor) -> float:
        """Cosine to the teacher after removing the teacher's mean embedding (a random BERT's embeddings
        share one dominant direction, which would hide every difference)."""
        return float(F.cosine_similarity(emb - center, ref - center, dim=-1).mean())

    drop, distill, ort = _small(recipe, f"text:{text_file}", steps=STEPS)
    assert run_step(model, drop, data)["layers_after"] == len(drop.keep) == 4
    before = fidelity(model.encode(texts))
    history = run_step(model, distill, data, original=original, progress=False)
    assert history["steps"] == STEPS and history["best_val_score"] is not None
    after = fidelity(model.encode(texts))
    assert after > before + 0.005, (before, after)  # the student moved toward the teacher: measured +0.011
    run_step(model, ort, data)
    assert isinstance(model.encoder, OrtEncoder)

    path = save(model, tmp_path / "model.slim", recipe=recipe.to_dict())
    loaded = load(path).eval()
    out = loaded.encode(texts, batch_size=32)
    assert out.shape == ref.shape and len(layer_stack(original)[2]) == 6
    torch.testing.assert_close(out, model.encode(texts, batch_size=32), atol=1e-5, rtol=0)  # the same graph
    assert fidelity(out) > after - 0.05  # int8 of a random tiny model costs little


def test_length_grouped_batches_use_every_row_once_and_pad_less():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (200,), generator=g)
    mask = (torch.arange(40)[None, :] < lengths[:, None]).long()
    rows = {"input_ids": torch.arange(200)[:, None].expand(200, 40).clone(), "attention_mask": mask}
    batches = LengthGroupedBatches(rows, None, batch_size=16, seed=0, pool=4)
    assert len(batches) == 13
    first = list(batches)
    ids = torch.cat([b["input_ids"][:, 0] for b, _ in first])
    assert sorted(ids.tolist()) == list(range(200))  # each row exactly once per pass
    padded = sum(len(b["input_ids"]) * int(b["attention_mask"].sum(1).max()) for b, _ in first)
    random_pad = sum(16 * int(lengths[i : i + 16].max()) for i in range(0, 200, 16))
    assert padded < 0.8 * random_pad  # grouped batches pad far less than batches in data order
    second = torch.cat([b["input_ids"][:, 0] for b, _ in batches])
    assert not torch.equal(ids, second)  # a new order every pass


def test_train_data_of_another_kind_is_refused(bert_dir, text_file):
    teacher = sg.models.load_model(f"hf:{bert_dir}").eval()
    from slimguard.core.errors import DataError

    with pytest.raises(DataError, match="train_data 'digits'"):
        run_step(copy.deepcopy(teacher), DistillConfig(train_data="digits"), sg.data.load(f"text:{text_file}"),
                 original=teacher, progress=False)


def test_layer_stack_of_the_stand_in_is_what_the_recipe_cuts(bert_dir):
    model = sg.models.load_model(f"hf:{bert_dir}")
    assert len(layer_stack(model)[2]) == 6
