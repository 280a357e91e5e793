"""``torchrun -m slimguard compress`` on 2 CPU ranks (gloo): one recipe with fine-tuning, channel pruning
(taylor importance: gradient sums reduced across ranks) and static int8 (percentile observers reduced
across ranks).

Checked: the ranks end with identical models; only rank 0 writes into the output folder (every file opened
for writing is recorded per rank by an audit hook loaded through ``sitecustomize``); ``metrics.json`` has the
``distributed`` block; the 2-rank artifact agrees with a 1-rank run of the same recipe (same pruned shapes,
accuracy within 3 points, activation scales within 25%); a failure on every rank, or on one rank only, exits
non-zero with exactly one ``error:`` line from the ranks and no traceback from slimguard. (The launcher
itself prints its own ``ChildFailedError`` summary, with its own traceback, after that line.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

RECIPE = {"name": "ddp", "model": "zoo:digits-mlp", "data": "digits", "task": "classification", "seed": 0,
          "budget": {"max_accuracy_drop": 5.0},
          "steps": [{"channel": {"ratio": 0.25, "importance": "taylor"}},
                    {"finetune": {"epochs": 2, "lr": 0.001, "patience": 0}},
                    {"int8-static": {"calibration": "percentile"}}]}

# Loaded by every rank's interpreter (through PYTHONPATH): records each file it opens for writing or renames
# under SG_WATCH into SG_WRITES.<RANK>; on rank SG_DENY_RANK, opening SG_DENY_PATH fails (a file that one
# machine cannot read).
SITECUSTOMIZE = '''
import os, sys
_watch, _log = os.environ.get("SG_WATCH"), os.environ.get("SG_WRITES")
_deny, _deny_rank, _rank = os.environ.get("SG_DENY_PATH"), os.environ.get("SG_DENY_RANK"), os.environ.get("RANK", "")
_fd = os.open(f"{_log}.{_rank}", os.O_WRONLY | os.O_CREAT | os.O_APPEND) if _log and _rank else None
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, os.PathLike)):
        path = os.fspath(args[0])
        if _deny and _rank == _deny_rank and path == _deny:
            raise PermissionError(f"rank {_rank} may not read {path}")
        mode, flags = args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE)
        if writing and _fd is not None and _watch and path.startswith(_watch):
            os.write(_fd, (path + "\\n").encode())
    elif event == "os.rename" and _fd is not None and _watch and os.fspath(args[1]).startswith(_watch):
        os.write(_fd, (os.fspath(args[1]) + "\\n").encode())


sys.addaudithook(_hook)
'''


def _torchrun(tmp: Path, recipe: dict, out: Path, extra_env: dict[str, str] | None = None,
              args: tuple[str, ...] = ("--json",)) -> subprocess.CompletedProcess:
    import yaml

    hook_dir = tmp / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = tmp / f"recipe-{len(list(tmp.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIMGUARD_QUIET": "0",
           "PYTHONPATH": os.pathsep.join([str(hook_dir), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "SG_WATCH": str(out), "SG_WRITES": str(tmp / f"writes-{out.name}"), **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "slimguard", "compress", "--recipe", str(path), "--out", str(out), "--threads", "1", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def _writes(tmp: Path, out: Path, rank: int) -> list[str]:
    log = tmp / f"writes-{out.name}.{rank}"
    return log.read_text().split() if log.exists() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The recipe on 2 ranks under torchrun, and on 1 process in-process."""
    from slimguard.core.recipe import parse
    from slimguard.models import zoo
    from slimguard.pipeline import compress

    zoo.load("digits-mlp", progress=False)  # trained and cached once (SLIMGUARD_CACHE), before the ranks read it
    tmp = tmp_path_factory.mktemp("ddp")
    two = _torchrun(tmp, RECIPE, tmp / "out2")
    one = compress(parse(RECIPE), tmp / "out1", progress=False, threads=1)
    return tmp, two, one


