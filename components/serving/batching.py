"""Dynamic batching: concurrent requests' images go to one queue; one worker task takes up to max_batch
of them (waiting at most timeout_s after the first) and runs them as one model call in a thread."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from components.serving.limits import ErrorKind, RequestRejected

logger = logging.getLogger(__name__)


@dataclass
class _Item:
    array: np.ndarray
    future: asyncio.Future


async def collect(queue: asyncio.Queue, max_batch: int, timeout_s: float) -> list:
    """Wait for one item, then gather more until max_batch or timeout_s after the first."""
    items = [await queue.get()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while len(items) < max_batch:
        try:
            items.append(queue.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            items.append(await asyncio.wait_for(queue.get(), remaining))
        except TimeoutError:
            break
    return items


class Batcher:
    """Runs submitted arrays through `model` (NxCxHxW -> NxL, called in a thread) in batches.

    Takes the model function, the most arrays per call, how long to wait for more after the first, and
    an optional `on_batch(size)` called after each successful call. A failing call fails the requests
    of that batch with RequestRejected(500, model_failure) and the batcher keeps serving.
    """

    def __init__(
        self,
        model: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        timeout_s: float,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.model = model
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        """Start the worker task (inside the running event loop)."""
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._work(), name="visionflow-batcher")

    async def stop(self) -> None:
        """Cancel the worker and wait for it; pending requests are cancelled."""
        if self._worker is None:
            return
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass

    async def submit(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Queue one request's arrays and wait for their output rows (in order)."""
        assert self._queue is not None, "the batcher is not started"
        loop = asyncio.get_running_loop()
        items = [_Item(array, loop.create_future()) for array in arrays]
        for item in items:
            self._queue.put_nowait(item)
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        except asyncio.CancelledError:
            for item in items:
                item.future.cancel()
            raise

    async def _work(self) -> None:
        """Run queued arrays through the model in batches until cancelled."""
        assert self._queue is not None
        while True:
            items = await collect(self._queue, self.max_batch, self.timeout_s)
            items = [item for item in items if not item.future.done()]  # a cancelled request's images
            if items:
                await self._run(items)

    async def _run(self, items: list[_Item]) -> None:
        try:
            batch = np.stack([item.array for item in items])
            outputs = await asyncio.to_thread(self.model, batch)
        except asyncio.CancelledError:
            for item in items:
                if not item.future.done():
                    item.future.cancel()
            raise
        except Exception as err:  # the model failed on a well-formed batch: fail these requests, keep serving
            logger.error("model failure on a batch of %d images: %s", len(items), err)
            for item in items:
                if not item.future.done():
                    item.future.set_exception(
                        RequestRejected(500, ErrorKind.MODEL_FAILURE, "the model failed on this request")
                    )
            return
        if self.on_batch is not None:
            self.on_batch(len(items))
        for item, row in zip(items, outputs, strict=False):
            if not item.future.done():
                item.future.set_result(row)
