"""Data-parallel runs under ``torchrun``: the process group, rank helpers, reductions and sharding.

``torchrun --nproc_per_node 2 -m slimguard compress --recipe R --out D`` starts two processes with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR`` / ``MASTER_PORT`` in their environment.
:func:`process_group` turns that into an initialised ``torch.distributed`` process group and tears it down
afterwards: gloo on a machine without CUDA; with CUDA, ``cpu:gloo,cuda:nccl`` (NCCL for tensors on
``cuda:LOCAL_RANK``, this process's device, and gloo for the CPU tensors the pipeline works with). Outside
``torchrun`` it does nothing, and every helper here acts as the single process it is (rank 0 of 1), so
callers never branch on it.

What runs where:

* Training (:func:`slimguard.train.finetune`) moves the model to this rank's :func:`device` (and back
  afterwards), wraps it in ``DistributedDataParallel`` and each rank takes its own shard of every epoch's
  permutation (:func:`shard_indices`), or of a streamed DataLoader (:mod:`slimguard.train.batches`):
  gradients are averaged, so the ranks' models stay identical.
* Calibration, importance and sensitivity shard their batches or trials and reduce what they collected
  (:func:`all_reduce_`: ``min`` / ``max`` for ranges, ``sum`` for histograms and gradient sums), so every rank
  quantizes and prunes identically.
* Rank 0 owns the outputs: it evaluates, writes the artifact, metrics and report, and shows progress
  (:func:`is_main`); the others receive its result (:func:`broadcast_json`).

Example:
    >>> with process_group() as backend:          # None outside torchrun
    ...     finetune(model, data)                  # DDP when initialised
    ...     if is_main():
    ...         save(model, "model.slim")
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn

from slimguard.core.errors import ConfigError

LAUNCH_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
"""Environment variables ``torchrun`` sets in every worker; all four mean "launched data-parallel"."""

TIMEOUT_S = 1800
"""Seconds a collective may wait for the other ranks before failing (torch's own default for gloo)."""

ReduceOp = Literal["sum", "mean", "min", "max"]


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a ``torchrun`` launch (read from the environment by :func:`launch_env`)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """This process's place in a ``torchrun`` launch, or None when not launched by it (a variable missing).

    Raises:
        ConfigError: a variable is not an integer, or ``RANK`` / ``LOCAL_RANK`` is outside ``WORLD_SIZE``.
    """
    env = os.environ if environ is None else environ
    if not all(env.get(k) for k in LAUNCH_KEYS):
        return None
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        try:
            values[key] = int(env[key])
        except ValueError:
            raise ConfigError(f"environment: {key}={env[key]!r} is not an integer; launch with torchrun, which "
                              "sets it") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or not 0 <= local < world:
        raise ConfigError(f"environment: RANK={rank}, LOCAL_RANK={local} do not fit WORLD_SIZE={world}; "
                          "launch with torchrun, which sets them consistently")
    return LaunchEnv(rank, world, local, env["MASTER_ADDR"])


def is_initialized() -> bool:
    """True when a ``torch.distributed`` process group is up (by :func:`setup` or by the caller)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    import torch.distributed as dist

    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 when not distributed)."""
    import torch.distributed as dist

    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the rank that writes outputs and shows progress (and in any undistributed run)."""
    return rank() == 0


def backend() -> str | None:
    """The process group's backend (``"gloo"``, ``"cpu:gloo,cuda:nccl"``, ...), or None when not distributed."""
    import torch.distributed as dist

    return str(dist.get_backend()) if is_initialized() else None


def info() -> dict[str, Any]:
    """``{"world_size": N, "backend": "gloo" | "cpu:gloo,cuda:nccl" | None}``: ``metrics.json``'s ``distributed``."""
    return {"world_size": world_size(), "backend": backend()}


def setup(env: LaunchEnv | None = None) -> str:
    """Initialise the process group of a ``torchrun`` launch; returns its backend.

    When CUDA is available: ``cpu:gloo,cuda:nccl`` with ``cuda:LOCAL_RANK`` as this process's device (NCCL
    carries CUDA tensors, gloo CPU ones: training moves the model to :func:`device` and back, the rest of the
    pipeline works on the CPU); gloo otherwise. The rendezvous address and port come from the environment
    (``MASTER_ADDR``, ``MASTER_PORT``).

    Raises:
        ConfigError: not launched by ``torchrun`` (see :func:`launch_env`), or this machine has fewer GPUs
            than ``LOCAL_RANK`` needs.
    """
    import torch.distributed as dist

    env = env or launch_env()
    if env is None:
        raise ConfigError(f"not launched by torchrun ({', '.join(LAUNCH_KEYS)} unset); start with torchrun "
                          "--nproc_per_node N -m slimguard ...")
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; install a build with it, or run one process")
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    name = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    kwargs: dict[str, Any] = {}
    if cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={env.local_rank} but this machine has {torch.cuda.device_count()} "
                              "GPU(s); start at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(env.local_rank)
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    # torch._dynamo imported after the group is up (DistributedDataParallel imports it) holds a reference to
    # the group that destroy_process_group cannot drop, so gloo's threads would outlive teardown into
    # interpreter shutdown, where they can abort the process ("terminate called without an active
    # exception") after every output was written. Imported first, it holds none.
    importlib.import_module("torch._dynamo")

    dist.init_process_group(name, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S), **kwargs)
    return name


