"""Ctrl-C belongs to the parent process: worker processes ignore it.

A terminal sends SIGINT to every process of the foreground group, workers included. A pool worker that
takes it dies mid-task with its own traceback, possibly holding the pool's queue lock, and the parent's
`Pool.terminate()` then waits on that lock forever. So workers ignore SIGINT; the parent alone raises
`KeyboardInterrupt`, unwinds its temp files, and terminates the workers (SIGTERM) on its way out.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def ignore_interrupts() -> None:
    """For a worker's initializer or entry point: SIGINT does nothing in this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def interrupts_ignored_by_new_processes() -> Iterator[None]:
    """Start worker processes inside this block: they inherit SIGINT ignored from their first instruction,
    before any initializer runs. The parent's own handler is restored at the end of the block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change handlers; a worker thread's caller never gets Ctrl-C anyway
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
