"""Reading inputs never blocks: real FIFOs, sockets, devices, links and blocked reads (engine.inputs.reader)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from engine.errors import DecodeError
from engine.faults import StorageFault
from engine.inputs.reader import ReaderPool, read_file, read_files, read_regular_file


def _message(path: str | Path, **kwargs) -> str:
    with pytest.raises(DecodeError) as info:
        read_file(path, **kwargs)
    return str(info.value)


def test_a_regular_file_is_read_whole(tmp_path: Path) -> None:
    data = os.urandom(5 << 20) + b"tail"  # more than one chunk
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "empty.png").write_bytes(b"")
    assert read_file(tmp_path / "a.png") == data
    assert read_file(tmp_path / "empty.png") == b""  # inspection then says "empty file"
    os.symlink(tmp_path / "a.png", tmp_path / "link.png")
    assert read_file(tmp_path / "link.png") == data  # links to files are followed


def test_entries_that_are_not_regular_files_are_named_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.png")  # opening it for reading would block until a writer came
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "s.png"))
    (tmp_path / "d.png").mkdir()
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
    os.symlink("loop.png", tmp_path / "loop.png")
    os.symlink(tmp_path / "x.png", tmp_path / "to_fifo.png")
    try:
        assert "is a FIFO (named pipe)" in _message(tmp_path / "x.png")
        assert "is a FIFO" in _message(tmp_path / "to_fifo.png")
        assert "is a socket" in _message(tmp_path / "s.png")
        assert "is a character device" in _message("/dev/zero")  # would never end if it were read
        assert "is a folder" in _message(tmp_path / "d.png")
        assert "broken symbolic link" in _message(tmp_path / "broken.png") and "gone.png" in _message(
            tmp_path / "broken.png"
        )
        assert "symbolic link loop" in _message(tmp_path / "loop.png")
    finally:
        server.close()


def test_paths_no_file_can_have(tmp_path: Path) -> None:
    (tmp_path / "file.png").write_bytes(b"x")
    assert _message(tmp_path / "missing.png") == "file not found"
    assert "a part of the path is a file" in _message(tmp_path / "file.png" / "x.png")
    assert "NUL character" in _message(str(tmp_path / "a\0b.png"))
    assert "path too long" in _message(tmp_path / ("n" * 300 + ".png"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file whatever its permissions")
def test_permission_denied(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(b"x")
    path.chmod(0)
    assert "permission denied" in _message(path)


def test_a_file_larger_than_any_image_allowed_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "sparse.png"
    with open(path, "wb") as fh:
        fh.truncate(1 << 40)  # 1 TiB, sparse: reading it would take hours
    assert "larger than any image" in _message(path, max_bytes=1 << 30)


def test_a_read_past_its_deadline_is_given_up_and_stops(tmp_path: Path) -> None:
    """A 1 GiB read cannot finish in 20 ms: it becomes an error and its thread stops at the next chunk."""
    path = tmp_path / "big.png"
    with open(path, "wb") as fh:
        fh.truncate(1 << 30)
    pool = ReaderPool(threads=2, max_stuck=4)
    with pytest.raises(DecodeError, match=r"did not finish within 0.02 s \(--read-timeout\)"):
        pool.run(lambda cancel: read_regular_file(str(path), None, cancel), 0.02)
    deadline = time.monotonic() + 60
    while pool.stuck and time.monotonic() < deadline:  # the cancelled read leaves at its next chunk
        time.sleep(0.01)
    assert pool.stuck == 0
    assert pool.run(lambda cancel: b"next", 5.0) == b"next"


def test_reads_blocked_in_the_kernel_cost_a_thread_each_and_are_bounded() -> None:
    """Reads blocked forever in a syscall (as on a hung NFS mount): each times out, reading goes on on
    replacement threads, and one stuck read more than the pool allows is a machine fault."""
    pool = ReaderPool(threads=2, max_stuck=2)
    read_end, write_end = os.pipe()  # nothing is written until the end: os.read blocks in the kernel
    try:
        for _ in range(2):
            with pytest.raises(DecodeError, match="did not finish within"):
                pool.run(lambda _cancel: os.read(read_end, 1), 0.05)
            assert pool.run(lambda _cancel: b"ok", 5.0) == b"ok"  # a healthy read right after still works
        assert pool.stuck == 2
        with pytest.raises(StorageFault, match="input storage is not answering: 3 reads are stuck"):
            pool.run(lambda _cancel: os.read(read_end, 1), 0.05)
    finally:
        os.write(write_end, b"123")  # the kernel returns: the stuck threads finish and leave
        deadline = time.monotonic() + 30
        while pool.stuck and time.monotonic() < deadline:
            time.sleep(0.01)
        os.close(write_end)
        os.close(read_end)
    assert pool.stuck == 0
    assert pool.run(lambda _cancel: b"again", 5.0) == b"again"
    alive = [t for t in threading.enumerate() if t.name.startswith("vade-reader-")]
    assert alive  # the pool serves on


def test_a_batch_is_read_in_parallel_with_one_result_per_path(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"A")
    (tmp_path / "b.png").write_bytes(b"B")
    os.mkfifo(tmp_path / "f.png")
    results = read_files([tmp_path / "a.png", None, tmp_path / "f.png", tmp_path / "no.png", tmp_path / "b.png"])
    assert results[0] == b"A" and results[1] is None and results[4] == b"B"
    assert isinstance(results[2], DecodeError) and "FIFO" in str(results[2])
    assert isinstance(results[3], DecodeError) and str(results[3]) == "file not found"


def test_fit_and_calibration_read_the_same_way(tmp_path: Path) -> None:
    """engine.api.iter_image_batches (fit, calibration) skips a FIFO with its reason instead of blocking."""
    from imagegen import png_bytes

    from engine.api import iter_image_batches

    (tmp_path / "good.png").write_bytes(png_bytes(32, 32))
    os.mkfifo(tmp_path / "fifo.png")
    skipped: list[tuple[str, str]] = []
    batches = list(iter_image_batches([tmp_path / "fifo.png", tmp_path / "good.png"], 16, 8, skipped, read_timeout=5.0))
    assert [tuple(b.shape) for b in batches] == [(1, 3, 16, 16)]
    assert skipped == [(str(tmp_path / "fifo.png"), "is a FIFO (named pipe), not an image file: only regular files are read")]


def test_a_file_that_grows_while_it_is_read_is_refused(tmp_path: Path) -> None:
    """A 64 MiB file appended to all the while (a copy still running): its read sees the size change."""
    path = tmp_path / "growing.png"
    with open(path, "wb") as fh:
        fh.truncate(64 << 20)
    stop = threading.Event()

    def append() -> None:
        with open(path, "ab") as fh:
            while not stop.is_set():
                fh.write(b"x")
                fh.flush()

    writer = threading.Thread(target=append, daemon=True)
    writer.start()
    try:
        messages = []
        for _ in range(5):  # the appender could, in principle, be descheduled for a whole read
            try:
                read_file(path)
            except DecodeError as exc:
                messages.append(str(exc))
                break
    finally:
        stop.set()
        writer.join()
    assert messages and "changed while it was read" in messages[0] and "still being written" in messages[0]