def teardown() -> None:
    """Destroy the process group (nothing when none is up).

    Garbage is collected first: a ``DistributedDataParallel`` wrapper held in a reference cycle (an
    exception's traceback, say) keeps the group, and gloo's threads, alive past ``destroy_process_group``
    (see :func:`setup`)."""
    import gc

    import torch.distributed as dist

    if is_initialized():
        gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group() -> Iterator[str | None]:
    """Set up the process group of a ``torchrun`` launch for the duration of the block; yields the backend,
    or None outside ``torchrun`` (or when a group is already up: the caller's, left as it is)."""
    if is_initialized() or launch_env() is None:
        yield backend()
        return
    name = setup()
    try:
        yield name
        # every rank is done before any rank destroys its end of the group: a rank that tears down while
        # another still talks to it can abort in gloo's destructor ("terminate called ...")
        barrier()
    finally:
        teardown()


def device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when the group has NCCL, the CPU otherwise."""
    if "nccl" in (backend() or ""):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _work_device(t: torch.Tensor) -> torch.device:
    """Where a collective on ``t`` runs: its own device when the backend carries it, else the one it does."""
    name = backend() or ""
    if name == "nccl":
        return device()
    if t.is_cuda and "nccl" not in name:
        return torch.device("cpu")
    return t.device


_OPS = {"sum": "SUM", "mean": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce_(t: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
    """Reduce ``t`` across ranks in place (``sum``, ``mean``, ``min`` or ``max``) and return it; every rank
    ends with the same values. A no-op outside a distributed run. Tensors on another device than the
    backend's travel there and back."""
    if op not in _OPS:
        raise ConfigError(f"op: {op!r} is not allowed; allowed: {', '.join(_OPS)}")
    if not is_initialized() or world_size() == 1:
        return t
    import torch.distributed as dist

    work = t.detach().to(_work_device(t))
    dist.all_reduce(work, op=getattr(dist.ReduceOp, _OPS[op]))
    if op == "mean":
        work = work / world_size() if not work.is_floating_point() else work.div_(world_size())
    if work is not t:
        t.copy_(work)
    return t


def all_reduce_float(value: float, op: ReduceOp = "sum") -> float:
    """A Python number reduced across ranks (float64)."""
    return float(all_reduce_(torch.tensor([value], dtype=torch.float64), op)[0])


def all_reduce_stats_(stats: dict[Any, torch.Tensor], keys: Sequence[tuple[Any, Sequence[int]]],
                      op: ReduceOp = "sum") -> dict[Any, torch.Tensor]:
    """Reduce a dict of statistics across ranks in one collective, key by key in the order of ``keys``
    (``(key, shape)`` pairs that every rank lists the same); a key a rank has not filled counts as zeros
    there. The reduced tensors (summed in float64) are written back into ``stats`` with the device and dtype
    of this rank's own (float32 on the CPU for keys it lacked); returns it."""
    if not is_initialized() or world_size() == 1:
        return stats
    parts = [stats[k].detach().double().cpu().reshape(-1) if k in stats
             else torch.zeros(int(torch.Size(s).numel()), dtype=torch.float64) for k, s in keys]
    flat = all_reduce_(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64), op)
    offset = 0
    for (k, s), part in zip(keys, parts, strict=True):
        value = flat[offset : offset + part.numel()].reshape(tuple(s))
        like = stats.get(k)
        stats[k] = value.to(like.device, like.dtype) if like is not None else value.float()
        offset += part.numel()
    return stats


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s values (in place; a no-op outside a distributed run)."""
    if not is_initialized() or world_size() == 1:
        return t
    import torch.distributed as dist

    work = t.detach().to(_work_device(t))
    dist.broadcast(work, src=src)
    if work is not t:
        t.copy_(work)
    return t


def broadcast_float(value: float, src: int = 0) -> float:
    """Rank ``src``'s number on every rank (float64)."""
    return float(broadcast_(torch.tensor([value], dtype=torch.float64), src)[0])


