"""What the training tests share: a crash at a chosen step, and subprocess runs in their own
process group (torchrun's workers are killed with the group on a timeout, which a plain
``subprocess.run`` timeout would leave running)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class Crash(Exception):
    pass


def crash_at(step: int):
    """An ``on_step`` hook that raises ``Crash`` once step ``step`` is done."""
    def on_step(done, loss):
        if done == step:
            raise Crash
    return on_step


def start_group(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    """``cmd`` from the repository root in a new process group, stdout and stderr as one text."""
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (from ``/proc``)."""
    kids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(p.name))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to ``proc``'s process group and to the sessions of its children: torchrun starts
    each worker in a session of its own, so the group alone would leave them running, holding
    the output pipe open (and ``communicate`` waiting for them)."""
    for pid in [proc.pid, *children(proc.pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """``(returncode, output)`` of ``proc``; past ``timeout`` it is killed with its workers and
    the test fails."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = "(no output: a process outside the group still holds the pipe)"
        pytest.fail(f"the command did not finish in {timeout} s:\n{out[-6000:]}")
    return proc.returncode, out


@contextlib.contextmanager
def killed_after(*procs: subprocess.Popen):
    """Inside, ``procs`` run; after (the test done or failed), any still running is killed with
    its workers, so that a failed assertion leaves no run behind loading the machine."""
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_group(proc)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=30)


def fail_if_ended_or_late(proc: subprocess.Popen, deadline: float, what: str) -> None:
    """While polling a process for a file it should write: the test fails (the process killed
    with its workers) when it ended first or ``deadline`` (``time.monotonic()``) has passed."""
    if proc.poll() is None and time.monotonic() < deadline:
        return
    ended = proc.poll() is not None
    kill_group(proc)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        out, err = "", "(no output)"
    log = "".join(x for x in (out, err) if x)
    pytest.fail(f"the command {'ended' if ended else 'was still running'} before {what}:\n{log[-6000:]}")


def interrupted_when(cmd: list[str], ready, what: str, env: dict | None = None,
                     timeout: float = 120) -> tuple[int, str]:
    """Ctrl-C, for real: ``cmd`` from the repository root in a session of its own, SIGINT to its
    whole group once ``ready()`` (``what`` names it), ``(returncode, stderr)`` once it stopped.
    It fails the test, killed with its workers, if it ends first or misses ``timeout``."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    with killed_after(proc):
        deadline = time.monotonic() + timeout
        while not ready():
            fail_if_ended_or_late(proc, deadline, what)
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err
