"""Data-parallel fine-tuning throughput: examples/s with 1 and with 2 ranks under ``torchrun`` (gloo on CPU;
NCCL with ``--device cuda`` on a machine with at least two GPUs), paired and interleaved.

Two worker groups are started once with ``torchrun`` (``--nproc_per_node 1`` and ``2``), each rank with one
torch thread, and wait for commands; the driver then runs rounds in turn (1 then 2 ranks, then 2 then 1, ...).
In a round each rank fine-tunes ``digits-lenet5`` on ``digits32`` for ``--steps`` optimizer steps of
``--batch-size`` examples per rank through :func:`slimguard.train.finetune` (DDP when distributed; validation
skipped so that only training is timed), between two barriers; rank 0 reports the wall time. Throughput is
``steps x batch x ranks / time``; a round pair gives one scaling ratio (2-rank throughput / 1-rank
throughput, 2.0 is perfect scaling), reported as the median with a seeded 95% bootstrap interval and the spread.
One warm-up round per group is not counted. Idle groups poll a file every 20 ms, so they cost no CPU.

On a 2-core machine two 1-thread ranks use both cores while one rank uses one, so this measures how much of
the second core data parallelism turns into training throughput (gradient all-reduce over gloo, per-step
synchronisation), not multi-machine scaling. Such a machine is usually shared: the load average at the start
is recorded, and under load the scheduler gives two processes a larger share of the CPUs than one, which
favours the 2-rank side.

Run: ``nice python benchmarks/ddp_scaling.py [--rounds 8] [--steps 25] [--device cpu|cuda]``
Writes ``benchmarks/results/ddp_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))
os.environ.setdefault("SLIMGUARD_QUIET", "1")

MODEL, DATA = "digits-lenet5", "digits32"
POLL_S = 0.02
WAIT_S = 600.0


def _wait_for(path: Path, proc: subprocess.Popen | None = None) -> None:
    """Until ``path`` exists (or fail when ``proc`` died or :data:`WAIT_S` passed)."""
    start = time.monotonic()
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the worker group exited with code {proc.returncode} before writing {path.name}")
        if time.monotonic() - start > WAIT_S:
            raise TimeoutError(f"no {path.name} after {WAIT_S:.0f} s")
        time.sleep(POLL_S)


def worker(control: Path, steps: int, batch_size: int, device: str) -> None:
    """One rank of a worker group: fine-tune ``steps`` steps per command file ``go-K``; rank 0 writes
    ``done-K.json`` with the seconds taken. Stops at ``stop``."""
    import torch

    from slimguard import data as sgdata
    from slimguard.models import zoo
    from slimguard.train import FinetuneConfig, finetune
    from slimguard.train import distributed as dd

    torch.set_num_threads(1)
    with dd.process_group():
        world = dd.world_size()
        data = sgdata.load(DATA)
        with dd.main_first():
            model = zoo.load(MODEL, progress=False)
        if device == "cuda":
            model = model.to(dd.device())  # cuda:LOCAL_RANK (NCCL carries its gradients)
        cfg = FinetuneConfig(epochs=1000, max_steps=steps, batch_size=batch_size, patience=0, restore_best=False,
                             lr=1e-4)
        k = 0
        while True:
            go = control / f"go-{world}-{k}"
            while not go.exists() and not (control / "stop").exists():
                time.sleep(POLL_S)
            if not go.exists():
                return
            dd.barrier()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            finetune(model, data, cfg, score_fn=lambda m: 0.0, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
            dd.barrier()
            seconds = time.perf_counter() - start
            if dd.is_main():
                done = control / f"done-{world}-{k}.json"
                tmp = done.with_suffix(".tmp")
                tmp.write_text(json.dumps({"seconds": seconds, "ranks": world}))
                os.replace(tmp, done)
            k += 1


def _start_group(control: Path, ranks: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(Path(__file__).resolve()), "--worker", str(control), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(control / f"stderr-{ranks}.log", "w") as log:  # a file: a pipe nobody reads could fill and block
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)


def _round(control: Path, ranks: int, k: int, proc: subprocess.Popen) -> float:
    (control / f"go-{ranks}-{k}").touch()
    done = control / f"done-{ranks}-{k}.json"
    _wait_for(done, proc)
    return float(json.loads(done.read_text())["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds per group (pairs of rounds)")
    ap.add_argument("--steps", type=int, default=25, help="optimizer steps per round (per rank)")
    ap.add_argument("--batch-size", type=int, default=64, help="examples per step per rank")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap interval")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker, args.steps, args.batch_size, args.device)
        return

    import torch

    from _schema import claim, environment, target, write_results
    from slimguard.models import zoo
    from slimguard.runtime.measure import verdict
    from slimguard.runtime.stats import bootstrap_ci

    if args.device == "cuda" and torch.cuda.device_count() < 2:
        sys.exit(f"--device cuda needs at least 2 GPUs (one per rank); this machine has {torch.cuda.device_count()}")
    zoo.load(MODEL, progress=False)  # trained and cached before the workers read the cache
    env = environment(1, seed=args.seed, ranks=[1, 2], device=args.device)
    seconds: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        control = Path(tmp)
        groups = {n: _start_group(control, n, args) for n in (1, 2)}
        try:
            for n in (1, 2):  # warm-up, not counted (also waits until each group is up)
                _round(control, n, 0, groups[n])
            for r in range(args.rounds):
                for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                    seconds[n].append(_round(control, n, r + 1, groups[n]))
                    print(f"round {r + 1}/{args.rounds}, {n} rank(s): {seconds[n][-1]:.2f} s", flush=True)
        finally:
            (control / "stop").touch()
            for proc in groups.values():
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        failed = {n: p.returncode for n, p in groups.items() if p.returncode}
        if failed:
            log = (control / f"stderr-{min(failed)}.log").read_text()[-2000:]
            raise RuntimeError(f"worker groups failed: {failed}: {log}")

    per_round = {n: [args.steps * args.batch_size * n / s for s in seconds[n]] for n in (1, 2)}
    ratios = [b / a for a, b in zip(per_round[1], per_round[2], strict=True)]
    ratio = statistics.median(ratios)
    ci = bootstrap_ci(ratios, seed=args.seed)
    cases = [{"ranks": n, "device": args.device, "threads_per_rank": 1, "batch_per_rank": args.batch_size,
              "steps": args.steps, "examples_per_s_median": round(statistics.median(per_round[n]), 1),
              "examples_per_s_per_round": [round(v, 1) for v in per_round[n]],
              "seconds_per_round": [round(v, 3) for v in seconds[n]]} for n in (1, 2)]
    scaling = {"ratio_2_over_1": round(ratio, 3), "ci95": [round(ci[0], 3), round(ci[1], 3)],
               "spread": [round(min(ratios), 3), round(max(ratios), 3)], "per_round": [round(v, 3) for v in ratios],
               "verdict": verdict(ratio, ci), "efficiency": round(ratio / 2, 3)}
    targets = [target("2 ranks train faster than 1 (lower CI bound of the throughput ratio > 1)", "> 1.0x",
                      f"{ratio:.2f}x [{ci[0]:.2f}, {ci[1]:.2f}]", ci[0] > 1.0, n=len(ratios))]
    summary = [claim(f"fine-tuning throughput, 2 ranks / 1 rank ({args.device}, {MODEL}, batch {args.batch_size} "
                     "per rank, 1 thread per rank)", ratio, unit="x", ci95=ci, n=len(ratios))]
    protocol = (f"{args.rounds} interleaved round pairs (order alternating) of {args.steps} fine-tuning steps per rank "
                f"through slimguard.train.finetune under torchrun (gloo on CPU, NCCL on CUDA), 1 torch thread per "
                f"rank; one warm-up round per group; ratio = 2-rank examples/s over 1-rank examples/s per pair, "
                f"median with a seeded 95% bootstrap interval. On a machine loaded by other jobs (see "
                f"env.loadavg_1m_at_start) the scheduler gives 2 processes a larger share of the CPUs than 1, "
                f"which favours the 2-rank side.")
    path = write_results("ddp_scaling", env=env, cases=cases, targets=targets, summary=summary, protocol=protocol,
                         scaling=scaling)
    print(f"\n| ranks | examples/s (median of {args.rounds}) | per-round range |")
    print("|---|---|---|")
    for c in cases:
        v = c["examples_per_s_per_round"]
        print(f"| {c['ranks']} | {c['examples_per_s_median']:.0f} | {min(v):.0f}-{max(v):.0f} |")
    print(f"\n2 ranks / 1 rank: {ratio:.2f}x, 95% CI [{ci[0]:.2f}, {ci[1]:.2f}], spread {min(ratios):.2f}-"
          f"{max(ratios):.2f} ({scaling['verdict']}); load average at start {env['loadavg_1m_at_start']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
