"""Ctrl-C belongs to the parent process: worker processes ignore it.

A terminal sends SIGINT to every process of the foreground group, workers included. A pool worker that
takes it dies mid-task with its own traceback, possibly holding the pool's queue lock, and the parent's
`Pool.terminate()` then waits on that lock forever. So workers ignore SIGINT; the parent alone raises
`KeyboardInterrupt`, unwinds its temp files, and terminates the workers (SIGTERM) on its way out.

SIGTERM (`timeout`, a job scheduler, `kill`) takes the same path: `sigterm_as_interrupt` turns it into
`Terminated`, a `KeyboardInterrupt`, in the parent, and the CLI exits 143 (128 + SIGTERM) after the unwinding.
A forked pool worker cannot simply ignore SIGTERM (the pool stops it with SIGTERM), and must not die of one
sent to the whole group (`timeout` does that): killed while it holds the pool's queue lock, it hangs the
parent's `Pool.terminate()` as above. So it starts with SIGTERM blocked (`signals_held_for_new_workers`), and
`leave_signals_to_parent` moves it into a process group of its own, where group signals do not reach it, asks the
kernel to kill it when its parent dies, and unblocks SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every `except KeyboardInterrupt` and `finally`
    unwinds it the same way (temp files removed, workers stopped)."""


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: a second must not cut the unwinding short
    raise Terminated


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside this block SIGTERM raises `Terminated` in the main thread; the old handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_interrupts() -> None:
    """For a worker's initializer or entry point: SIGINT does nothing in this process, and SIGTERM ends it
    (a forked worker would otherwise inherit the parent's `Terminated` handler and print a traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def leave_signals_to_parent(parent: int) -> None:
    """For a forked pool worker's initializer (after `ignore_interrupts`): signals sent to the group (Ctrl-C,
    `timeout`'s SIGTERM, a closed terminal's SIGHUP) reach only the parent, which stops its workers when it has
    unwound; the worker dies with its parent (Linux's PR_SET_PDEATHSIG) if the parent is killed outright."""
    import ctypes
    import os
    import sys

    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request above: nobody is left to stop us
        os._exit(1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a SIGTERM already sent ends it now


@contextmanager
def signals_held_for_new_workers() -> Iterator[None]:
    """Fork worker processes inside this block: a Ctrl-C or SIGTERM that arrives meanwhile is held, never lost,
    by the parent and by the new workers, until each is ready for it.

    - The parent: a Ctrl-C that lands while the pool forks (under load, long enough to matter) is recorded by a
      stand-in handler (whichever thread the kernel gives it to, Python runs handlers here) and re-raised when
      the block ends. Ignoring SIGINT here, as before, lost it, and the render ran to the end (exit 0, not 130).
    - A new worker inherits the stand-in handler, so a Ctrl-C sent to the group before its initializer runs is
      recorded in the worker and dropped there. It starts with SIGTERM blocked (forked from this thread or from
      the pool's threads, started here and so blocking it too), and a SIGTERM it holds still ends it once
      `leave_signals_to_parent` unblocks it. Ignoring SIGTERM instead lost the pool's own SIGTERM to a worker
      closed before its initializer ran, and `Pool.terminate()` waited forever.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread takes Ctrl-C; a worker thread's caller never gets it anyway
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if held:
            signal.raise_signal(signal.SIGINT)
