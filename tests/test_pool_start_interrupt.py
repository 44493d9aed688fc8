"""A Ctrl-C that lands while the worker pool starts is not lost (the parent ignores SIGINT while it forks).

Checked deterministically: the pool's constructor itself sends the SIGINT, at the worst moment. The hold covers
the main thread: a Ctrl-C the kernel hands to another thread of the parent in that window is still dropped."""

from __future__ import annotations

import multiprocessing
import signal
import threading

import pytest

from prefill_kit.prompts import stream


def _double(x: int) -> int:
    return 2 * x


def test_ctrl_c_while_the_pool_starts_interrupts_once_it_has_started(monkeypatch):
    real = multiprocessing.get_context

    class InterruptedContext:
        def __init__(self, method):
            self.context = real(method)

        def Pool(self, *args, **kwargs):  # noqa: N802 - multiprocessing's name
            # sent inside the window where the parent ignores SIGINT, to the main thread (which holds it blocked):
            # a process-wide kill() could land on a thread an earlier test left, where the hold does not reach
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return self.context.Pool(*args, **kwargs)

    monkeypatch.setattr(stream.multiprocessing, "get_context", InterruptedContext)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a CLI run (a runner may ignore it)
    try:
        with pytest.raises(KeyboardInterrupt):
            list(stream.ordered_map(_double, range(100), 2))
        assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # nothing left blocked
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_pool_maps_in_order_without_an_interrupt():
    assert list(stream.ordered_map(_double, range(100), 2)) == [2 * x for x in range(100)]
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
