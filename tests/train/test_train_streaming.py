"""Training streams a user's DataLoader epoch by epoch instead of gathering it in memory.

Checked: a map-style dataset is read one batch per step and re-read every epoch; a generator-backed
IterableDataset is consumed lazily (each batch is produced only after the previous step); a streamed
DataLoader giving the same batches as an in-memory bundle trains to the same weights; one-shot iterators
are refused for several epochs with one line; under torchrun a loader without DistributedSampler is
sharded by batches, one with it is used as it is.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from slimguard import data as sgdata
from slimguard.core.errors import DataError, UserError
from slimguard.train import distributed
from slimguard.train.batches import StreamBatches
from slimguard.train.loop import Callback, FinetuneConfig, finetune


def _problem(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


class Counting(Dataset):
    """A map-style dataset that counts its ``__getitem__`` calls."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.calls = x, y, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.x[i], self.y[i]


class Steps(Callback):
    """Records a value (read by ``probe``) after every optimizer step."""

    def __init__(self, probe=lambda: None) -> None:
        self.probe, self.seen, self.steps = probe, [], 0

    def on_step_end(self, model, step, total):
        self.steps = step
        self.seen.append(self.probe())


def test_a_dataloader_is_read_one_batch_per_step_and_reread_each_epoch():
    x, y = _problem()
    ds = Counting(x, y)
    rec = Steps(lambda: ds.calls)
    history = finetune(nn.Linear(6, 2), DataLoader(ds, batch_size=16), FinetuneConfig(epochs=2), callbacks=[rec],
                       progress=False)
    assert history["steps"] == 12
    # after step k exactly 16 k examples were read: never the whole data set ahead of training
    assert rec.seen == [16 * k for k in range(1, 13)]
    assert history["epochs"][0]["val_score"] is None and history["best_epoch"] == -1  # no val given


