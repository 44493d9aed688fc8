"""A Ctrl-C that lands while the worker pool starts is not lost (the parent ignores SIGINT while it forks).

Checked deterministically: the pool's constructor itself sends the SIGINT, at the worst moment."""

from __future__ import annotations

import multiprocessing
import os
import signal

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
            os.kill(os.getpid(), signal.SIGINT)  # sent inside the window where the parent ignores SIGINT
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
