"""The daemon's default executor: worker threads that the process exit does not wait for.

asyncio runs blocking calls, above all ``getaddrinfo()`` (anyio.getaddrinfo, loop.getaddrinfo),
in the loop's default executor. Both ``asyncio.run()`` (``shutdown_default_executor``) and the
interpreter's exit join those threads, so a name lookup stuck on a slow DNS server kept the
process alive for seconds after the daemon had logged that it stopped. Here the threads are
daemon threads that nothing joins: whatever they still wait for ends with the process.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

__all__ = ["DaemonThreadPool"]

P = ParamSpec("P")
T = TypeVar("T")

_Job = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaemonThreadPool(ThreadPoolExecutor):
    """Up to ``max_workers`` daemon threads; ``shutdown()`` never waits for them.

    A `ThreadPoolExecutor` because asyncio's ``set_default_executor`` accepts nothing else;
    its own thread management is not used (threads it starts are joined at exit).
    """

    def __init__(self, max_workers: int = 32) -> None:
        super().__init__(max_workers=max_workers)
        self._limit = max_workers
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        """One token per worker waiting for a job (as in CPython's pool)."""
        self._workers = 0
        self._lock = threading.Lock()
        self._stopped = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._stopped:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._jobs.put((future, fn, args, kwargs))
            if not self._idle.acquire(blocking=False) and self._workers < self._limit:
                self._workers += 1
                threading.Thread(
                    target=self._work, name=f"ostp-client worker {self._workers}", daemon=True
                ).start()
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            del job
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # handed to the waiting coroutine, as CPython does
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking jobs; idle workers end. Never waits (``wait`` is ignored)."""
        with self._lock:
            self._stopped = True
            workers = self._workers
        if cancel_futures:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
        for _ in range(workers):
            self._jobs.put(None)
