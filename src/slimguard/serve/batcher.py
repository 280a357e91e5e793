"""Dynamic micro-batching on one worker thread (as Triton's dynamic batcher and TorchServe's batch
aggregation do): requests queue up; the worker takes the first, waits up to ``max_wait_ms`` for more
until ``max_batch`` items, runs the guarded model once on the concatenation, and hands each request its
rows. The event loop never runs the model, and every use of the model (forward passes, checksum scrubs,
swapping in a reloaded model) happens on this one thread, so none of them overlap.

Example:
    >>> batcher = MicroBatcher(lambda: loaded, max_batch=64, max_wait_ms=5, metrics=metrics).start()
    >>> items = await batcher.predict(x)          # in a coroutine; x is (n, *input_shape)
    >>> items = await asyncio.wait_for(batcher.submit(x), timeout=10)   # with a deadline
    >>> batcher.call(loaded.scrub).result()       # any function, run between batches
    >>> batcher.stop()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from slimguard.serve.loaded import LoadedModel, contract_problem, fits_structure
from slimguard.serve.metrics import ServeMetrics

log = logging.getLogger("slimguard.serve")


@dataclasses.dataclass
class _Predict:
    x: Any  # a tensor batch, or a TextBatch of token lists (anything with len() and a concat)
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[dict[str, Any]]]


@dataclasses.dataclass
class _Call:
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]


_STOP = object()


def _settle(future: asyncio.Future[Any], value: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # timed out and cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class MicroBatcher:
    """Collects prediction requests into batches and runs them on a worker thread.

    Args:
        current: returns the model now served (read once per batch, so a reload takes effect between
            batches).
        max_batch: most items per batch; a request larger than this runs alone.
        max_wait_ms: how long to wait for more requests once the first arrived.
        metrics: where batch sizes, items, OOD flags and fallbacks are counted.
    """

    def __init__(self, current: Callable[[], LoadedModel], max_batch: int, max_wait_ms: float,
                 metrics: ServeMetrics) -> None:
        self.current, self.max_batch, self.max_wait = current, max_batch, max_wait_ms / 1000
        self.metrics = metrics
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._held: Any = None
        self._prefix = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:06x}"  # ids unique across restarts
        self._count = 0
        self._thread = threading.Thread(target=self._run, name="slimguard-batcher", daemon=True)

    def start(self) -> MicroBatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then end the worker thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def submit(self, x: Any) -> asyncio.Future[list[dict[str, Any]]]:
        """Queue ``x`` ``(n, *input_shape)`` (already checked by the contract), or a
        :class:`~slimguard.serve.text.TextBatch` (already tokenized under the limits); call from the event loop.

        Returns the future of the guarded answers, one per row. Cancelling it (a timeout) drops the request
        if it has not run yet.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
        self._queue.put(_Predict(x, loop, fut))
        return fut

    async def predict(self, x: Any) -> list[dict[str, Any]]:
        """The guarded answer for each row of ``x``: ``await batcher.predict(x)``."""
        return await self.submit(x)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn`` on the worker thread between two batches; its result or error comes in the future."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put(_Call(fn, fut))
        return fut

    # ---- the worker thread ---------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> Any:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _run(self) -> None:
        while True:
            job = self._next(None)
            if job is _STOP:
                return
            if isinstance(job, _Call):
                self._run_call(job)
                continue
            batch, rows = [job], len(job.x)
            deadline = time.monotonic() + self.max_wait
            while rows < self.max_batch:
                nxt = self._next(deadline - time.monotonic())
                if nxt is None:
                    break
                if not isinstance(nxt, _Predict) or rows + len(nxt.x) > self.max_batch:
                    self._held = nxt  # a call, the stop mark, or a request that does not fit: next round
                    break
                batch.append(nxt)
                rows += len(nxt.x)
            self._run_batch(batch)

    def _run_call(self, job: _Call) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except BaseException as exc:  # handed to the caller, who reports it
            job.future.set_exception(exc)

    def _run_batch(self, batch: list[_Predict]) -> None:
        batch = [j for j in batch if not j.future.done()]  # drop requests that timed out while queued
        if not batch:
            return
        try:
            loaded = self.current()
            batch = self._screen(loaded, batch)
            if not batch:
                return
            x = batch[0].x if len(batch) == 1 else _concat([j.x for j in batch])
            ids = [f"{self._prefix}-{self._count + i}" for i in range(len(x))]
            self._count += len(x)
            items = loaded.answer(x, ids)
        except BaseException as exc:
            log.exception("prediction batch of %d requests failed", len(batch))
            _settle_all(batch, [(j.future, None, exc) for j in batch])
            return
        self.metrics.batch.observe(len(x))
        self.metrics.items.inc(len(x))
        self.metrics.ood.inc(sum(1 for it in items if it["guard"]["ood"]))
        self.metrics.fallback.inc(sum(1 for it in items if it["guard"]["fallback"]))
        self.metrics.refresh_monitor()
        answers: list[_Answer] = []
        start = 0
        for j in batch:
            answers.append((j.future, items[start:start + len(j.x)], None))
            start += len(j.x)
        _settle_all(batch, answers)


    def _screen(self, loaded: LoadedModel, batch: list[_Predict]) -> list[_Predict]:
        """The contract's value checks (finite, within range) over the whole batch in one vectorised pass
        (:meth:`Contract.row_ok <slimguard.guard.contract.Contract.row_ok>`); a request with a failing row
        is checked alone (:meth:`~slimguard.guard.contract.Contract.check`, the authority) and, if it
        violates the contract, answered with its 422 while the others run. A request that no longer fits
        (a reload changed the model's input) is checked alone as well."""
        contract = loaded.guard.contract
        if loaded.text is not None or contract is None:
            return batch
        fits = [fits_structure(contract, j.x) for j in batch]
        joined = [j.x for j, f in zip(batch, fits, strict=True) if f]
        ok = contract.row_ok(_concat(joined)).tolist() if joined else []
        keep, rejected, start = [], [], 0
        for j, f in zip(batch, fits, strict=True):
            good = f and all(ok[start : start + len(j.x)])
            start += len(j.x) if f else 0
            violations = [] if good else contract.check(j.x)  # never empty when the structure does not fit
            if violations:
                if loaded.guard.monitor is not None:
                    loaded.guard.monitor.record_rejected(max(1, len(j.x)) if j.x.dim() else 1)
                rejected.append((j, contract_problem(violations)))
            else:
                keep.append(j)
        if rejected:
            _settle_all([j for j, _ in rejected], [(j.future, None, p) for j, p in rejected])
        return keep


_Answer = tuple["asyncio.Future[Any]", Any, "BaseException | None"]  # future, value, error


def _settle_all(batch: list[_Predict], answers: list[_Answer]) -> None:
    """Hand every answer to its event loop in one call per loop (one wake-up of the loop per batch)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Answer]] = {}
    for j, answer in zip(batch, answers, strict=True):
        by_loop.setdefault(j.loop, []).append(answer)
    for loop, group in by_loop.items():
        loop.call_soon_threadsafe(_settle_group, group)


def _settle_group(group: list[_Answer]) -> None:
    for fut, value, error in group:
        _settle(fut, value, error)


def _concat(parts: list[Any]) -> Any:
    """One batch from several requests' inputs: tensors concatenated, token lists joined."""
    if torch.is_tensor(parts[0]):
        return torch.cat(parts)
    return type(parts[0]).concat(parts)
