"""A Ctrl-C that lands while the render's worker pool starts is not lost, and the workers started so far end.

Checked deterministically: the pool's constructor itself sends the SIGINT, at the worst moment."""

from __future__ import annotations

import multiprocessing
import signal
import threading

import pytest

from prefill_kit.prompts import stream


def _double(x: int) -> int:
    return 2 * x


def test_ctrl_c_while_the_pool_starts_interrupts_once_it_has_started_and_stops_its_workers(monkeypatch):
    real = multiprocessing.get_context
    pools = []

    class InterruptedContext:
        def __init__(self, method):
            self.context = real(method)

        def Pool(self, *args, **kwargs):  # noqa: N802 - multiprocessing's name
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # lands while the pool forks
            pools.append(self.context.Pool(*args, **kwargs))
            return pools[-1]

    monkeypatch.setattr(stream.multiprocessing, "get_context", InterruptedContext)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a CLI run (a runner may ignore it)
    try:
        with pytest.raises(KeyboardInterrupt):
            list(stream.ordered_map(_double, range(100), 2))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    workers = pools[0]._pool
    assert len(workers) == 2 and all(w.exitcode is not None for w in workers)  # terminated and joined


def test_the_pool_maps_in_order_without_an_interrupt():
    assert list(stream.ordered_map(_double, range(100), 2)) == [2 * x for x in range(100)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
