"""Writing files off the caller's thread: a bounded pool of writer threads, and a sample's pending files.

The writer callback runs inside the loop's batch-end hook, so every millisecond it spends encoding
PNGs is a millisecond the accelerator waits. `BackgroundWrites` runs the encoding and the atomic writes
(`io.files.atomic_write`: temporary name, then rename) in a few threads instead (Pillow and zlib
release the GIL while they compress). It is bounded: `submit` blocks while `capacity` images are
pending, so memory stays bounded on long videos, and with no workers it runs every task at once in the
caller's thread (the synchronous writer).

`Pending` is what one sample (a clip) hands back: the futures of its files and what to do once all
of them are written (its `DONE`, its place in a label tar). The writer calls `finish` on its own thread,
in the order the samples came, so `DONE` never precedes a file of its video.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")


def run_now(fn: Callable[..., T], *args: Any, weight: int = 1) -> Future[T]:
    """Run `fn(*args)` here and now; returns a finished future holding its result or its exception."""
    future: Future[T] = Future()
    try:
        future.set_result(fn(*args))
    except Exception as e:  # handed to whoever waits on the future, as a pool's future would
        future.set_exception(e)
    return future


def failed(future: Future[Any]) -> bool:
    """Whether `future` is finished with an exception (never blocks)."""
    return future.done() and not future.cancelled() and future.exception() is not None


class BackgroundWrites:
    """A pool of `workers` threads with at most `capacity` images pending (queued or being written).

    Args:
        workers: threads; 0 runs each task in the caller's thread when it is submitted.
        capacity: images pending at most; `submit` blocks until there is room. A task heavier than
            the whole capacity waits until nothing else is pending, then runs alone.
    """

    def __init__(self, workers: int = 2, capacity: int = 128) -> None:
        if workers < 0 or capacity < 1:
            raise ValueError(
                f"Expected `workers` >= 0 and `capacity` >= 1, but got {workers} and {capacity}."
            )
        self.workers, self.capacity = workers, capacity
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="vss-write") if workers else None
        self._room = threading.Condition()
        self._pending = 0
        self.most_pending = 0  # the high-water mark of `pending`

    @property
    def pending(self) -> int:
        """Images submitted and not yet written (or failed)."""
        return self._pending

    def submit(self, fn: Callable[..., T], *args: Any, weight: int = 1) -> Future[T]:
        """Run `fn(*args)` in the pool once there is room for `weight` more images.

        Returns:
            Its future; an exception of `fn` is raised by `future.result()`, never here.

        Raises:
            RuntimeError: if the pool is closed.
        """
        if self._pool is None:
            return run_now(fn, *args)
        weight = max(1, min(weight, self.capacity))
        with self._room:
            self._room.wait_for(lambda: self._pending + weight <= self.capacity)
            self._pending += weight
            self.most_pending = max(self.most_pending, self._pending)
        try:
            future = self._pool.submit(fn, *args)
        except BaseException:
            self._release(weight)
            raise
        future.add_done_callback(lambda _: self._release(weight))
        return future

    def _release(self, weight: int) -> None:
        with self._room:
            self._pending -= weight
            self._room.notify_all()

    def close(self, cancel: bool = False) -> None:
        """Stop the threads once the tasks being written are finished (idempotent).

        Args:
            cancel: also drop the tasks that have not started (their futures are cancelled);
                otherwise they are written first.
        """
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)


class Pending:
    """The files of one sample being written, and what completes the sample once all of them are.

    Args:
        futures: the sample's file writes.
        then: called by `finish` with the futures' results, in order, once every one succeeded.
        on_error: called by `finish` when one failed, after every one is finished, before it raises.
    """

    def __init__(
        self,
        futures: Sequence[Future[Any]],
        then: Callable[[list[Any]], None],
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.futures = list(futures)
        self.then = then
        self.on_error = on_error

    def ready(self) -> bool:
        """Whether every file is finished (`finish` would not block)."""
        return all(f.done() for f in self.futures)

    def finish(self) -> None:
        """Wait for every file, then complete the sample (`then`).

        Raises:
            Exception: the first file's error (in submission order), after every file is finished, so
                nothing writes in the sample's folder any more; `then` is not called.
        """
        wait(self.futures)
        for future in self.futures:
            if future.cancelled():
                error: BaseException | None = RuntimeError("a background write was cancelled")
            else:
                error = future.exception()
            if error is not None:
                if self.on_error is not None:
                    self.on_error()
                raise error
        self.then([f.result() for f in self.futures])
