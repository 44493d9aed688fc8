"""Ctrl-C belongs to the parent process: worker processes ignore it.

A terminal sends SIGINT to every process of the foreground group, workers included. A pool worker that
takes it dies mid-task with its own traceback, possibly holding the pool's queue lock, and the parent's
`Pool.terminate()` then waits on that lock forever. So workers ignore SIGINT; the parent alone raises
`KeyboardInterrupt`, unwinds its temp files, and terminates the workers (SIGTERM) on its way out.

SIGTERM (`timeout`, a job scheduler, `kill`) takes the same path: `sigterm_as_interrupt` turns it into
`Terminated`, a `KeyboardInterrupt`, in the parent, and the CLI exits 143 (128 + SIGTERM) after the unwinding.
A forked pool worker cannot simply ignore SIGTERM (the pool stops it with SIGTERM), and must not die of one
sent to the whole group (`timeout` does that): killed while it holds the pool's queue lock, it hangs the
parent's `Pool.terminate()` as above. So it starts with SIGTERM blocked, and `leave_signals_to_parent` moves it
into a process group of its own, where group signals do not reach it, asks the kernel to kill it when its
parent dies, and unblocks SIGTERM.
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
def interrupts_ignored_by_new_processes() -> Iterator[None]:
    """Start worker processes inside this block: they inherit SIGINT ignored from their first instruction,
    before any initializer runs. The parent's own handler is restored at the end of the block.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change handlers; a worker thread's caller never gets Ctrl-C anyway
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Until its initializer leaves the group, a new worker holds SIGTERM blocked (pending, not lost): a group
    # SIGTERM cannot kill it then, and the pool's own SIGTERM, sent before the initializer ran (a pool closed
    # right after it started), still ends it once `leave_signals_to_parent` unblocks it. Ignoring it instead
    # lost that SIGTERM, and `Pool.terminate()` waited forever for the worker. The pool's own threads, started
    # here too, keep it blocked, so the workers they start to replace dead ones begin the same way.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
