"""The training loop under DistributedDataParallel (2 CPU ranks, gloo): ranks end identical, masks hold."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    from safetensors.torch import save_file

    from slimguard import data as sgdata
    from slimguard.models import zoo
    from slimguard.prune.magnitude import MagnitudePruningConfig
    from slimguard.train.loop import FinetuneConfig, finetune
    from slimguard.transforms import prune_

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = zoo.create("digits-mlp", seed=0)
        prune_(model, MagnitudePruningConfig(sparsity=0.5))
        finetune(model, sgdata.load("digits"), FinetuneConfig(epochs=1, lr=2e-3), progress=False)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


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
