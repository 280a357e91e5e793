"""Built-in data sets and file loaders: shapes, seeded splits, metadata, and validation of bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimguard import data as sgdata
from slimguard.core.errors import DataError


@pytest.mark.parametrize(
    ("name", "shape", "classes", "total"),
    [("digits", (1, 8, 8), 10, 1797), ("digits32", (1, 32, 32), 10, 1797), ("breast-cancer", (30,), 2, 569),
     ("wine", (13,), 3, 178)],
)
def test_builtin_sets(name, shape, classes, total):
    b = sgdata.load(name)
    assert b.meta.input_shape == shape
    assert b.meta.num_classes == classes
    assert len(b.train) + len(b.val) + len(b.test) == total
    assert b.train.x.shape[1:] == shape and b.train.x.dtype == torch.float32
    assert set(b.test.y.unique().tolist()) == set(range(classes))  # stratified: every class in test
    assert len(b.calib) == min(256, len(b.train))
    lo, hi = b.meta.bounds()
    assert bool((b.train.x >= lo).all()) and bool((b.train.x <= hi).all())


def test_splits_are_disjoint_seeded_and_reproducible():
    a, b, c = sgdata.load("digits", seed=0), sgdata.load("digits", seed=0), sgdata.load("digits", seed=1)
    assert torch.equal(a.train.x, b.train.x)
    assert not torch.equal(a.train.x, c.train.x)
    rows = {tuple(r.flatten().tolist()) for r in a.test.x}
    assert not any(tuple(r.flatten().tolist()) in rows for r in a.train.x[:200]) or len(rows) < len(a.test)


def test_calibration_subset_comes_from_train():
    b = sgdata.load("digits")
    train_rows = {tuple(r.flatten().tolist()) for r in b.train.x}
    assert all(tuple(r.flatten().tolist()) in train_rows for r in b.calib.x)


def test_normalisation_recorded_from_train():
    b = sgdata.load("breast-cancer")
    assert np.allclose(b.meta.mean, b.train.x.mean(0).tolist(), rtol=1e-5)
    assert len(b.meta.std) == 30


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=60)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    b = sgdata.load(f"npz:{tmp_path / 'd.npz'}")
    assert b.meta.input_shape == (5,) and b.meta.kind == "tabular"
    assert len(b.train) + len(b.val) + len(b.test) == 60


def test_csv_loader(tmp_path):
    p = tmp_path / "d.csv"
    rows = ["a,b,target"] + [f"{i},{i * 2},{i % 2}" for i in range(30)]
    p.write_text("\n".join(rows))
    b = sgdata.load(f"csv:{p}", label="target")
    assert b.meta.input_shape == (2,) and b.meta.num_classes == 2


def _npz(tmp_path, **arrays):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    return f"npz:{p}"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: "digitz", "unknown data set 'digitz'; built-in: "),
        (lambda t: f"npz:{t / 'missing.npz'}", "npz file not found"),
        (lambda t: _npz(t, x=np.full((20, 3), np.nan), y=np.zeros(20, int)), "NaN or infinite"),
        (lambda t: _npz(t, x=np.zeros((20, 3)), y=np.zeros(19, int)), "x has 20 rows but y has 19"),
        (lambda t: _npz(t, x=np.zeros((20, 3)), y=-np.ones(20, int)), "smallest is -1"),
        (lambda t: _npz(t, x=np.zeros((20, 3)), y=np.full(20, 0.5)), "labels y must be integers"),
        (lambda t: _npz(t, a=np.zeros(3)), "needs arrays named 'x' and 'y'"),
    ],
)
def test_bad_data_is_one_line_error(tmp_path, make, message):
    with pytest.raises(DataError) as err:
        sgdata.load(make(tmp_path))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_csv_without_label_column(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no label column 'label'; columns: a, b"):
        sgdata.load(f"csv:{p}")


def test_docs_text_is_real_text_and_split():
    b = sgdata.load("docs-text")
    assert b.task == "embedding"
    assert len(b.test) > 500 and len(b.train) > 1000
    assert not set(b.train.x) & set(b.test.x)
    assert all(len(t.split()) >= 6 for t in b.test.x[:100])
