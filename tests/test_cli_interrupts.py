"""Ctrl-C and a closed stdout end any command with one line (or none) and an exit code, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROWS = 60_000  # far more than renders in the few seconds before the interrupt on any machine


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": "What is 12 + 30? " * 8}], "answer": "42"}) + "\n"
    path.write_text(line * ROWS, encoding="utf-8")
    return path


def _start(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    # A session of its own, so the SIGINT below reaches the whole group, workers too, as Ctrl-C in a terminal does.
    return subprocess.Popen([sys.executable, "-m", "prefill_kit", *args], cwd=cwd, start_new_session=True,
                            stderr=subprocess.PIPE, **kwargs)


def _wait_for_temp_file(directory: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Rendering has started writing once the output's hidden temp file exists."""
    deadline = time.monotonic() + timeout
    while not any(p.name.endswith(".tmp") for p in directory.iterdir()):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the output's temp file never appeared"
        time.sleep(0.05)


@pytest.mark.timing  # a signal sent at a moment, and a bound on the time to exit
@pytest.mark.parametrize("num_proc", [2, 2, 1])
def test_ctrl_c_mid_render_exits_130_with_one_line_and_no_temp_files(big_input, tiny_model_dir, tmp_path, num_proc):
    process = _start(["render", str(big_input), "--tokenizer", str(tiny_model_dir), "--num-proc", str(num_proc),
                      "-o", str(tmp_path / "out.jsonl")], cwd=tmp_path, stdout=subprocess.DEVNULL)
    _wait_for_temp_file(tmp_path, process)
    time.sleep(0.3)  # well inside the render loop, workers busy
    os.killpg(process.pid, signal.SIGINT)
    sent = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("render did not exit within 20 s of Ctrl-C")
    assert time.monotonic() - sent < 10
    assert process.returncode == 130
    assert stderr.decode() == "prefill-kit render: interrupted\n"  # no worker tracebacks
    assert list(tmp_path.iterdir()) == []  # no output, no temp file, no rejects


@pytest.mark.parametrize("num_proc", [1, 2])
def test_closed_stdout_exits_quietly(big_input, tmp_path, num_proc):
    process = _start(["render", str(big_input), "--num-proc", str(num_proc), "-o", "-"], cwd=tmp_path,
                     stdout=subprocess.PIPE)
    first = process.stdout.readline()  # as `| head -1` does: one line, then the reader goes away
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert json.loads(first)["prompt"].startswith("<|im_start|>user\nWhat is 12 + 30?")
    assert stderr.decode() == ""
    assert process.returncode == 141  # 128 + SIGPIPE, as a shell reports a writer killed by the closed pipe
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("taken_by", ["main thread", "another thread"])
def test_a_ctrl_c_while_the_workers_fork_reaches_the_parent_when_they_have_started(taken_by):
    """The parent holds Ctrl-C while it forks its pool (under load that takes a while), never drops it: ignoring
    SIGINT there lost a Ctrl-C and the render ran to the end (exit 0 instead of 130). A thread other than the main
    one may take a signal sent to the process (the tokenizers' pool): both ways in are tried."""
    from prefill_kit.interrupts import signals_held_for_new_workers

    before = signal.getsignal(signal.SIGINT)
    other = threading.Thread(target=time.sleep, args=(2,), daemon=True)
    other.start()
    reached_the_end_of_the_block = False
    with pytest.raises(KeyboardInterrupt):
        with signals_held_for_new_workers():
            signal.pthread_kill(threading.get_ident() if taken_by == "main thread" else other.ident, signal.SIGINT)
            time.sleep(0.2)  # a SIGINT handled as usual would have raised by now
            reached_the_end_of_the_block = True
    assert reached_the_end_of_the_block
    assert signal.getsignal(signal.SIGINT) is before