def broadcast_buffers_(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics, quantization parameters) into every rank's
    ``model``. DistributedDataParallel does so at the start of each forward, but a training forward then
    updates them from the rank's own batch, so after the last step the ranks differ until this is called."""
    for buf in model.buffers():
        broadcast_(buf, src)


def broadcast_json(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s JSON-able ``obj`` on every rank (others pass anything, e.g. None). Sent as JSON text,
    never pickled; values JSON cannot hold arrive as strings."""
    if not is_initialized() or world_size() == 1:
        return obj
    payload = json.dumps(obj, default=str).encode() if rank() == src else b""
    size = broadcast_(torch.tensor([len(payload)], dtype=torch.int64), src)
    buf = torch.zeros(int(size[0]), dtype=torch.uint8)
    if rank() == src:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    broadcast_(buf, src)
    return json.loads(bytes(buf.tolist()).decode()) if rank() != src else obj


def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's ``data`` (all the same length), in rank order; ``[data]`` outside a distributed run."""
    if not is_initialized() or world_size() == 1:
        return [data]
    import torch.distributed as dist

    mine = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(_work_device(mine))
    out = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)
    return [bytes(t.cpu().tolist()) for t in out]


def barrier() -> None:
    """Wait until every rank gets here (nothing outside a distributed run)."""
    if is_initialized() and world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 when not distributed)."""
    if not is_initialized():
        return 0
    env = launch_env()
    return env.local_rank if env is not None else rank()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The first process of each machine (``LOCAL_RANK`` 0) runs the block first, the others after it, so
    that one process per machine fills a local cache (zoo models) that the others then read."""
    first = local_rank() == 0
    if not first:
        barrier()
    yield  # a failure in the block propagates without the barrier: the launcher stops the waiting ranks
    if first:
        barrier()


def shard_indices(indices: torch.Tensor, *, pad: bool = True) -> torch.Tensor:
    """This rank's share of ``indices``: every ``world_size``-th element from position ``rank``.

    With ``pad`` (the default, as ``torch.utils.data.DistributedSampler`` does) the list is first extended by
    repeating its start until its length divides evenly, so every rank gets the same number of examples and
    takes the same number of steps (a rank with one batch more would wait for the others forever). Without
    it the shards partition ``indices`` exactly (some ranks may get one fewer).

    Example:
        >>> shard_indices(torch.arange(5))   # rank 1 of 2
        tensor([1, 3, 0])
    """
    world = world_size()
    if world == 1:
        return indices
    if pad and len(indices) % world:
        extra = world - len(indices) % world
        reps = -(-extra // max(1, len(indices)))
        indices = torch.cat([indices, indices.repeat(reps)[:extra]])
    return indices[rank()::world]


def shard_range(n: int, *, pad: bool = False) -> torch.Tensor:
    """This rank's share of ``range(n)`` (see :func:`shard_indices`); exact partition by default."""
    return shard_indices(torch.arange(n), pad=pad)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper; others unchanged.

    Attacks and other inner loops that differentiate with respect to the inputs only run on the unwrapped
    model: DDP expects every forward with gradients to be followed by a backward into the weights.
    """
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
        return inner
    return model


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of the model's state (names, dtypes, shapes and bytes of every tensor, in order): equal on two
    ranks exactly when they hold the same model."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not torch.is_tensor(t):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def rank_hashes(model: nn.Module) -> list[str]:
    """Every rank's :func:`state_sha256` of ``model``, in rank order (one entry outside a distributed run)."""
    return [b.decode() for b in all_gather_bytes(state_sha256(model).encode())]


FAILURE_KEY = "slimguard/failed-rank"


def claim_failure() -> bool:
    """True for the first rank of this run that calls it, False for later ones, so that a failure shared by
    every rank (a bad data path) is reported once. The ranks agree through the rendezvous store, which
    outlives a failed rank under ``torchrun``; True outside a distributed run, or when the store is gone."""
    if not is_initialized() or world_size() == 1:
        return True
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        got = _get_default_store().compare_set(FAILURE_KEY, "", str(rank()))
        return bytes(got).decode() == str(rank())
    except Exception:  # the store is unreachable (its host died): say it rather than stay silent
        return True
