"""Entry point of a verify-pool worker process: `python -m prefill_kit.rewards.worker FD_IN FD_OUT [MODULE...]`.

Kept apart from `verify_pool` (and stdlib-only at import) so that running it does not re-import the pool module.
It imports (and warms) the warm modules, says ready, then runs `(task_id, fn, args)` requests one at a time
until told to stop.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection


def _worker_main(recv_conn: Connection, conn: Connection, warm_modules: Sequence[str]) -> None:
    for name in warm_modules:
        # "module" is imported; "module:function" is also called once (e.g. to load a parser's grammar).
        module_name, _, function = name.partition(":")
        module = importlib.import_module(module_name)
        if function:
            getattr(module, function)()
    conn.send(("ready",))
    while True:
        try:
            message = recv_conn.recv()
        except EOFError:
            return
        if message is None:
            return
        task_id, fn, args = message
        try:
            outcome = ("ok", fn(*args))
        except BaseException as exc:  # noqa: BLE001 - a task's failure is reported, never kills the worker loop
            outcome = ("error", f"{type(exc).__name__}: {str(exc)[:300]}")
        try:
            conn.send((task_id, outcome))
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable result
            conn.send((task_id, ("error", f"unsendable result: {type(exc).__name__}")))


if __name__ == "__main__":
    from prefill_kit.interrupts import ignore_interrupts

    ignore_interrupts()  # Ctrl-C is the parent's: it kills its workers on the way out
    _worker_main(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False),
                 sys.argv[3:])
