"""Load test of ``slimguard serve`` against a bare FastAPI endpoint with the same model, in two cases.

**digits (HTTP-bound).** Model: ``digits-lenet5`` pruned to 90% sparsity (magnitude) and saved as a
``.slim`` artifact; the reference for the cascade is the unpruned ``digits-lenet5``. Four servers run on
127.0.0.1 (loaded one at a time), each in its own process, each with its defaults (what a user of either would get):

* ``serve``: ``slimguard serve`` (contract, energy OOD detector, monitor, range restriction, periodic
  checksum scrubs, micro-batching: up to 64 items, no wait: a batch leaves as soon as the model is free;
  torch threads automatic: 1 on 2 cores for this cheap model, see ``ServeConfig.threads``);
* ``serve_nobatch``: the same with ``--max-batch 1`` (guard, no batching), which isolates batching;
* ``serve_w2``: the same with ``--workers 2`` (two processes, each with its own model and batcher);
* ``bare``: a FastAPI ``def`` endpoint that runs the same model on each request (no guard, no batching),
  with torch's default threads (one per core);
* ``bare_t1``: the same bare endpoint with one torch thread, so the comparison with ``serve`` is not only
  the thread setting (on a loaded machine, torch threads beyond the free cores stall each other).

A bounded async httpx client (one connection per concurrent worker, one request = one digit, bodies encoded
once up front) runs each server at concurrency 1, 8, 32 and 64 for a fixed time per cell, in ``--rounds``
interleaved rounds; throughput is responses per second, p50/p99 the per-request latency over all rounds.
Non-200 answers are counted. The server's CPU time per request (user + system over its processes, from
``/proc``) is also reported: on a shared machine it is steadier than throughput, which depends on the CPU
share each process gets.

In-process, with :func:`slimguard.runtime.measure.compare_speed` (paired rounds, median ratio, 95% bootstrap
interval): the guard's cost on a batch of 32 as the service runs it (the contract's value checks over the
batch, then :func:`slimguard.serve.loaded.guarded_batch`: the model with its range restriction, softmax,
energy OOD score, monitor) and as ``Guard.__call__`` runs it (which also re-checks shapes and switches
modules to eval and back on every call), each against the bare model; and the cascade's
accuracy (digits32 test, n=360, Wilson intervals; threshold chosen on validation data) and latency against
each model alone.

Its forward pass costs well under a millisecond per digit while HTTP and JSON cost about a millisecond of
server CPU per request (the bare endpoint: about 3), so batching has little to save there: this case shows
the service's own cost per request (body parsing with orjson, ``POST /v1/predict`` answered past FastAPI's
router and middleware, see :mod:`slimguard.serve.app`).

**minilm (compute-bound).** Model: the MiniLM sentence embedder (``minilm``, all-MiniLM-L6-v2) saved as an
fp32 ``.slim`` artifact; one docs-text test text per request (``{"texts": [TEXT]}``; median 74 characters,
~21 tokens). ``serve`` (``--data docs-text``: OOD score = cosine distance to the nearest of 1024 training
texts, drift monitor on validation texts; micro-batches sorted by length and run in chunks of at most
384 padded tokens; torch threads automatic: 2 on 2 cores, since the model costs ~8 ms per text),
``serve_nobatch`` (``--max-batch 1``), ``serve_w2`` (``--workers 2``), and the bare endpoint (``model(**model.tokenize
(texts))`` per request, as a user would write it) with torch's default threads and with 1 thread. In
process: the guard's cost on a batch of 32 texts (OOD score, flags and monitor against the same forward
pass), the length-chunked forward pass against one padded batch, and the drift monitor's reading on
in-distribution texts (the whole test split) and on random word pieces (drifted).

Targets (BENCHMARKS.md), per case: at concurrency 32, ``serve`` >= 2x the bare endpoint's throughput, and
the guard costs <= 10%. The machine is shared (see ``env.loadavg_1m_at_start``): absolute numbers are noisy.

Run: ``python benchmarks/serve_load.py [--seconds 3] [--rounds 2]`` (about 10 minutes; ``--only minilm``
runs one case and writes nothing). Writes ``benchmarks/results/serve_load.json``. ``--bare-server
ARTIFACT`` is the bare server's own entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("SLIMGUARD_QUIET", "1")
os.environ.setdefault("SLIMGUARD_CACHE", str(ROOT / ".cache" / "zoo"))

CONCURRENCY = (1, 8, 32, 64)
MODEL = "digits-lenet5"
TEXT_DATA = "docs-text"
SPARSITY = 0.9
CASCADE_TOLERANCE = 0.3  # accuracy points the cascade may lose to the reference on validation data
SEED = 0


# ---- the bare server (a subprocess of this script) ----------------------------------------------------------
def bare_server(artifact: str, threads: int = 0) -> None:
    """A FastAPI endpoint as a user would write it: parse, run the model, answer. No guard, no batching.
    ``threads``: torch's intra-op threads (0: torch's default)."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from slimguard.artifact import load
    from slimguard.serve.server import bind

    if threads:
        torch.set_num_threads(threads)
    model = load(artifact).eval()
    app = FastAPI()

    @app.post("/v1/predict")
    def predict(body: dict) -> dict:  # a sync endpoint: FastAPI runs it in its thread pool
        if "texts" in body:  # the embedder: tokenize (padded, truncated at the model's limit), embed
            with torch.no_grad():
                return {"embeddings": model(**model.tokenize(body["texts"])).tolist()}
        x = torch.tensor(body["inputs"], dtype=torch.float32)
        with torch.no_grad():
            probs = torch.softmax(model(x), -1)
        conf, pred = probs.max(-1)
        return {"predictions": pred.tolist(), "confidence": conf.tolist(), "scores": probs.tolist()}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"status": "ready"}

    sock = bind("127.0.0.1", 0)
    print(f"serving on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, access_log=False, log_level="warning")).run(sockets=[sock])


# ---- server processes ------------------------------------------------------------------------------------
class Proc:
    def __init__(self, cmd: list[str]) -> None:
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        got: list[str] = []
        t = threading.Thread(target=lambda: got.append(self.p.stdout.readline() if self.p.stdout else ""),
                             daemon=True)
        t.start()
        t.join(180)
        if not got or not got[0].startswith("serving on "):
            self.p.kill()
            raise SystemExit(f"server did not start: {cmd}")
        self.url = got[0].split()[-1]

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used (its threads and, with ``--workers``, its worker
        processes), from /proc."""
        return sum(_cpu_s(pid) for pid in _tree(self.p.pid))

    def torch_threads(self) -> int | None:
        """The torch threads the service reports in ``GET /v1/status`` (None for the bare servers)."""
        import httpx

        r = httpx.get(f"{self.url}/v1/status", timeout=30, trust_env=False)
        return r.json()["worker"]["torch_threads"] if r.status_code == 200 else None

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in task.read_text().split())
            except OSError:
                pass
    return out


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(kind: str, artifact: Path, serve_args: tuple[str, ...] = ()) -> Proc:
    if kind.startswith("bare"):
        threads = ["--bare-threads", "1"] if kind == "bare_t1" else []
        return Proc([sys.executable, __file__, "--bare-server", str(artifact), *threads])
    extra = {"serve_nobatch": ["--max-batch", "1"], "serve_w2": ["--max-batch", "64", "--workers", "2"]}.get(
        kind, ["--max-batch", "64"])
    return Proc([sys.executable, "-c", "from slimguard.cli import main; main()", "serve", str(artifact),
                 "--port", "0", "--max-concurrency", "256", "--scrub-interval-s", "5", *extra, *serve_args])


# ---- the load client ---------------------------------------------------------------------------------------
async def _load(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    import httpx

    def client() -> httpx.AsyncClient:
        # one connection per client, one client per worker: httpcore's pool does work in proportion to the
        # requests it holds on every request, so one shared pool of 32 connections cost the client 3.9 ms of
        # CPU per request against a server that answers a constant (0.9 ms with one pool per worker), and on
        # this shared machine the client, not the server, set the throughput. TCP_NODELAY as on the servers
        # (see slimguard.serve.server.bind): no request or response waits on Nagle's algorithm.
        transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                                             socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        return httpx.AsyncClient(base_url=url, transport=transport, timeout=30, trust_env=False)

    latencies: list[float] = []
    errors = 0
    headers = {"content-type": "application/json"}
    clients = [client() for _ in range(concurrency)]
    try:
        for k, c in enumerate(clients):  # warm the connections
            await c.post("/v1/predict", content=bodies[k % len(bodies)], headers=headers)
        end = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            nonlocal errors
            i, c = k, clients[k]
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                r = await c.post("/v1/predict", content=bodies[i % len(bodies)], headers=headers)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    finally:
        for c in clients:
            await c.aclose()
    return {"ok": len(latencies), "errors": errors, "wall_s": wall, "latencies": latencies}


def _batches(url: str, kind: str) -> list[float]:
    """(items, batches) the server has run so far, from its /metrics (zeros for the bare servers)."""
    if not kind.startswith("serve"):
        return [0.0, 0.0]
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30, trust_env=False).text
    values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
              if ln.startswith("slimguard_batch_items_")}
    return [values.get("slimguard_batch_items_sum", 0.0), values.get("slimguard_batch_items_count", 0.0)]


def _pct(values: list[float], q: float) -> float:
    from slimguard.runtime.measure import percentile

    return percentile(values, q) * 1e3 if values else float("nan")


# ---- in-process: guard cost and cascade ------------------------------------------------------------------
def guard_overhead(speed: Any) -> dict[str, Any]:
    """The guard's cost from a paired comparison of ``model`` and ``guarded`` batches of 32: times, the
    speed ratio and the overhead (``1 / ratio - 1``) with their 95% intervals."""
    g = speed.ratios["guarded"]
    return {"model_ms_per_batch32": speed.median_ms["model"], "guarded_ms_per_batch32": speed.median_ms["guarded"],
            "speed_ratio": g.ratio, "ci95": list(g.ci95),
            "overhead": 1 / g.ratio - 1, "overhead_ci95": [1 / g.ci95[1] - 1, 1 / g.ci95[0] - 1]}


def in_process(artifact: Path) -> dict[str, Any]:
    import torch

    from _schema import accuracy_row, correct
    from slimguard import data as sgdata
    from slimguard.runtime.measure import compare_speed
    from slimguard.serve import ServeConfig, load_served
    from slimguard.serve.loaded import guarded_batch

    torch.set_num_threads(1)
    data = sgdata.load("digits32")
    loaded = load_served(ServeConfig(artifact=str(artifact), reference=f"zoo:{MODEL}",
                                     cascade_tolerance=CASCADE_TOLERANCE))
    try:
        cascade = loaded.cascade
        assert cascade is not None
        small, large = cascade.small, cascade.large
        x = data.test.x[:32]
        # the guard around the same small model (no cascade), against the small model alone
        plain = load_served(ServeConfig(artifact=str(artifact)))
        try:
            guard, contract = plain.guard, plain.guard.contract
            assert contract is not None
            ids = [f"r-{i}" for i in range(len(x))]

            def served() -> Any:  # what the service runs per batch: value checks, then the guarded model
                assert bool(contract.row_ok(x).all())
                return guarded_batch(guard, x, ids)

            with torch.no_grad():
                guard_speed = compare_speed({"model": lambda: small(x), "guarded": served,
                                             "guard_call": lambda: guard(x, ids=ids)}, baseline="model",
                                            threads=1, rounds=15, budget_s=15, batch_size=32, seed=SEED)
        finally:
            plain.close()
        with torch.no_grad():
            cascade.calls = cascade.rows = cascade.fallback_rows = 0
            hits = {"small": correct(small, data.test), "reference": correct(large, data.test),
                    "cascade": correct(cascade, data.test)}
            fallback_rate = cascade.fallback_rate
            speed = compare_speed({"reference": lambda: large(x), "small": lambda: small(x),
                                   "cascade": lambda: cascade(x)}, baseline="reference", threads=1, rounds=15,
                                  budget_s=15, batch_size=32, seed=SEED)
    finally:
        loaded.close()
    gc = guard_speed.ratios["guard_call"]
    return {
        "guard": {**guard_overhead(guard_speed),
                  "guard_call_ms_per_batch32": guard_speed.median_ms["guard_call"],
                  "guard_call_overhead": 1 / gc.ratio - 1,
                  "guard_call_overhead_ci95": [1 / gc.ci95[1] - 1, 1 / gc.ci95[0] - 1]},
        "cascade": {"threshold": cascade.config.threshold, "validation": loaded.cascade_stats,
                    "test_fallback_rate": fallback_rate,
                    "accuracy": [accuracy_row(k, v) for k, v in hits.items()],
                    "ms_per_batch32": speed.median_ms,
                    "speed_vs_reference": {k: {"ratio": r.ratio, "ci95": list(r.ci95)}
                                           for k, r in speed.ratios.items()}},
    }


# ---- in-process: the embedder's guard, length-chunked batches, drift monitor --------------------------------
def in_process_minilm(artifact: Path) -> dict[str, Any]:
    import random

    import torch

    from slimguard import data as sgdata
    from slimguard.runtime.measure import compare_speed
    from slimguard.serve import ServeConfig, load_served

    torch.set_num_threads(1)
    bundle = sgdata.load(TEXT_DATA)
    loaded = load_served(ServeConfig(artifact=str(artifact), data=TEXT_DATA))
    try:
        text, guard, small = loaded.text, loaded.guard, loaded.small
        assert text is not None and text.monitor is not None
        texts = list(bundle.test.x[:32])
        batch = text.encode(texts)

        def guarded() -> Any:  # what the service runs per batch: the forward pass, then the guard
            return text.guard_embeddings(text.forward(guard.model, batch), time.perf_counter())

        with torch.no_grad():
            speed = compare_speed({"model": lambda: text.forward(guard.model, batch), "guarded": guarded,
                                   "one_padded_batch": lambda: small(**small.tokenize(texts))},
                                  baseline="model", threads=1, rounds=10, budget_s=40, batch_size=32, seed=SEED)
        # drift: the whole test split (in distribution), then random word pieces of the model's vocabulary
        monitor = text.monitor
        monitor.reset()

        def feed(items: list[str]) -> dict[str, Any]:
            for i in range(0, len(items), 64):
                b = text.encode(items[i : i + 64])
                text.guard_embeddings(text.forward(guard.model, b), time.perf_counter())
            st = monitor.status()
            return {"texts": len(items), "state": st["state"],
                    **{k: {"value": v["value"], "state": v["state"]} for k, v in st["metrics"].items()
                       if k != "latency_p95_ms"}}

        with torch.no_grad():
            drift_in = feed(list(bundle.test.x))
            monitor.reset()
            rng = random.Random(SEED)
            vocab = sorted(w for w in text.tokenizer.get_vocab() if w.isalpha() and len(w) > 2)
            drift_out = feed([" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 20))) for _ in range(300)])
    finally:
        loaded.close()
    pad = speed.ratios["one_padded_batch"]
    return {
        "guard": guard_overhead(speed),
        "length_chunks": {"one_padded_batch_ms_per_batch32": speed.median_ms["one_padded_batch"],
                          "chunked_speedup": 1 / pad.ratio, "ci95": [1 / pad.ci95[1], 1 / pad.ci95[0]]},
        "drift": {"in_distribution_test_split": drift_in, "random_word_pieces": drift_out},
    }


# ---- the load runs ---------------------------------------------------------------------------------------
def load_cells(model: str, kinds: tuple[str, ...], artifact: Path, bodies: list[bytes], args: Any,
               serve_args: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every (server, concurrency) cell: ``args.rounds`` interleaved rounds of ``args.seconds`` each."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {(k, c): [] for k in kinds for c in CONCURRENCY}
    procs: dict[str, Proc] = {}
    try:
        for k in kinds:  # all up at once; only one is loaded at a time
            procs[k] = start(k, artifact, serve_args)
        threads = {k: p.torch_threads() if k.startswith("serve") else None for k, p in procs.items()}
        for r in range(args.rounds):
            order = kinds if r % 2 == 0 else tuple(reversed(kinds))
            for c in CONCURRENCY:
                for k in order:
                    cpu0, batches0 = procs[k].cpu_s(), _batches(procs[k].url, k)
                    run = asyncio.run(_load(procs[k].url, bodies, c, args.seconds))
                    run["cpu_s"] = procs[k].cpu_s() - cpu0  # includes the connection warm-up requests
                    run["batches"] = [a - b for a, b in zip(_batches(procs[k].url, k), batches0, strict=True)]
                    run["requests"] = run["ok"] + run["errors"] + c
                    cells[(k, c)].append(run)
    finally:
        for p in procs.values():
            p.stop()
    cases = []
    for (k, c), runs in cells.items():
        lat = [v for run in runs for v in run["latencies"]]
        rps = [run["ok"] / run["wall_s"] for run in runs]
        cases.append({"model": model, "server": k, "concurrency": c, "torch_threads": threads[k],
                      "throughput_rps": statistics.median(rps),
                      "throughput_per_round": [round(v, 1) for v in rps], "p50_ms": _pct(lat, 0.5),
                      "p99_ms": _pct(lat, 0.99), "responses": len(lat),
                      "server_cpu_ms_per_request": 1e3 * sum(run["cpu_s"] for run in runs)
                      / max(1, sum(run["requests"] for run in runs)),
                      "non_200": sum(run["errors"] for run in runs),
                      "mean_batch_items": (sum(run["batches"][0] for run in runs)
                                           / max(1, sum(run["batches"][1] for run in runs))) if k.startswith("serve")
                      else None})
    return cases


def _cell(cases: list[dict[str, Any]], kind: str, c: int, key: str) -> float:
    return float(next(x[key] for x in cases if x["server"] == kind and x["concurrency"] == c))


def _common(label: str, cases: list[dict[str, Any]], g: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """The targets and headline claims both cases share."""
    from _schema import claim, target

    gain_vs_bare = _cell(cases, "serve", 32, "throughput_rps") / _cell(cases, "bare", 32, "throughput_rps")
    gain_vs_bare_t1 = _cell(cases, "serve", 32, "throughput_rps") / _cell(cases, "bare_t1", 32, "throughput_rps")
    batching_gain = _cell(cases, "serve", 32, "throughput_rps") / _cell(cases, "serve_nobatch", 32, "throughput_rps")
    workers_gain = _cell(cases, "serve_w2", 32, "throughput_rps") / _cell(cases, "bare", 32, "throughput_rps")
    cpu_ratio = (_cell(cases, "bare", 32, "server_cpu_ms_per_request")
                 / _cell(cases, "serve", 32, "server_cpu_ms_per_request"))
    lo, hi = (100 * v for v in g["overhead_ci95"])
    non_200 = sum(x["non_200"] for x in cases)
    targets = [
        target(f"{label}: serve vs bare FastAPI throughput at concurrency 32", ">= 2x", round(gain_vs_bare, 2),
               gain_vs_bare >= 2),
        target(f"{label}: guard overhead (as the service runs it vs the same forward pass, batch 32, in process)",
               "<= 10%", f"{100 * g['overhead']:.1f}% (95% CI {lo:.1f}..{hi:.1f})", g["overhead"] <= 0.10),
        target(f"{label}: no 5xx or other non-200 answers under load", "0", non_200, non_200 == 0),
    ]
    summary = [
        claim(f"{label}: slimguard serve / bare FastAPI throughput, concurrency 32", gain_vs_bare, unit="x"),
        claim(f"{label}: slimguard serve / bare FastAPI with 1 torch thread, concurrency 32", gain_vs_bare_t1,
              unit="x"),
        claim(f"{label}: micro-batching gain (serve / serve --max-batch 1), concurrency 32", batching_gain, unit="x"),
        claim(f"{label}: slimguard serve --workers 2 / bare FastAPI throughput, concurrency 32", workers_gain,
              unit="x"),
        claim(f"{label}: server CPU per request, bare / serve, concurrency 32", cpu_ratio, unit="x"),
        claim(f"{label}: guard overhead per batch of 32, in process", 100 * g["overhead"], unit="%",
              ci95=[100 * v for v in g["overhead_ci95"]]),
    ]
    return targets, summary


def _print_cases(title: str, cases: list[dict[str, Any]]) -> None:
    print(f"{title}\n{'server':<14} {'thr':>3} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'cpu ms/req':>10} {'batch':>6} {'non-200':>7}")
    for x in cases:
        batch = f"{x['mean_batch_items']:.1f}" if x["mean_batch_items"] is not None else "-"
        thr = x["torch_threads"] if x["torch_threads"] is not None else "-"
        print(f"{x['server']:<14} {thr:>3} {x['concurrency']:>4} {x['throughput_rps']:>8.1f} {x['p50_ms']:>8.2f} "
              f"{x['p99_ms']:>8.2f} {x['server_cpu_ms_per_request']:>10.2f} {batch:>6} {x['non_200']:>7}")


KINDS = ("serve", "serve_nobatch", "serve_w2", "bare", "bare_t1")


def run_digits(args: Any, tmp: Path) -> dict[str, Any]:
    import slimguard as sg
    from _schema import claim
    from slimguard import data as sgdata
    from slimguard.artifact import save
    from slimguard.models import zoo

    model = zoo.load(MODEL, progress=False)
    sg.prune_(model, sg.MagnitudePruningConfig(sparsity=SPARSITY))
    artifact = save(model, tmp / "lenet5-sparse.slim")
    test = sgdata.load("digits32").test
    bodies = [json.dumps({"inputs": test.x[i : i + 1].tolist()}).encode() for i in range(64)]
    cases = load_cells("digits", KINDS, artifact, bodies, args)
    proc = in_process(artifact)
    g = proc["guard"]
    targets, summary = _common("digits", cases, g)
    acc = {row["model"]: row for row in proc["cascade"]["accuracy"]}
    summary += [
        claim("digits: Guard.__call__ overhead per batch of 32, in process", 100 * g["guard_call_overhead"],
              unit="%", ci95=[100 * v for v in g["guard_call_overhead_ci95"]]),
        claim("digits: cascade test accuracy", acc["cascade"]["accuracy"], unit="%", ci95=acc["cascade"]["ci95"],
              n=acc["cascade"]["n"]),
    ]
    _print_cases("digits (HTTP-bound)", cases)
    casc = proc["cascade"]
    print(f"cascade (threshold {casc['threshold']:.3f} chosen on val; test fallback "
          f"{100 * casc['test_fallback_rate']:.1f}%): " + ", ".join(
              f"{m} {row['accuracy']:.2f}% [{row['ci95'][0]:.1f}, {row['ci95'][1]:.1f}]"
              for m, row in acc.items()))
    print("ms per batch of 32: " + ", ".join(f"{k} {v:.2f}" for k, v in casc["ms_per_batch32"].items()))
    return {"cases": cases, "targets": targets, "summary": summary, "in_process": proc}


def run_minilm(args: Any, tmp: Path) -> dict[str, Any]:
    from _schema import claim, target
    from slimguard import data as sgdata
    from slimguard.artifact import save
    from slimguard.models.sources import load_minilm

    artifact = save(load_minilm(), tmp / "minilm.slim")
    test = sgdata.load(TEXT_DATA).test
    bodies = [json.dumps({"texts": [t]}).encode() for t in test.x[:256]]
    cases = load_cells("minilm", KINDS, artifact, bodies, args, ("--data", TEXT_DATA))
    proc = in_process_minilm(artifact)
    targets, summary = _common("minilm", cases, proc["guard"])
    ch = proc["length_chunks"]
    summary.append(claim("minilm: length-sorted chunks vs one padded batch of 32 texts, in process",
                         ch["chunked_speedup"], unit="x", ci95=ch["ci95"]))
    drift = proc["drift"]
    ok_in = drift["in_distribution_test_split"]["state"] == "ok"
    ok_out = drift["random_word_pieces"]["state"] == "alert"
    targets.append(target("minilm: drift monitor ok on the test split, alert on random word pieces",
                          "ok / alert", f"{drift['in_distribution_test_split']['state']} / "
                          f"{drift['random_word_pieces']['state']}", ok_in and ok_out))
    _print_cases("minilm (compute-bound)", cases)
    print(f"length-chunked forward: {ch['chunked_speedup']:.2f}x one padded batch [{ch['ci95'][0]:.2f}, "
          f"{ch['ci95'][1]:.2f}]")
    for name, d in drift.items():
        print(f"drift, {name}: " + json.dumps(d))
    return {"cases": cases, "targets": targets, "summary": summary, "in_process": proc}


# ---- main -----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bare-server", metavar="ARTIFACT", help=argparse.SUPPRESS)
    ap.add_argument("--bare-threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=3.0, help="Seconds of load per cell and round.")
    ap.add_argument("--rounds", type=int, default=2, help="Interleaved rounds over servers and concurrencies.")
    ap.add_argument("--only", choices=("digits", "minilm"), help="Run one case and print it (writes nothing).")
    args = ap.parse_args()
    if args.bare_server:
        bare_server(args.bare_server, args.bare_threads)
        return

    import torch

    from _schema import environment, print_targets, write_results

    env = environment(torch.get_num_threads(), seed=SEED, in_process_threads=1,
                      note="shared machine: the load client and the servers share its cores")
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    runs = {name: fn(args, tmp) for name, fn in (("digits", run_digits), ("minilm", run_minilm))
            if args.only in (None, name)}
    targets = [t for r in runs.values() for t in r["targets"]]
    print_targets(targets)
    if args.only:
        return
    out = write_results(
        "serve_load", env=env, cases=[c for r in runs.values() for c in r["cases"]], targets=targets,
        summary=[s for r in runs.values() for s in r["summary"]],
        protocol=f"{args.rounds} interleaved rounds x {args.seconds:g} s per (model, server, concurrency); one digit "
                 "or one docs-text test text per request; client and servers on one shared machine; each server "
                 "with its own default torch threads (serve: automatic, 1 on 2 cores; bare: torch's default; "
                 "bare_t1: 1)",
        in_process={name: r["in_process"] for name, r in runs.items()}, wall_s=round(time.perf_counter() - t_start, 1),
        loadavg_1m_at_end=round(os.getloadavg()[0], 2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
