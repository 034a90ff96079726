"""Dynamic batching of the service, in-process and under Ray Serve alike: every request's images go through one
`MicroBatcher`, which hands lists of jobs to `Engine.run_batch` on one worker thread and gives each caller its own
results.

Continuous batching: the batch runs as soon as the engine is free, with every job queued by then (up to
`max_batch_size`); with `concurrency` > 1 (the setting `engine_batches`, resolved by `engine_batches` below) that
many batches run at once, each on its own executor thread, but a batch starts beside a running one only once it
holds half the recent load: two half loads at once, not one image beside the rest (on CPU the second batch is what
uses the second core; on 2 cores at 8 one-image clients this raised the mean batch from 2.2 to 3.9 at the same or
better images/s). A request that finds the engine idle runs at once, alone; requests that arrive while a batch runs
form the next one. (Serve's `@serve.batch` cuts the next batch `batch_wait_timeout_s` after its first request even
while the engine is still busy, then queues it on a semaphore: under load the queue is cut into batches of one or two.)

A batch takes the queued requests' images in turn, one from each request, round and round (a request with images
left goes to the back of the line): a request of one image waits for a few batches at most, however many images the
requests before it hold. In first-come order, 20 clients sending 64 images each made a one-image client wait 4.5 s
(p50) in a hostile-client trial.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np

from backbone.loading import available_cores


class MicroBatcher:
    """`await batcher.submit(job)` or `await batcher.submit_many(jobs)` -> results in order.

    `wait_s` applies only under load: a batch formed right after another one (jobs were waiting when the engine
    became free) waits up to `wait_s` for more jobs, until as many are queued as the recent load can bring (at most
    `max_batch_size`), so that clients whose answers just went out can join it. A job that finds the engine idle
    never waits. `wait_s=None` (auto): up to the fixed cost of a batch (`BatchCost`), what one more image saves by
    joining this batch rather than starting another: on a GPU, where a batch costs about the same at any size, nearly
    a batch's time; on CPU, where each image costs its own, what the replica measures (6-15 ms on 2 cores).
    """

    def __init__(self, run: Callable[[Sequence[Any]], list[Any]], executor: Executor, max_batch_size: int = 16,
                 wait_s: float | None = None, concurrency: int | Callable[[], int] = 1):
        self.run = run
        self.executor = executor  # needs as many workers as `concurrency` can say
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.concurrency = concurrency  # batches running at once, each on its own executor thread (a callable: asked per batch)
        self._requests: deque[deque[tuple[Any, asyncio.Future]]] = deque()  # per request, its queued jobs
        self._queued = 0  # jobs in `_requests`
        self._in_engine = 0  # jobs in the running batches
        self._loads: deque[int] = deque(maxlen=64)  # jobs in the replica (queued or running) at the recent arrivals
        self.cost = BatchCost()  # the recent batches' run time by size
        self._wake: asyncio.Event | None = None  # set whenever jobs are queued
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        """Jobs waiting for the next batch."""
        return self._queued

    def set_max_batch_size(self, n: int) -> None:
        self.max_batch_size = int(n)

    def set_batch_wait_timeout_s(self, s: float | None) -> None:
        self.wait_s = None if s is None else float(s)

    def wait_limit(self) -> float:
        """How long a batch formed under load may wait for more jobs now."""
        return self.cost.fixed_s() if self.wait_s is None else self.wait_s

    async def submit(self, job: Any) -> Any:
        [result] = await self.submit_many([job])
        return result

    async def submit_many(self, jobs: Sequence[Any]) -> list[Any]:
        """Queues the jobs as one request (batches take its jobs in turn with other requests' jobs, see the module
        docstring) and waits for all their results."""
        loop = self._started()
        futures = [loop.create_future() for _ in jobs]
        if jobs:
            self._requests.append(deque(zip(jobs, futures)))
            self._queued += len(jobs)
        self._loads.append(self._queued + self._in_engine)
        self._wake.set()
        return list(await asyncio.gather(*futures))  # cancelled (client gone): the worker skips its jobs

    def _started(self) -> asyncio.AbstractEventLoop:
        """The worker on the running loop (a new one when the app moves to another loop, as TestClients do)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._requests, self._queued, self._wake = loop, deque(), 0, asyncio.Event()
            self._worker = loop.create_task(self._work())
        return loop

    def _limit(self) -> int:
        return max(1, int(self.concurrency() if callable(self.concurrency) else self.concurrency))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        running = set()  # the running batches' tasks (kept referenced here); each one's end sets `_wake`
        while True:
            busy = False  # the jobs queued while every engine thread was running a batch
            while not self._queued or not self._may_start(running):
                busy = busy or bool(self._queued)
                self._wake.clear()
                await self._wake.wait()
            if busy and (wait := self.wait_limit()) > 0:
                await self._top_up(loop, wait)
            batch = self._take()
            if not batch:
                continue
            task = loop.create_task(self._run(loop, batch))
            running.add(task)
            self._in_engine += len(batch)
            task.add_done_callback(lambda done, n=len(batch): self._ended(running, done, n))

    def _ended(self, running: set, task: asyncio.Task, jobs: int) -> None:
        running.discard(task)
        self._in_engine -= jobs
        self._wake.set()

    def _recent_load(self) -> int:
        """The most jobs the replica held at once (queued or running) over the recent arrivals."""
        return max(self._loads, default=1)

    def _may_start(self, running: set) -> bool:
        """A batch may start on a free engine thread; beside a running one only with half the recent load or more
        (a full batch at most), so that two batches at once split the load rather than run one image beside many."""
        if len(running) >= self._limit():
            return False
        return not running or self._queued >= min(self.max_batch_size, -(-self._recent_load() // 2))

    async def _top_up(self, loop: asyncio.AbstractEventLoop, wait_s: float) -> None:
        """Waits up to `wait_s` until as many jobs are queued as the recent load can bring (at most a full batch)."""
        deadline = loop.time() + wait_s
        expected = min(self.max_batch_size, self._recent_load() - self._in_engine)
        while self._queued < expected and (left := deadline - loop.time()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[tuple[Any, asyncio.Future]]:
        """Up to `max_batch_size` jobs, one from each queued request in turn (round robin)."""
        batch = []
        while self._requests and len(batch) < self.max_batch_size:
            request = self._requests.popleft()
            job, future = request.popleft()
            self._queued -= 1
            if not future.done():  # cancelled: its request is gone
                batch.append((job, future))
            if request:
                self._requests.append(request)
        return batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Any, asyncio.Future]]) -> None:
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self.run, [job for job, _ in batch])
        except Exception as e:  # the whole batch failed (a bug, not bad input): every caller gets it
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        self.cost.add(len(batch), time.perf_counter() - started)
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)