class LazyStream(IterableDataset):
    """A generator-backed stream that fails if an example is produced before the steps that should come
    first: with batches of ``batch`` examples, example ``i`` may only be made after ``i // batch`` steps."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, steps: Steps) -> None:
        self.x, self.y, self.batch, self.steps = x, y, batch, steps
        self.produced = 0

    def __len__(self) -> int:
        return len(self.x)

    def __iter__(self):
        def gen():
            base = self.steps.steps
            for i in range(len(self.x)):
                assert self.steps.steps - base == i // self.batch, "the stream was read ahead of training"
                self.produced += 1
                yield self.x[i], self.y[i]

        return gen()


def test_an_iterable_dataset_is_consumed_lazily():
    x, y = _problem(80)
    rec = Steps()
    stream = LazyStream(x, y, 16, rec)
    history = finetune(nn.Linear(6, 2), DataLoader(stream, batch_size=16), FinetuneConfig(epochs=3),
                       callbacks=[rec], progress=False)
    assert history["steps"] == 15 and stream.produced == 3 * 80


class Permutations(Sampler):
    """Each epoch ``torch.randperm`` from one generator seeded with ``seed``: the in-memory loop's order.
    (``RandomSampler`` draws one extra permutation per epoch, so its later epochs differ.)"""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def test_streaming_matches_the_in_memory_path():
    """The same examples in the same order give the same weights and scores, bit for bit (tolerance 0: the
    same float operations in the same order; only the batches' assembly differs, collated vs indexed)."""
    x, y = _problem(120)
    xv, yv = _problem(40, seed=1)
    cfg = FinetuneConfig(epochs=3, batch_size=16, lr=0.05, seed=5, patience=0)
    bundle = sgdata.bundle_from_batches([(x, y)], [(xv, yv)], kind="tabular")
    assert torch.equal(bundle.train.x, x) and torch.equal(bundle.val.x, xv)
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    b = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    b.load_state_dict(a.state_dict())
    ha = finetune(a, bundle, cfg, progress=False)
    train = TensorDataset(x, y)
    loader = DataLoader(train, batch_size=16, sampler=Permutations(len(train), cfg.seed))
    hb = finetune(b, (loader, DataLoader(TensorDataset(xv, yv), batch_size=7)), cfg, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name  # atol 0
    assert [e["val_score"] for e in ha["epochs"]] == pytest.approx([e["val_score"] for e in hb["epochs"]], abs=1e-9)
    assert [e["train_loss"] for e in ha["epochs"]] == pytest.approx([e["train_loss"] for e in hb["epochs"]], abs=1e-6)
    assert ha["epochs"][-1]["val_score"] > 0.8  # it learned something: the comparison is not between no-ops


def test_float_labels_are_scored_by_loss():
    x, _ = _problem(64)
    target = x[:, :1] * 2.0
    loader = DataLoader(TensorDataset(x, target), batch_size=16)
    history = finetune(nn.Linear(6, 1), (loader, loader), FinetuneConfig(epochs=2, lr=0.05),
                       loss_fn=lambda m, xb, yb: nn.functional.mse_loss(m(xb), yb), progress=False)
    scores = [e["val_score"] for e in history["epochs"]]
    assert all(s < 0 for s in scores) and scores[1] > scores[0]  # minus the mean validation loss, improving


def test_a_generator_trains_one_epoch_and_is_refused_for_more():
    x, y = _problem(64)

    def batches():
        for i in range(0, 64, 16):
            yield x[i : i + 16], y[i : i + 16]

    assert finetune(nn.Linear(6, 2), batches(), FinetuneConfig(epochs=1), progress=False)["steps"] == 4
    with pytest.raises(DataError, match=r"^train: a one-shot iterator \(generator\) cannot be read again for each "
                                        r"of 2 epochs; pass a re-iterable \(a DataLoader or a list of batches\), "
                                        r"or set epochs: 1$") as info:
        finetune(nn.Linear(6, 2), batches(), FinetuneConfig(epochs=2), progress=False)
    assert isinstance(info.value, UserError)
    with pytest.raises(DataError, match=r"^val: a one-shot iterator"):
        finetune(nn.Linear(6, 2), ([(x, y)], batches()), FinetuneConfig(epochs=2), progress=False)


def test_bad_batches_and_empty_data_are_one_line_errors():
    with pytest.raises(DataError, match=r"^train: batches must be \(inputs, labels\) pairs, got Tensor"):
        finetune(nn.Linear(6, 2), [torch.randn(4, 6)], FinetuneConfig(epochs=1), progress=False)
    with pytest.raises(DataError, match=r"^the train data gave no batches to rank 0 of 1"):
        finetune(nn.Linear(6, 2), [], FinetuneConfig(epochs=1), progress=False)


class Unsized:
    """Re-iterable, without a length."""

    def __init__(self, batches: list) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_an_unsized_iterable_is_counted_once_for_the_schedule():
    x, y = _problem(64)
    data = Unsized([(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)])
    lrs = []

    class LR(Callback):
        def on_train_begin(self, model, total_steps):
            lrs.append(total_steps)

    finetune(nn.Linear(6, 2), data, FinetuneConfig(epochs=2), callbacks=[LR()], progress=False)
    assert lrs == [8] and data.passes == 3  # one counting pass, then one pass per epoch


def _fake_ranks(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)


@pytest.mark.parametrize(("rank", "expected"), [(0, [0, 2]), (1, [1, 3])])
def test_under_torchrun_a_loader_without_distributed_sampler_is_sharded_by_batch(monkeypatch, rank, expected):
    _fake_ranks(monkeypatch, rank, 2)
    loader = DataLoader(TensorDataset(torch.arange(10.0), torch.arange(10)), batch_size=2)  # 5 batches
    source = StreamBatches(loader, "train")
    assert source.steps_per_epoch() == 2  # the 5th batch (a round short of 2) is dropped on both ranks
    got = [int(yb[0]) // 2 for _, yb, _ in source.epoch(0)]
    assert got == expected


def test_under_torchrun_a_distributed_sampler_is_used_as_it_is(monkeypatch):
    _fake_ranks(monkeypatch, 1, 2)
    ds = TensorDataset(torch.arange(10.0), torch.arange(10))
    sampler = DistributedSampler(ds, num_replicas=2, rank=1, shuffle=True, seed=0)
    source = StreamBatches(DataLoader(ds, batch_size=2, sampler=sampler), "train")
    assert source.steps_per_epoch() == 3
    seen = [yb.tolist() for _, yb, _ in source.epoch(4)]
    assert sampler.epoch == 4 and sum(len(s) for s in seen) == 5  # this rank's half, reshuffled for epoch 4
    wrong = DistributedSampler(ds, num_replicas=4, rank=0)
    with pytest.raises(DataError, match=r"^train: the DataLoader's DistributedSampler has num_replicas=4 but this "
                                        r"run has 2 rank\(s\); build the sampler inside the run"):
        StreamBatches(DataLoader(ds, sampler=wrong), "train")
