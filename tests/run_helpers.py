"""What the training tests share: a crash at a chosen step, and subprocess runs in their own
process group (torchrun's workers are killed with the group on a timeout, which a plain
``subprocess.run`` timeout would leave running)."""
from __future__ import annotations

import os
import signal
import subprocess
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


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """``(returncode, output)`` of ``proc``; past ``timeout`` its whole group is killed and the test fails."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the command did not finish in {timeout} s:\n{out[-6000:]}")
    return proc.returncode, out
