"""Dynamic batching for the in-process app (no Ray). Under Ray Serve the deployment uses `@serve.batch` instead;
both hand a list of jobs to `Engine.run_batch` on one worker thread and give each caller its own result."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any


class MicroBatcher:
    """`await batcher.submit(job)`: waits up to `wait_s` for up to `max_batch_size` jobs, runs them as one batch."""

    def __init__(self, run: Callable[[Sequence[Any]], list[Any]], executor: Executor, max_batch_size: int = 16, wait_s: float = 0.005):
        self.run = run
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: asyncio.Task | None = None

    def set_max_batch_size(self, n: int) -> None:
        self.max_batch_size = int(n)

    def set_batch_wait_timeout_s(self, s: float) -> None:
        self.wait_s = float(s)

    async def submit(self, job: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._work())
        future = loop.create_future()
        await self._queue.put((job, future))
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            live = [(job, f) for job, f in batch if not f.cancelled()]
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.run, [job for job, _ in live])
            except Exception as e:  # the whole batch failed (a bug, not bad input): every caller gets it
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), r in zip(live, results):
                if not f.done():
                    f.set_result(r)
