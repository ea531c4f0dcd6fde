"""Daemon threads that read and decode files in order and never hold the process."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
A = TypeVar("A")


class DecodeThreads:
    """A pool of daemon threads for decoding: a read that never returns (a hung network mount,
    a stuck device) can hold one of them, never the process.

    concurrent.futures' threads are joined at shutdown and at interpreter exit, so one blocked
    read made Ctrl-C and SIGTERM wait forever. Here nothing ever waits for a thread: shutdown()
    cancels what has not started and leaves the threads to end (or be dropped at exit).
    """

    def __init__(self, workers: int, name: str = "tlbuild-decode") -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple] | None] = (
            queue.SimpleQueue()
        )
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)
            else:
                future.set_result(result)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run fn(*args) on a free thread; its result (or exception) arrives in the Future."""
        future: Future[T] = Future()
        self._jobs.put((future, fn, args))
        return future

    def imap(self, fn: Callable[[A], T], items: Iterable[A], ahead: int) -> Iterator[T]:
        """fn over items in order, at most `ahead` of them submitted beyond the one waited on."""
        window: deque[Future[T]] = deque()
        for item in items:
            window.append(self.submit(fn, item))
            if len(window) > ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def shutdown(self) -> None:
        """Cancel the work not started and let the threads end; never waits for one."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)

    def __enter__(self) -> DecodeThreads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
