"""User data: labelled text (``jsonl:``, ``tsv:``), image folders, and the user's own splits kept as given
(a split column or array, or files named with ``{split}``), never re-split silently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slimguard import data as sgdata
from slimguard.core.errors import DataError

WORDS = ["good film", "bad film", "great plot", "dull plot", "fine actor", "awful actor", "long story", "short story"]


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [{"text": f"{WORDS[i % 8]} number {i + offset}", "label": ["neg", "pos"][i % 2]} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_split_field_is_kept_as_given(tmp_path: Path) -> None:
    rows = [{**r, "split": "test" if i >= 16 else ("val" if i >= 12 else "train")} for i, r in enumerate(_rows(20))]
    bundle = sgdata.load(f"jsonl:{_write_jsonl(tmp_path / 'd.jsonl', rows)}")
    assert bundle.test.x == [r["text"] for r in rows[16:]]
    assert bundle.val.x == [r["text"] for r in rows[12:16]]
    assert len(bundle.train) == 12 and bundle.meta.splits == "as given"
    assert bundle.meta.class_names == ["neg", "pos"] and bundle.test.y.tolist() == [0, 1, 0, 1]
    assert bundle.meta.kind == "text" and bundle.meta.task == "classification"


def test_jsonl_split_files_keep_test_and_carve_val_from_train_openly(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "d-train.jsonl", _rows(20))
    _write_jsonl(tmp_path / "d-test.jsonl", _rows(6, offset=100))
    bundle = sgdata.load(f"jsonl:{tmp_path / 'd-{split}.jsonl'}")
    assert bundle.test.x == [r["text"] for r in _rows(6, offset=100)]  # the user's test, untouched
    assert len(bundle.train) + len(bundle.val) == 20 and len(bundle.val) > 0
    assert set(bundle.val.x).isdisjoint(bundle.train.x)
    assert "val is a seeded stratified 20% of the given train" in bundle.meta.splits


def test_one_file_without_splits_is_split_with_a_seed_and_says_so(tmp_path: Path) -> None:
    bundle = sgdata.load(f"jsonl:{_write_jsonl(tmp_path / 'd.jsonl', _rows(30))}")
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 30
    assert bundle.meta.splits.startswith("seeded stratified 60/20/20")


def test_tsv_with_split_column(tmp_path: Path) -> None:
    lines = ["text\tlabel\tsplit"] + [f"{WORDS[i % 8]} {i}\t{i % 3}\t{'test' if i < 5 else 'train'}"
                                      for i in range(15)]
    (tmp_path / "d.tsv").write_text("\n".join(lines))
    bundle = sgdata.load(f"tsv:{tmp_path / 'd.tsv'}")
    assert bundle.test.x == [f"{WORDS[i % 8]} {i}" for i in range(5)]
    assert bundle.meta.num_classes == 3 and bundle.test.y.tolist() == [0, 1, 2, 0, 1]


@pytest.mark.parametrize(("content", "message"), [
    ('{"text": "a"}\n', "line 1 needs a string 'text' and a 'label'"),
    ("not json\n", "line 1 is not JSON"),
    ('{"text": "a", "label": 0, "split": "holdout"}\n' * 12, "row 0 has split 'holdout'"),
])
def test_bad_jsonl_is_a_one_line_error(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        sgdata.load(f"jsonl:{tmp_path / 'd.jsonl'}")


def _arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 4, 4)).astype(np.float32), np.arange(n) % 3


def test_npz_split_array_and_split_files_are_respected(tmp_path: Path) -> None:
    x, y = _arrays(30, 0)
    split = np.array(["train"] * 18 + ["val"] * 6 + ["test"] * 6)
    np.savez(tmp_path / "s.npz", x=x, y=y, split=split)
    bundle = sgdata.load(f"npz:{tmp_path / 's.npz'}")
    assert torch.equal(bundle.test.x, torch.from_numpy(x[24:]))
    assert torch.equal(bundle.val.x, torch.from_numpy(x[18:24]))
    assert bundle.meta.splits == "as given"
    for name, (xs, ys) in {"train": _arrays(24, 1), "val": _arrays(6, 2), "test": _arrays(9, 3)}.items():
        np.savez(tmp_path / f"f-{name}.npz", x=xs, y=ys)
    files = sgdata.load(f"npz:{tmp_path / 'f-{split}.npz'}")
    assert torch.equal(files.test.x, torch.from_numpy(_arrays(9, 3)[0])) and len(files.train) == 24
    plain = sgdata.load(f"npz:{tmp_path / 'f-train.npz'}")  # one file: slimguard splits it, and records that
    assert plain.meta.splits.startswith("seeded stratified")


def _image(path: Path, value: int, size: tuple[int, int] = (6, 4), mode: str = "L") -> None:
    from PIL import Image

    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


def test_imagefolder_classes_and_given_splits(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("test", 2)):
        for c, value in (("cat", 40), ("dog", 200)):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                _image(tmp_path / split / c / f"{i}.png", value)
    bundle = sgdata.load(f"imagefolder:{tmp_path}")
    assert bundle.meta.class_names == ["cat", "dog"] and bundle.meta.input_shape == (1, 4, 6)
    assert bundle.test.y.tolist() == [0, 0, 1, 1]
    assert torch.allclose(bundle.test.x[0], torch.full((1, 4, 6), 40 / 255))
    assert len(bundle.train) + len(bundle.val) == 8 and "as given" in bundle.meta.splits


def test_imagefolder_flat_rgb_resized_to_the_first_image(tmp_path: Path) -> None:
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(5):
            _image(tmp_path / c / f"{i}.png", 10 * i, size=(8, 8) if i else (6, 4), mode="RGB")
    bundle = sgdata.load(f"imagefolder:{tmp_path}")
    assert bundle.meta.input_shape == (3, 4, 6)  # RGB, (H, W) of the first image read (6 wide, 4 high)
    assert bundle.meta.splits.startswith("seeded stratified")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folder 'empty' holds no \.png/\.jpg images"):
        sgdata.load(f"imagefolder:{tmp_path}")


def test_dataloaders_become_a_bundle_that_finetuning_trains_on() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    import slimguard as sg

    g = torch.Generator().manual_seed(0)
    x = torch.rand(120, 1, 4, 4, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0.5).long()  # a learnable rule
    train = DataLoader(TensorDataset(x[:90], y[:90]), batch_size=16)
    val = [(x[90:], y[90:])]  # any iterable of (inputs, labels) batches
    bundle = sgdata.bundle_from_batches(train, val)
    assert torch.equal(bundle.train.x, x[:90]) and torch.equal(bundle.val.y, y[90:])
    assert "test is val" in bundle.meta.splits
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    history = sg.finetune(model, bundle, sg.FinetuneConfig(epochs=30, lr=0.05, patience=0), progress=False)
    assert history["epochs"]
    with torch.no_grad():
        assert float((model(x[90:]).argmax(-1) == y[90:]).float().mean()) >= 0.8
    with pytest.raises(DataError, match="batches must be \\(inputs, labels\\) pairs, got Tensor"):
        sgdata.bundle_from_batches([x[:10]])


def test_a_file_slimguard_splits_itself_is_announced(tmp_path) -> None:
    import warnings

    import numpy as np

    from slimguard import data as sgdata

    x = np.random.default_rng(0).random((60, 4), dtype=np.float32)
    y = np.arange(60) % 3
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    with pytest.warns(UserWarning, match="no split of its own"):
        bundle = sgdata.load(f"npz:{tmp_path / 'plain.npz'}")
    assert bundle.meta.splits.startswith("seeded stratified")
    np.savez(tmp_path / "own.npz", x=x, y=y, split=np.array(["train"] * 40 + ["val"] * 10 + ["test"] * 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user's own split: nothing to announce
        own = sgdata.load(f"npz:{tmp_path / 'own.npz'}")
    assert len(own.test) == 10