def test_two_ranks_end_identical_and_rank0_alone_writes(runs):
    tmp, two, _ = runs
    assert two.returncode == 0, two.stderr[-3000:]
    printed = json.loads(two.stdout)  # exactly one JSON document: rank 1 printed nothing
    saved = json.loads((tmp / "out2" / "metrics.json").read_text())
    assert printed == saved
    assert saved["distributed"]["world_size"] == 2 and saved["distributed"]["backend"] == "gloo"
    hashes = saved["distributed"]["rank_model_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]  # the ranks' models are bit-identical
    assert sorted(p.name for p in (tmp / "out2").iterdir()) == ["metrics.json", "model.slim", "report.html"]
    rank0, rank1 = _writes(tmp, tmp / "out2", 0), _writes(tmp, tmp / "out2", 1)
    assert rank1 == [], rank1  # rank 1 never opened a file in the output folder for writing
    written = {Path(p).name for p in rank0}
    assert {"model.slim", "metrics.json", "report.html"} <= written, written


def test_two_rank_artifact_agrees_with_one_rank(runs):
    """Same pruned shapes (channel choices from reduced taylor scores), accuracy within 3 points (2 ranks
    train with twice the global batch and half the steps), activation scales within 25% (histograms merged
    across ranks instead of streamed in one order)."""
    from slimguard.artifact import load

    tmp, two, one = runs
    assert two.returncode == 0, two.stderr[-3000:]
    saved = json.loads((tmp / "out2" / "metrics.json").read_text())
    assert saved["distributed"] == {**saved["distributed"], "world_size": 2}
    assert one["distributed"]["world_size"] == 1 and one["distributed"]["backend"] is None
    shapes = {r["tensor"]: r["shape"] for r in saved["layers"]["tensors"]}
    assert shapes == {r["tensor"]: r["shape"] for r in one["layers"]["tensors"]}
    assert saved["steps"][0]["result"]["groups"] == one["steps"][0]["result"]["groups"]
    assert abs(saved["compressed"]["accuracy"] - one["compressed"]["accuracy"]) <= 0.03
    assert saved["baseline"]["accuracy"] == one["baseline"]["accuracy"]  # rank 0 scored the same model
    a, b = load(tmp / "out2" / "model.slim").state_dict(), load(tmp / "out1" / "model.slim").state_dict()
    scales = [k for k in a if k.endswith("input_scale") or k.endswith("output_scale")]
    assert scales
    for k in scales:
        assert ((a[k] - b[k]).abs() <= 0.25 * b[k].abs()).all(), (k, a[k], b[k])


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines the ranks printed; fails on any traceback frame inside slimguard."""
    import slimguard

    assert f'File "{Path(slimguard.__file__).parent}' not in proc.stderr, proc.stderr[-3000:]
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error:")]


def test_same_failure_on_every_rank_is_one_line(tmp_path):
    tmp = tmp_path
    out = tmp / "out-bad"
    proc = _torchrun(tmp, {**RECIPE, "data": f"npz:{tmp / 'missing.npz'}"}, out)
    assert proc.returncode != 0
    lines = _error_lines(proc)
    assert len(lines) == 1 and "missing.npz" in lines[0] and "check the path" in lines[0], proc.stderr[-3000:]
    assert not out.exists() or not any(out.iterdir())


def test_failure_on_one_rank_stops_all_with_one_line(tmp_path):
    import numpy as np

    from slimguard import data as sgdata

    tmp = tmp_path
    digits = sgdata.load("digits")
    npz = tmp / "digits.npz"
    np.savez(npz, x=digits.train.x.numpy(), y=digits.train.y.numpy())
    out = tmp / "out-rank1"
    proc = _torchrun(tmp, {**RECIPE, "data": f"npz:{npz}"}, out, {"SG_DENY_PATH": str(npz), "SG_DENY_RANK": "1"})
    assert proc.returncode != 0
    lines = _error_lines(proc)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: rank 1 of 2 failed: PermissionError: rank 1 may not read"), lines
    assert not (out / "model.slim").exists() and not (out / "metrics.json").exists()


# ---- the helpers underneath, on 2 ranks started by torch.multiprocessing (faster than torchrun) ----------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model():
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))


def _observed_values():
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(96, 6, generator=g) * torch.linspace(0.5, 3.0, 6)


def _observers(batches):
    import torch.nn as nn

    from slimguard.quantize.observers import MinMaxObserver, MovingAverageObserver, PercentileObserver

    holder = nn.Module()
    holder.mm, holder.ma, holder.pc = MinMaxObserver(axis=1), MovingAverageObserver(), PercentileObserver()
    for b in batches:
        holder.mm(b), holder.ma(b), holder.pc(b)
    return holder


def _observer_state(h) -> dict:
    return {"mm": [h.mm.lo.tolist(), h.mm.hi.tolist(), h.mm.count], "ma": [float(h.ma.lo), float(h.ma.hi)],
            "pc_range": [h.pc.lo, h.pc.hi], "pc_total": float(h.pc.hist.sum()), "pc_count": h.pc.count,
            "pc_clip": [float(v) for v in h.pc.value_range()]}


def _helpers_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch

    from slimguard import data as sgdata
    from slimguard.prune.importance import TaylorImportance
    from slimguard.prune.sensitivity import sensitivity
    from slimguard.quantize.observers import reduce_observers_
    from slimguard.train import distributed as dd

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with dd.process_group() as backend:
        x = _observed_values()
        holder = _observers(x[dd.shard_range(len(x))].split(8))
        reduced = reduce_observers_(holder)
        model = _tiny_model()
        data = sgdata.load("digits")
        sens = sensitivity(model, data, sparsities=(0.5, 0.9), max_examples=200, progress=False)
        imp = TaylorImportance(max_batches=4)
        imp.prepare(model, data.train.batches(32))
        taylor = [imp.stats[id(p)].tolist() for p in model.parameters()]
        out = {"backend": backend, "reduced": reduced, "observers": _observer_state(holder), "sensitivity": sens,
               "taylor": taylor, "first_failure": dd.claim_failure(), "json": dd.broadcast_json(
                   {"from": rank} if rank == 0 else None)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


def test_reductions_match_one_process(tmp_path):
    """Observers (minmax: exact; percentile histogram: same range and counts, clip within 2%), sensitivity
    (exact: each trial scored by one rank) and taylor gradient sums (float tolerance) reduced over 2 ranks
    equal one process on all the data; both ranks end with the same values."""
    import torch
    import torch.multiprocessing as mp

    from slimguard import data as sgdata
    from slimguard.prune.importance import TaylorImportance
    from slimguard.prune.sensitivity import sensitivity

    mp.spawn(_helpers_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["backend"] == "gloo" and r0["reduced"] == 3
    assert r0["observers"] == r1["observers"] and r0["sensitivity"] == r1["sensitivity"]
    assert [r0["first_failure"], r1["first_failure"]].count(True) == 1  # exactly one rank reports a failure
    assert r0["json"] == r1["json"] == {"from": 0}

    one = _observer_state(_observers(_observed_values().split(8)))
    got = r0["observers"]
    assert got["mm"] == one["mm"]  # per-channel min / max: exact, batches counted over both ranks
    assert got["pc_range"] == one["pc_range"] and got["pc_total"] == one["pc_total"] == 96 * 6
    assert got["pc_count"] == one["pc_count"]
    width = one["pc_range"][1] - one["pc_range"][0]
    for a, b in zip(got["pc_clip"], one["pc_clip"], strict=True):
        assert abs(a - b) <= 0.02 * width, (got["pc_clip"], one["pc_clip"])
    assert got["ma"] != [0.0, 0.0]

    data = sgdata.load("digits")
    model = _tiny_model()
    assert r0["sensitivity"] == sensitivity(model, data, sparsities=(0.5, 0.9), max_examples=200, progress=False)
    imp = TaylorImportance(max_batches=4)
    imp.prepare(model, data.train.batches(32))
    for got_t, p in zip(r0["taylor"], model.parameters(), strict=True):
        torch.testing.assert_close(torch.tensor(got_t), imp.stats[id(p)], rtol=1e-4, atol=1e-6)


def test_launch_env_and_shards(monkeypatch):
    import torch

    from slimguard.core.errors import ConfigError
    from slimguard.train import distributed as dd

    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1"}
    assert dd.launch_env(env) == dd.LaunchEnv(1, 2, 1, "10.0.0.1")
    assert dd.launch_env({**env, "MASTER_ADDR": ""}) is None  # not launched by torchrun
    for bad, message in ((("RANK", "x"), "RANK='x' is not an integer"), (("RANK", "2"), "do not fit WORLD_SIZE=2")):
        with pytest.raises(ConfigError, match=message):
            dd.launch_env({**env, bad[0]: bad[1]})
    assert dd.world_size() == 1 and dd.is_main() and dd.info() == {"world_size": 1, "backend": None}
    t = torch.tensor([1.0, 5.0])
    assert dd.all_reduce_(t, "max") is t and t.tolist() == [1.0, 5.0]  # one process: unchanged

    monkeypatch.setattr(dd, "world_size", lambda: 2)
    shards = []
    for r in (0, 1):
        monkeypatch.setattr(dd, "rank", lambda r=r: r)
        shards.append(dd.shard_indices(torch.arange(5)).tolist())
    assert shards == [[0, 2, 4], [1, 3, 0]]  # padded by wrapping: both ranks take the same number of steps
    monkeypatch.setattr(dd, "rank", lambda: 1)
    assert dd.shard_range(5).tolist() == [1, 3]  # calibration: an exact partition, nothing seen twice
