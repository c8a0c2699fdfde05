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


# ------------------------------------------------------------------ exact values (issue 23, mutmut)

def _record_os(monkeypatch, events):
    """Wrap os.open / os.fsync / os.replace to log what write_atomic asks of the kernel."""
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace

    def rec_open(path, flags, mode=0o777, **kw):
        fd = real_open(path, flags, mode, **kw)
        events.append(("open", str(path), flags, mode, fd))
        return fd

    def rec_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_size, os.path.isdir(f"/proc/self/fd/{fd}")
                       if os.path.exists("/proc/self/fd") else None))
        return real_fsync(fd)

    def rec_replace(src, dst):
        events.append(("replace", str(src), str(dst), open(src, "rb").read()))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "open", rec_open)
    monkeypatch.setattr(os, "fsync", rec_fsync)
    monkeypatch.setattr(os, "replace", rec_replace)


def test_temp_file_flags_mode_name_fsyncs_and_rename(tmp_path, monkeypatch):
    import re

    events = []
    _record_os(monkeypatch, events)
    path = tmp_path / "new" / "deeper" / "out.bin"  # folders made
    assert write_atomic(str(path), b"12345") == path  # a Path back, for a str in
    monkeypatch.undo()
    (kind, tmp, flags, mode, fd), *rest = events
    want_flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    assert kind == "open" and flags == want_flags and mode == 0o666
    assert re.fullmatch(re.escape(str(path.parent)) + r"/out\.bin\.[0-9a-f]{12}\.tmp", tmp), tmp
    # the data is flushed before the file's fsync; the rename follows; the folder is fsynced last
    assert rest[0][:2] == ("fsync", 5)
    assert rest[1] == ("replace", tmp, str(path), b"12345")
    assert rest[2][0] == "open" and rest[2][1] == str(path.parent) and rest[2][2] == os.O_RDONLY
    assert rest[3][0] == "fsync" and len(rest) == 4
    if rest[3][2] is not None:
        assert rest[3][2] and not rest[0][2]  # a folder, then (before) a file
    with pytest.raises(OSError):
        os.fstat(fd)  # the temporary file's descriptor is closed
    assert os.listdir(path.parent) == ["out.bin"] and path.read_bytes() == b"12345"
    write_atomic(path, "again")  # the folder exists already
    assert path.read_text() == "again"


def test_a_taken_temp_name_is_skipped_and_100_are_given_up_on(tmp_path, monkeypatch):
    real_open, tries = os.open, []

    def taken_once(path, flags, mode=0o777):
        tries.append(str(path))
        if len(tries) == 1:
            raise FileExistsError(path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", taken_once)
    write_atomic(tmp_path / "a.txt", "x")
    monkeypatch.undo()
    assert (tmp_path / "a.txt").read_text() == "x" and len(tries) == 3 and tries[0] != tries[1]

    def always_taken(path, flags, mode=0o777):
        tries.append(str(path))
        raise FileExistsError(path)

    tries.clear()
    monkeypatch.setattr(os, "open", always_taken)
    with pytest.raises(FileExistsError) as info:
        write_atomic(tmp_path / "b.txt", "x")
    monkeypatch.undo()
    assert str(info.value) == f"could not create a unique temporary file beside {tmp_path / 'b.txt'}"
    assert len(tries) == 100 and len(set(tries)) == 100


def test_fdopen_failure_closes_and_removes_the_temp_file(tmp_path, monkeypatch):
    opened = []
    real_open = os.open

    def rec_open(path, flags, mode=0o777):
        opened.append(real_open(path, flags, mode))
        return opened[-1]

    def no_fdopen(fd, mode):
        raise MemoryError("no file object")

    monkeypatch.setattr(os, "open", rec_open)
    monkeypatch.setattr(os, "fdopen", no_fdopen)
    with pytest.raises(MemoryError, match="no file object"):
        write_atomic(tmp_path / "a.txt", "x")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError):
        os.fstat(opened[0])


def test_a_failure_after_the_temp_file_is_gone_still_raises_it(tmp_path, monkeypatch):
    def unlink_then_fail(src, dst):
        os.unlink(src)
        raise OSError("replace failed")

    write_atomic(tmp_path / "a.txt", "old")
    monkeypatch.setattr(os, "replace", unlink_then_fail)
    with pytest.raises(OSError) as info:
        write_atomic(tmp_path / "a.txt", "new")
    monkeypatch.undo()
    assert type(info.value) is OSError and str(info.value) == "replace failed"
    assert os.listdir(tmp_path) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old"


def test_interrupt_removes_the_temp_file(tmp_path):
    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "a.bin", interrupted)
    assert os.listdir(tmp_path) == []