def test_a_ctrl_c_sent_to_a_worker_before_its_initializer_is_dropped():
    """A worker forked in the block records a SIGINT until its initializer ignores SIGINT: a terminal's Ctrl-C
    reaching the group then neither kills it nor prints a traceback; afterwards SIGINT is ignored."""
    from prefill_kit.interrupts import ignore_interrupts, leave_signals_to_parent, signals_held_for_new_workers

    parent = os.getpid()
    with signals_held_for_new_workers():
        pid = os.fork()
        if pid == 0:  # exit code: 0 alive and SIGINT ignored after the initializer; 1 not ignored; 2 raised
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
                ignore_interrupts()
                leave_signals_to_parent(parent)
                os._exit(0 if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 1)
            except BaseException:
                os._exit(2)
    status = os.waitpid(pid, 0)[1]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_verify_workers_leave_ctrl_c_to_their_parent():
    from prefill_kit.rewards.verify_pool import VerifyPool

    pool = VerifyPool(1)
    try:
        pool.start()
        worker = pool._workers[0].process
        os.kill(worker.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends the whole process group
        time.sleep(0.5)
        assert worker.poll() is None  # still alive: the parent stops it on its way out
        assert pool.map(abs, [(-3,)], timeout=30)[0].value == 3
    finally:
        pool.close()


@pytest.mark.parametrize("to_group", [True, False], ids=["timeout-style group", "parent only"])
def test_sigterm_mid_render_exits_143_with_one_line_and_no_temp_files(big_input, tiny_model_dir, tmp_path, to_group):
    """SIGTERM (`timeout`, a job scheduler) unwinds as Ctrl-C does (issue 18): no worker BrokenPipe tracebacks, no
    `.tmp` output left behind, exit 143. `timeout` signals the whole group; `kill PID` only the parent."""
    process = _start(["render", str(big_input), "--tokenizer", str(tiny_model_dir), "--num-proc", "2",
                      "-o", str(tmp_path / "out.jsonl")], cwd=tmp_path, stdout=subprocess.DEVNULL)
    _wait_for_temp_file(tmp_path, process)
    time.sleep(0.3)
    (os.killpg if to_group else os.kill)(process.pid, signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("render did not exit within 20 s of SIGTERM")
    assert process.returncode == 143
    assert stderr.decode() == "prefill-kit render: terminated\n"
    assert list(tmp_path.iterdir()) == []


def test_forked_workers_take_sigterm_only_from_their_parent():
    """A forked worker must not inherit the parent's SIGTERM-as-interrupt handler; it holds a group SIGTERM
    blocked until its initializer leaves the group, then keeps the default action (the pool stops it with
    SIGTERM). The parent's handler and signal mask are as they were after the block."""
    from prefill_kit.interrupts import ignore_interrupts, signals_held_for_new_workers, sigterm_as_interrupt

    def term_blocked() -> bool:
        return signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])

    with sigterm_as_interrupt():
        handler = signal.getsignal(signal.SIGTERM)
        with signals_held_for_new_workers():
            pid = os.fork()
            if pid == 0:  # the child reports in its exit code: SIGTERM blocked at birth, default action after
                inherited = term_blocked()
                ignore_interrupts()
                os._exit(inherited + 2 * (signal.getsignal(signal.SIGTERM) is signal.SIG_DFL))
        assert signal.getsignal(signal.SIGTERM) is handler and not term_blocked()
    assert os.waitpid(pid, 0)[1] >> 8 == 3


def test_a_sigterm_sent_before_the_workers_initializer_still_ends_it():
    """A pool closed right after it started sends SIGTERM to a worker whose initializer has not run yet: the
    signal must wait (blocked), not be lost (ignored), or `Pool.terminate()` waits for that worker forever."""
    from prefill_kit.interrupts import ignore_interrupts, leave_signals_to_parent, signals_held_for_new_workers

    parent = os.getpid()
    read, write = os.pipe()
    with signals_held_for_new_workers():
        pid = os.fork()
        if pid == 0:  # a worker before its initializer: wait for the parent's go, then initialize, then idle
            os.read(read, 1)
            ignore_interrupts()
            leave_signals_to_parent(parent)
            time.sleep(5)
            os._exit(0)  # reached only if the SIGTERM was lost
    os.kill(pid, signal.SIGTERM)
    os.write(write, b"x")
    status = os.waitpid(pid, 0)[1]
    os.close(read), os.close(write)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def test_a_pool_worker_leaves_the_parents_process_group():
    """Deterministic half of the SIGTERM test above: after its initializer, a worker is the leader of its own
    process group, so a group signal (`timeout`, Ctrl-C) cannot kill it while it holds the pool's queue lock."""
    from prefill_kit.interrupts import leave_signals_to_parent

    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child reports in its exit code: 0 its own group, 1 still the parent's, 2 raised
        try:
            leave_signals_to_parent(parent)
            os._exit(0 if os.getpgid(0) == os.getpid() != os.getpgid(parent) else 1)
        except BaseException:
            os._exit(2)
    assert os.waitpid(pid, 0)[1] >> 8 == 0