class BatchCost:
    """A batch's run time as `fixed + per_image * size`, fitted over the last `window` batches: the median run time
    of each size, then least squares over the sizes weighted by their counts (medians: one stalled batch, a hot swap
    or a first run of a graph, does not move it). The fit needs batches of two sizes or more; until then the last fit
    stands (none yet: 0)."""

    def __init__(self, window: int = 64):
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)
        self._fixed_s = 0.0
        self._fitted = True  # no batch since the last fit

    def add(self, size: int, seconds: float) -> None:
        self._recent.append((size, seconds))
        self._fitted = False  # fitted when asked (only an auto wait under load asks): nothing more per batch

    def fixed_s(self) -> float:
        """The fixed part of a batch's run time (0 to the median run time)."""
        if not self._fitted:
            self._fitted = True
            self._fit()
        return self._fixed_s

    def _fit(self) -> None:
        by_size: dict[int, list[float]] = {}
        for n, t in self._recent:
            by_size.setdefault(n, []).append(t)
        if len(by_size) < 2:
            return
        sizes = np.array(list(by_size), dtype=float)
        counts = np.array([len(ts) for ts in by_size.values()], dtype=float)
        medians = np.array([np.median(ts) for ts in by_size.values()])
        fixed = np.polyfit(sizes, medians, 1, w=np.sqrt(counts))[1]  # [per image, fixed]
        self._fixed_s = float(min(max(fixed, 0.0), np.median([t for _, t in self._recent])))


AUTO_ENGINE_BATCHES = 2  # batches at once under `engine_batches` auto, while the image passes run prompted or in torch


def engine_batches(setting: int | None, runtime) -> int | Callable[[], int]:
    """A replica's `MicroBatcher` concurrency: `setting` when given. Auto (None): 1 on GPU or a single core; on CPU
    `AUTO_ENGINE_BATCHES` while the image passes run in torch eager, or in the ONNX graphs with prompt tasks loaded
    (several graph calls per batch with routing between them), all of which leave the GIL while they compute, so a
    second batch uses a second core (measured on 2 cores over HTTP: torch 1.2-1.5x the images/s, prompt tasks in the
    split graphs 1.0-1.25x in 4 interleaved pairs), and 1 while only frozen graphs run (head tasks: 0.7-0.9x with two
    in one session's pairs, 1.07x in another's). Asked per batch: loading or removing a task switches it."""
    if setting:
        return setting
    if runtime.device.type != "cpu" or available_cores() < 2:
        return 1
    return lambda: AUTO_ENGINE_BATCHES if runtime.images_by_torch() or runtime.prompted_graphs_in_use() else 1


def engine_executor(settings) -> ThreadPoolExecutor:
    """The engine threads of a replica: as many as `engine_batches` may run batches at once."""
    return ThreadPoolExecutor(max_workers=settings.engine_batches or AUTO_ENGINE_BATCHES, thread_name_prefix="keepclip-engine")


def engine_batcher(engine, settings, executor: Executor) -> MicroBatcher:
    """The replica's batcher: `engine.run_batch` on `executor`, as many batches at once as `engine_batches` says."""
    return MicroBatcher(engine.run_batch, executor, settings.max_batch_size, settings.batch_wait_timeout_s,
                        engine_batches(settings.engine_batches, engine.runtime))
