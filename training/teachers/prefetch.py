"""`Prefetcher`: the background work behind `TeacherSource.prefetch` for the sources that have it (cached, network).

A source submits an upcoming batch's answer under a key built from the request; `topk` with the same request takes
it, and computes the answer itself when nothing was submitted (or it was forgotten). Any error of the background
call is raised by `take`, so it surfaces at `topk` as if `topk` had made the call.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Hashable


class Prefetcher:
    """A thread pool plus the answers submitted to it and not yet taken, keyed by request.

    Args:
        workers: background threads (started on the first `submit`).
        max_pending: answers kept at most; submitting one more forgets the oldest (cancelled when it has not
            started), so prefetches nobody asks for never pile up.
        name: the threads' name prefix (seen in stack dumps and profilers).
    """

    def __init__(self, workers: int, max_pending: int, name: str):
        if workers < 1 or max_pending < 1:
            raise ValueError(f"Prefetcher needs workers >= 1 and max_pending >= 1, got {workers} and {max_pending}")
        self.workers, self.max_pending, self.name = workers, max_pending, name
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[Hashable, Future] = {}  # in submission order: the first one is the oldest
        self._lock = threading.Lock()

    def submit(self, key: Hashable, fn: Callable, *args) -> None:
        """Run `fn(*args)` in the background for `take(key)`; nothing happens when `key` is already pending.
        `args` must not change meanwhile: pass copies of tensors the caller may reuse."""
        with self._lock:
            if key in self._pending:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=self.name)
            self._pending[key] = self._executor.submit(fn, *args)
            while len(self._pending) > self.max_pending:
                self._pending.pop(next(iter(self._pending))).cancel()

    def take(self, key: Hashable):
        """The result submitted under `key` (waiting for it), or None when nothing is pending under it. An exception
        raised by the background call is raised here."""
        with self._lock:
            future = self._pending.pop(key, None)
        return None if future is None else future.result()

    def __len__(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Cancel what has not started, wait for what has, stop the threads. Safe to call twice; a later `submit`
        starts new threads."""
        with self._lock:
            executor, self._executor = self._executor, None
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


__all__ = ["Prefetcher"]
