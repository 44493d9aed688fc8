"""Tool calls run on a reused worker thread (issue 17, speed): a call that overruns its timeout is an error and
retires its worker, so it never blocks or answers a later call; exceptions stay error messages."""

from __future__ import annotations

import threading
import time

from prefill_kit.grpo.tools import call_with_deadline


def _thread_name() -> int:
    return threading.get_ident()


def _sleep_then(seconds: float, value: str) -> str:
    time.sleep(seconds)
    return value


def _raise() -> None:
    raise ValueError("bad input")


def test_calls_share_one_worker_until_one_overruns():
    first, failed = call_with_deadline(_thread_name, {}, timeout=5)
    assert not failed and first != threading.get_ident()  # not run on the caller's thread
    assert call_with_deadline(_thread_name, {}, timeout=5) == (first, False)  # the same worker again
    assert call_with_deadline(_raise, {}, timeout=5) == ({"error": "ValueError: bad input"}, True)
    assert call_with_deadline(_thread_name, {}, timeout=5) == (first, False)  # an exception keeps the worker
    result, failed = call_with_deadline(_sleep_then, {"seconds": 0.5, "value": "late"}, timeout=0.05)
    assert failed and result == {"error": "Tool _sleep_then timed out after 0.05 s."}
    after, failed = call_with_deadline(_thread_name, {}, timeout=5)
    assert not failed and after != first  # the overrunning worker was retired


def test_a_timed_out_tool_does_not_block_or_answer_later_calls():
    start = time.perf_counter()
    result, failed = call_with_deadline(_sleep_then, {"seconds": 30, "value": "stuck"}, timeout=0.1)
    assert failed and "timed out" in result["error"]
    # the next calls run at once on a new worker, each answered by its own tool
    assert call_with_deadline(_sleep_then, {"seconds": 0, "value": "a"}, timeout=20) == ("a", False)
    assert call_with_deadline(_sleep_then, {"seconds": 0, "value": "b"}, timeout=20) == ("b", False)
    assert time.perf_counter() - start < 15  # not behind the 30 s tool


def test_a_late_result_is_dropped_not_given_to_the_next_call():
    result, failed = call_with_deadline(_sleep_then, {"seconds": 0.3, "value": "late"}, timeout=0.05)
    assert failed
    time.sleep(0.5)  # the abandoned call has returned by now
    assert call_with_deadline(_sleep_then, {"seconds": 0, "value": "fresh"}, timeout=5) == ("fresh", False)


def test_each_calling_thread_has_its_own_worker():
    here, _ = call_with_deadline(_thread_name, {}, timeout=5)
    seen = []
    caller = threading.Thread(target=lambda: seen.append(call_with_deadline(_thread_name, {}, timeout=5)))
    caller.start()
    caller.join()
    assert seen[0][0] != here and not seen[0][1]
