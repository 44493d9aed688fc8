"""Time-bounded evaluation in worker processes, usable from any thread.

math-verify bounds its time with `signal.alarm`, which only works in the main thread, and some inputs make sympy
hang for minutes. A thread cannot be stopped; a process can. So each task runs in a warm worker process; a task
that overruns its bound is abandoned, its worker killed and replaced, and the task reported as timed out.

Workers are fresh interpreters (`python -m prefill_kit.rewards.worker FD_IN FD_OUT`) talking over inherited
pipes: never `fork` (unsafe once torch or other threads run), and unlike multiprocessing's spawn/forkserver they
do not re-import the caller's `__main__`, so a training script without an `if __name__ == "__main__"` guard works.
They start lazily, stay warm across calls, and tasks with the same key go to the same worker so its per-process
caches (e.g. a parsed gold answer) are hit.
"""

from __future__ import annotations

import atexit
import collections
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

_STARTUP_TIMEOUT_S = 120.0  # importing sympy/math-verify in a fresh worker on a loaded machine
_MAX_FAILED_STARTS = 3  # consecutive workers dying before ready: stop retrying, fail the tasks
DEFAULT_WORKERS_ENV = "PREFILL_KIT_VERIFY_WORKERS"


@dataclass(frozen=True)
class TaskResult:
    value: Any = None
    timed_out: bool = False
    error: str | None = None


class _Worker:
    def __init__(self, warm_modules: Sequence[str]) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefill_kit.rewards.worker", str(to_child_r), str(from_child_w), *warm_modules],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, env=env)
        os.close(to_child_r)
        os.close(from_child_w)
        self.send_conn = Connection(to_child_w, readable=False)
        self.conn = Connection(from_child_r, writable=False)
        self.started_at = time.monotonic()
        self.ready = False
        self.task: int | None = None
        self.task_started = 0.0

    def send(self, message: Any) -> None:
        self.send_conn.send(message)

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            self.send_conn.close()
            self.conn.close()


class VerifyPool:
    """A small pool of warm worker processes with a per-task time bound."""

    def __init__(self, num_workers: int | None = None, warm_modules: Sequence[str] = ()) -> None:
        self.num_workers = max(1, num_workers or default_num_workers())
        self._warm_modules = tuple(warm_modules)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.tasks = 0
        self.timeouts = 0
        self.restarts = 0

    def map(self, fn: Callable, args_list: Sequence[tuple], *, timeout: float,
            keys: Sequence[Hashable] | None = None, max_workers: int | None = None) -> list[TaskResult]:
        """Run `fn(*args)` for each args tuple; each task gets at most `timeout` seconds once a worker starts it.

        `fn` must be importable by reference (a module-level function). Tasks sharing a key go to one worker.
        """
        if not args_list:
            return []
        with self._lock:
            n_workers = max(1, min(self.num_workers, max_workers or self.num_workers, len(args_list)))
            while len(self._workers) < n_workers:
                self._workers.append(_Worker(self._warm_modules))
            return self._run(fn, args_list, keys, timeout, self._workers[:n_workers])

    def start(self, num_workers: int | None = None) -> None:
        """Start workers now and wait until they are ready, so the first batch does not pay for the imports."""
        with self._lock:
            n_workers = max(1, min(self.num_workers, num_workers or self.num_workers))
            while len(self._workers) < n_workers:
                self._workers.append(_Worker(self._warm_modules))
            deadline = time.monotonic() + _STARTUP_TIMEOUT_S
            for worker in self._workers[:n_workers]:
                while not worker.ready and worker.conn.poll(max(0.0, deadline - time.monotonic())):
                    try:
                        worker.ready = worker.conn.recv() == ("ready",)
                    except (EOFError, OSError):
                        break

    def _run(self, fn, args_list, keys, timeout, workers) -> list[TaskResult]:
        queues = [collections.deque() for _ in workers]
        for i in range(len(args_list)):
            key = keys[i] if keys is not None else i
            queues[hash(key) % len(workers)].append(i)
        results: list[TaskResult | None] = [None] * len(args_list)
        remaining = len(args_list)
        failed_starts = 0
        self.tasks += remaining

        def next_task(slot: int) -> int | None:
            if queues[slot]:
                return queues[slot].popleft()
            longest = max(range(len(queues)), key=lambda q: len(queues[q]))
            return queues[longest].pop() if queues[longest] else None  # steal from the back of the longest

        while remaining:
            for slot, worker in enumerate(workers):
                if worker.ready and worker.task is None:
                    task = next_task(slot)
                    if task is not None:
                        worker.task, worker.task_started = task, time.monotonic()
                        worker.send((task, fn, args_list[task]))
            now = time.monotonic()
            deadlines = [w.task_started + timeout if w.ready else w.started_at + _STARTUP_TIMEOUT_S
                         for w in workers if w.task is not None or not w.ready]
            for conn in wait([w.conn for w in workers], timeout=max(0.0, min(deadlines, default=now) - now)):
                slot = next(s for s, w in enumerate(workers) if w.conn is conn)
                worker = workers[slot]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    # The worker died (e.g. a C-level stack overflow): its task fails, the worker is replaced.
                    if worker.task is not None:
                        results[worker.task] = TaskResult(error="worker process died")
                        remaining -= 1
                    failed_starts = 0 if worker.ready else failed_starts + 1
                    if failed_starts >= _MAX_FAILED_STARTS:
                        return self._fail_unfinished(results, "verify worker failed to start")
                    workers[slot] = self._replace(worker)
                    continue
                if message == ("ready",):
                    worker.ready = True
                    continue
                task_id, (status, value) = message
                if task_id == worker.task:
                    results[task_id] = TaskResult(value=value) if status == "ok" else TaskResult(error=value)
                    remaining -= 1
                    worker.task = None
            now = time.monotonic()
            for slot, worker in enumerate(workers):
                overrun = worker.task is not None and now - worker.task_started > timeout
                stuck = not worker.ready and now - worker.started_at > _STARTUP_TIMEOUT_S
                if overrun:
                    results[worker.task] = TaskResult(timed_out=True)
                    remaining -= 1
                    self.timeouts += 1
                if overrun or stuck:
                    workers[slot] = self._replace(worker)
        return results  # type: ignore[return-value]

    def _fail_unfinished(self, results: list[TaskResult | None], reason: str) -> list[TaskResult]:
        for worker in self._workers:
            worker.task = None
        return [r if r is not None else TaskResult(error=reason) for r in results]

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self._warm_modules)
        self._workers[self._workers.index(worker)] = fresh
        self.restarts += 1
        return fresh

    def close(self) -> None:
        with self._lock:
            for worker in self._workers:
                try:
                    worker.send(None)
                except (OSError, ValueError):
                    pass
                worker.kill()
            self._workers = []


def default_num_workers() -> int:
    """`PREFILL_KIT_VERIFY_WORKERS`, else the usable CPU count capped at 8."""
    env = os.environ.get(DEFAULT_WORKERS_ENV)
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


_shared: dict[tuple, VerifyPool] = {}
_shared_lock = threading.Lock()


def shared_pool(num_workers: int | None = None, warm_modules: Sequence[str] = ()) -> VerifyPool:
    """One pool per (size, warm modules) for the whole process, created on first use and closed at exit."""
    key = (num_workers or default_num_workers(), tuple(warm_modules))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = VerifyPool(key[0], warm_modules)
        return _shared[key]


@atexit.register
def _close_shared() -> None:
    for pool in list(_shared.values()):
        pool.close()
    _shared.clear()

