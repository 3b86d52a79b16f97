"""Threads that overlap a job's reading, compute and writing: :func:`prefetch` runs a producer ahead of its
consumer, :class:`Behind` runs a consumer behind its producer. Errors cross to the calling thread; bounded queues
keep memory to a few items in flight."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterator[Any], depth: int, threaded: bool = True) -> Iterator[Any]:
    """``items``, produced by a background thread up to ``depth`` ahead; its errors are raised here."""
    if not threaded:
        yield from items
        return
    ready: queue.Queue = queue.Queue(depth)
    stop, done = threading.Event(), object()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                ready.put(item, timeout=0.1)
                return True
        return False

    def work() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(done)
        except BaseException as err:  # noqa: BLE001 (handed to the consumer)
            offer(_Failed(err))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name="fct-transform-reader", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class Behind:
    """Calls ``consume(*item)`` for each :meth:`put` item in a background thread (or at once, unthreaded)."""

    def __init__(self, consume: Callable[..., Any], depth: int, threaded: bool = True) -> None:
        self.consume, self.error = consume, None
        self.queue: queue.Queue | None = queue.Queue(depth) if threaded else None
        if self.queue is not None:
            self.thread = threading.Thread(target=self._loop, name="fct-transform-writer", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:  # after an error: drain, so that put() never blocks
                try:
                    self.consume(*item)
                except BaseException as err:  # noqa: BLE001 (raised in the caller's thread)
                    self.error = err

    def put(self, *item: Any) -> None:
        if self.queue is None:
            self.consume(*item)
            return
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self, failed: bool = False) -> None:
        """Wait for the queued items; raise the thread's error (unless ``failed``: an error is under way)."""
        if self.queue is not None:
            self.queue.put(None)
            self.thread.join()
            if self.error is not None and not failed:
                raise self.error


