"""The training loop under DistributedDataParallel (2 CPU ranks, gloo): ranks end identical, masks hold."""

from __future__ import annotations

import contextlib
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group(rank: int, world: int, port: int):
    """The process group as ``torchrun`` would set it up, through slimguard's own set-up and teardown (every
    rank waits for the others before any destroys its end: gloo aborts a process whose peer tears down early)."""
    import os

    from slimguard.train import distributed as dd

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    return dd.process_group()


def _gloo_threads() -> list[str]:
    """The names of this process's gloo threads (Linux names its threads in /proc; elsewhere: none seen)."""
    import os

    task = "/proc/self/task"
    if not os.path.isdir(task):
        return []
    names = []
    for tid in os.listdir(task):
        with contextlib.suppress(OSError), open(f"{task}/{tid}/comm") as f:
            names.append(f.read().strip())
    return [n for n in names if "gloo" in n]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from safetensors.torch import save_file

    from slimguard import data as sgdata
    from slimguard.models import zoo
    from slimguard.prune.magnitude import MagnitudePruningConfig
    from slimguard.train.loop import FinetuneConfig, finetune
    from slimguard.transforms import prune_

    torch.set_num_threads(1)
    with _group(rank, world, port):
        model = zoo.create("digits-mlp", seed=0)
        prune_(model, MagnitudePruningConfig(sparsity=0.5))
        finetune(model, sgdata.load("digits"), FinetuneConfig(epochs=1, lr=2e-3), progress=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out_dir}/rank{rank}.safetensors")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_ranks_stay_identical_and_masked(tmp_path):
    from safetensors.torch import load_file

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    zeros = sum(int((a[f"{i}.weight"] == 0).sum()) for i in (2, 4, 6))
    total = sum(a[f"{i}.weight"].numel() for i in (2, 4, 6))
    assert zeros >= 0.5 * total - 1  # masks were re-applied after every step on every rank


def _stream_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import json

    from safetensors.torch import save_file
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from slimguard.train.loop import FinetuneConfig, finetune

    torch.set_num_threads(1)
    with _group(rank, world, port):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(70, 5, generator=g)
        ds = TensorDataset(x, torch.arange(70))  # labels are example ids: the loss records who trained on what
        seen: dict[str, list[int]] = {}
        for kind, loader in (("batches", DataLoader(ds, batch_size=8)),  # 9 batches: rounds of 2, the 9th dropped
                             ("sampler", DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, shuffle=False)))):
            torch.manual_seed(0)
            model = torch.nn.Linear(5, 1)
            ids: list[int] = []

            def loss_fn(m, xb, yb, ids=ids):
                ids.extend(yb.tolist())
                return m(xb).pow(2).mean()

            finetune(model, loader, FinetuneConfig(epochs=1, lr=0.01), loss_fn=loss_fn, progress=False)
            seen[kind] = ids
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      f"{out_dir}/{kind}{rank}.safetensors")
        with open(f"{out_dir}/seen{rank}.json", "w") as f:
            json.dump(seen, f)
    with open(f"{out_dir}/threads{rank}.json", "w") as f:  # after teardown
        json.dump(_gloo_threads(), f)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_streams_a_dataloader_sharded_by_batch_or_by_its_sampler(tmp_path):
    import json

    from safetensors.torch import load_file

    mp.spawn(_stream_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    for kind in ("batches", "sampler"):
        a, b = (load_file(str(tmp_path / f"{kind}{r}.safetensors")) for r in (0, 1))
        assert all(torch.equal(a[k], b[k]) for k in a), kind  # gradients averaged: the ranks agree exactly
    # by batch: rank r takes batches r, r + 2, ...; the 9th batch (ids 64-69), a round short, is dropped
    assert seen[0]["batches"] == [i for b in (0, 2, 4, 6) for i in range(8 * b, 8 * b + 8)]
    assert seen[1]["batches"] == [i for b in (1, 3, 5, 7) for i in range(8 * b, 8 * b + 8)]
    # by DistributedSampler: each rank its own 35 examples, together all 70 once
    assert sorted(seen[0]["sampler"] + seen[1]["sampler"]) == list(range(70))
    # the group's teardown really ended it: no gloo thread lives on into interpreter shutdown, where it
    # can abort a process that finished its work
    assert [json.loads((tmp_path / f"threads{r}.json").read_text()) for r in (0, 1)] == [[], []]
