"""The one atomic writer (``vmae_fast.checkpoint.write_atomic``, ``save_atomic`` on top): unique
temporary files, so concurrent writers to one path never collide; a failure leaves the old file
and no temporary file; the mode of a plain ``open()`` (``0o666`` less the umask), the umask
itself untouched."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from vmae_fast import save_atomic
from vmae_fast.checkpoint import write_atomic


def _run_threads(n, target):
    start = threading.Barrier(n)
    errors = []

    def run(i):
        try:
            start.wait()
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_writers_to_one_path_do_not_collide(tmp_path):
    path = tmp_path / "result.json"
    payloads = [bytes([65 + i]) * (256 * 1024) for i in range(4)]  # big enough for the writes to overlap
    umask = os.umask(0o022)
    os.umask(umask)

    def writer(i):
        for _ in range(15):
            write_atomic(path, payloads[i])

    assert _run_threads(4, writer) == []
    assert path.read_bytes() in payloads  # whole, from one writer: never a mix, never half
    assert os.listdir(tmp_path) == ["result.json"], "temporary files left behind"
    assert os.umask(umask) == umask, "the process umask was changed"


def test_concurrent_save_atomic(tmp_path):
    path = tmp_path / "ck.pt"

    def writer(i):
        for step in range(10):
            save_atomic({"writer": i, "step": step, "w": torch.full((64, 64), float(i))}, path)

    assert _run_threads(3, writer) == []
    obj = torch.load(path, weights_only=True)
    assert obj["step"] == 9 and torch.equal(obj["w"], torch.full((64, 64), float(obj["writer"])))
    assert os.listdir(tmp_path) == ["ck.pt"]


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_failure_keeps_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, where):
    path = tmp_path / "latest.txt"
    write_atomic(path, "old")

    def half_then_fail(f):
        f.write(b"new, but only ha")
        raise OSError("disk full")

    data = half_then_fail if where == "write" else "new"
    if where in ("fsync", "replace"):
        def boom(*a, **k):
            raise OSError(f"{where} failed")
        monkeypatch.setattr(os, where, boom)
    with pytest.raises(OSError):
        write_atomic(path, data)
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["latest.txt"], "temporary file left behind"


def test_mode_follows_the_umask_and_text_bytes_callables(tmp_path):
    old = os.umask(0o027)
    try:
        p = write_atomic(tmp_path / "sub" / "a.txt", "héllo")  # folders are made
        assert os.umask(0o027) == 0o027, "the process umask was changed"
    finally:
        os.umask(old)
    assert p == tmp_path / "sub" / "a.txt" and p.read_text(encoding="utf-8") == "héllo"
    assert p.stat().st_mode & 0o777 == 0o640, oct(p.stat().st_mode)
    write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    write_atomic(p, lambda f: f.write(b"xyz"))
    assert p.read_bytes() == b"xyz"
    assert sorted(os.listdir(p.parent)) == ["a.txt"]
