"""Per-file work with a time bound: a read that hangs must not hang the run.

A read from a dead NFS/SMB mount or a stalled FUSE file system blocks inside the kernel, where
no Python code can interrupt it. So each file is read and decoded in a daemon worker thread and
the caller waits with a deadline: an item still running after `seconds` is reported as timed
out and its worker is abandoned (a daemon thread never blocks the process from exiting) and
replaced. When many workers are stuck the share is evidently gone: the remaining items are
reported as not read instead of leaving thousands of threads blocked on it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# A local disk reads a 600 MB TIFF in seconds; two minutes without an answer is a hung read.
READ_TIMEOUT = 120.0
# After this many abandoned workers, the rest of the batch is not attempted.
MAX_STUCK = 8


class TimedOut(Exception):
    """The item did not finish within the time bound."""


class _Worker(Generic[T, R]):
    """One daemon thread taking (position, item) tasks until told to stop or abandoned."""

    def __init__(
        self,
        fn: Callable[[T], R],
        tasks: queue.SimpleQueue[tuple[int, T] | None],
        results: queue.SimpleQueue[tuple[int, object]],
    ) -> None:
        self.fn, self.tasks, self.results = fn, tasks, results
        self.current: int | None = None
        self.started = 0.0
        self.abandoned = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="piaa-read")
        self.thread.start()

    def _loop(self) -> None:
        while not self.abandoned:
            task = self.tasks.get()
            if task is None:
                return
            position, item = task
            self.started, self.current = time.monotonic(), position
            value: object
            try:
                value = self.fn(item)
            except BaseException as exc:  # handed to the caller, who decides
                value = exc
            self.current = None
            self.results.put((position, value))


def map_bounded(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int = 4,
    seconds: float = READ_TIMEOUT,
    max_stuck: int = MAX_STUCK,
) -> list[R | BaseException]:
    """`fn` over `items` in up to `workers` threads, each call bounded by `seconds`.

    Returns, in the order of `items`, each result or the exception it raised; a call past its
    deadline gives `TimedOut`. The calls of one batch run concurrently, so `fn` must be
    thread-safe (decoding with Pillow is, and releases the GIL).
    """
    if not items:
        return []
    tasks: queue.SimpleQueue[tuple[int, T] | None] = queue.SimpleQueue()
    results: queue.SimpleQueue[tuple[int, object]] = queue.SimpleQueue()
    for task in enumerate(items):
        tasks.put(task)
    pool = [_Worker(fn, tasks, results) for _ in range(max(1, min(workers, len(items))))]
    out: dict[int, object] = {}
    stuck = 0
    while len(out) < len(items):
        running = [w for w in pool if w.current is not None]
        wait = seconds
        if running:
            wait = max(0.0, min(w.started for w in running) + seconds - time.monotonic())
        try:
            position, value = results.get(timeout=min(wait, 1.0) + 0.01)
        except queue.Empty:
            now = time.monotonic()
            for w in running:
                late = w.current
                if late is not None and late not in out and now - w.started >= seconds:
                    out[late] = TimedOut(f"no answer after {seconds:g} s (hung read?)")
                    w.abandoned = True
                    pool.remove(w)
                    stuck += 1
                    if stuck < max_stuck:
                        pool.append(_Worker(fn, tasks, results))
            if stuck >= max_stuck or not pool:
                _give_up(tasks, out, stuck)
            continue
        out.setdefault(position, value)  # an abandoned worker's late answer is dropped
    for _ in pool:
        tasks.put(None)
    return [out[i] for i in range(len(items))]  # type: ignore[misc]


def _give_up(
    tasks: queue.SimpleQueue[tuple[int, T] | None], out: dict[int, object], stuck: int
) -> None:
    """Report every item not yet started as not read: too many reads hung."""
    while True:
        try:
            task = tasks.get_nowait()
        except queue.Empty:
            return
        if task is not None:
            out[task[0]] = TimedOut(f"not read: {stuck} reads hung before it (share unreachable?)")
