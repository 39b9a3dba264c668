"""Reading input files so that nothing blocks: regular files only, and every read with a deadline.

    data = read_file(path, timeout=60.0)              # bytes; DecodeError saying what is wrong
    results = read_files(paths, timeout=60.0)         # a batch, read in parallel: bytes | Exception each

Regular files only. The entry is stat-ed first (following links) and anything else becomes a
DecodeError naming what it is, without being opened: a FIFO (opening one blocks until a writer
comes), a socket, a device (opening one can have effects), a folder, a broken or looping link. The
file is then opened with O_NONBLOCK, so an entry swapped for a FIFO after the stat cannot block the
open, and fstat-ed again before reading. Exactly the size fstat reported is read, in chunks; a file
whose size or modification time changes during the read is refused as still being written, and one
larger than any image within --max-pixels could be (max_file_bytes) is refused unread.

Deadline. Reads run in a small process-wide pool of reader threads (READER_THREADS); the caller waits
at most `timeout` seconds from the moment a read starts, then gives the file an error row and goes
on. A late read that is still making progress sees its cancel flag at the next chunk and stops. One
blocked in the kernel (a hung NFS server) keeps its thread until the kernel returns: the pool starts
a replacement so reading goes on, and the stuck thread exits when its call returns. A thread stuck
forever holds one file descriptor and an idle stack until the process ends (it is a daemon thread:
it does not delay the exit). At most MAX_STUCK_READS threads may be stuck at once; one more means
the storage is not answering, a machine fault (StorageFault, exit 8) rather than a run of error rows.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.errors import DecodeError
from engine.faults import OutOfMemory, StorageFault
from engine.inputs.settings import DEFAULT_READ_TIMEOUT_S

READ_CHUNK = 4 << 20  # bytes per read call: a late read notices its cancel flag at least this often
READER_THREADS = 4  # parallel reads of one batch (they also hide network-storage latency)
MAX_STUCK_READS = 16  # reads past their deadline at once before the storage counts as not answering
POLL_S = 0.05  # how often a waiting caller looks for reads past their deadline

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def max_file_bytes(max_pixels: int) -> int:
    """The largest file an image within max_pixels can be: 32 bytes a pixel (float64 RGBA, uncompressed)
    plus 64 MiB of metadata. A bigger file is refused before it is read."""
    return 32 * max_pixels + (64 << 20)


class _Cancelled(Exception):
    pass


def _os_error(path: str, exc: OSError) -> DecodeError:
    """What an OSError on opening or reading an input means, in words (a machine fault is raised)."""
    code = exc.errno
    if code in (errno.EMFILE, errno.ENFILE):
        raise StorageFault(f"out of file descriptors while reading inputs ({exc.strerror}); raise the limit (ulimit -n)")
    if code == errno.ENOMEM:
        raise OutOfMemory(f"out of memory while reading inputs ({exc.strerror})")
    if code == errno.ENOENT:
        if os.path.islink(path):
            try:
                return DecodeError(f"broken symbolic link: it points to {os.readlink(path)!r}, which does not exist")
            except OSError:
                pass
        return DecodeError("file not found")
    messages = {
        errno.ELOOP: "symbolic link loop: following its links never reaches a file",
        errno.ENOTDIR: "file not found: a part of the path is a file, not a folder",
        errno.EACCES: "permission denied: this process may not read the file",
        errno.EPERM: "permission denied: this process may not read the file",
        errno.ENAMETOOLONG: "path too long for the file system (a name over 255 bytes or a path over 4096)",
        errno.EAGAIN: "the file is held by another program (a lease); scan it again later",
    }
    if code in messages:
        return DecodeError(messages[code])
    return DecodeError(f"cannot read the file: {exc.strerror or exc}")


def _not_regular(mode: int) -> DecodeError:
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return DecodeError(f"is {kind}, not an image file: only regular files are read")


def _check(st: os.stat_result, max_bytes: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(st.st_mode)
    if max_bytes is not None and st.st_size > max_bytes:
        raise DecodeError(
            f"file is {st.st_size} bytes, larger than any image within --max-pixels can be ({max_bytes} bytes); "
            "raise --max-pixels if it really is one image"
        )


def _read_exactly(fd: int, size: int, cancel: threading.Event | None) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        chunk = os.read(fd, min(READ_CHUNK, size - got))
        if not chunk:
            raise DecodeError(
                f"the file shrank while it was read ({size} bytes when opened, {got} there); "
                "it is being rewritten: scan it again once it is complete"
            )
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_regular_file(path: str, max_bytes: int | None = None, cancel: threading.Event | None = None) -> bytes:
    """The bytes of a regular file, in the calling thread (no deadline: see read_file)."""
    try:
        _check(os.stat(path), max_bytes)  # before opening: never open a FIFO or a device
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except ValueError:
        raise DecodeError("the path contains a NUL character: no file can have that name") from None
    except OSError as exc:
        raise _os_error(path, exc) from None
    try:
        before = os.fstat(fd)
        _check(before, max_bytes)  # the entry may have been swapped after the stat
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        data = _read_exactly(fd, before.st_size, cancel)
        after = os.fstat(fd)
    except OSError as exc:
        raise _os_error(path, exc) from None
    finally:
        os.close(fd)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise DecodeError(
            f"the file changed while it was read ({before.st_size} bytes when opened, {after.st_size} after); "
            "it is still being written: scan it again once it is complete"
        )
    return data


# -- the pool ----------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Job:
    fn: Callable[[threading.Event], Any]
    timeout: float
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None  # set when a thread starts it
    abandoned: bool = False
    value: Any = None
    error: BaseException | None = None


class ReaderPool:
    """Threads that run reads; `run` waits for one at most `timeout` s after it starts.

    `threads` serve the queue; a read past its deadline is abandoned, its thread counted as stuck and
    replaced. More than `max_stuck` stuck at once raises StorageFault.
    """

    def __init__(self, threads: int = READER_THREADS, max_stuck: int = MAX_STUCK_READS):
        self.threads, self.max_stuck = threads, max_stuck
        self.stuck = 0
        self._live = 0  # threads serving the queue, stuck ones not counted
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._running: set[_Job] = set()
        self._lock = threading.Lock()
        self._spawned = 0

    def _spawn(self) -> None:  # with the lock held
        self._live += 1
        self._spawned += 1
        threading.Thread(target=self._serve, name=f"vade-reader-{self._spawned}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            with self._lock:
                if job.cancel.is_set():  # given up before it started
                    job.error = DecodeError("read cancelled")
                    job.done.set()
                    continue
                job.deadline = time.monotonic() + job.timeout
                self._running.add(job)
            try:
                job.value = job.fn(job.cancel)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                job.error = exc
            with self._lock:
                job.done.set()
                self._running.discard(job)
                if job.abandoned:  # this thread was replaced while it was stuck
                    self.stuck -= 1
                    if self._live >= self.threads:
                        return
                    self._live += 1

    def submit(self, fn: Callable[[threading.Event], Any], timeout: float) -> _Job:
        job = _Job(fn, timeout)
        with self._lock:
            while self._live < self.threads:
                self._spawn()
        self._queue.put(job)
        return job

    def _reap(self) -> None:
        """Abandon every running read past its deadline (whoever waits for it) and replace its thread."""
        now = time.monotonic()
        with self._lock:
            for job in [j for j in self._running if j.deadline is not None and now > j.deadline]:
                job.abandoned = True
                job.cancel.set()
                self._running.discard(job)
                self._live -= 1
                self.stuck += 1
            stuck = self.stuck
            while self._live < self.threads:
                self._spawn()
        if stuck > self.max_stuck:
            raise StorageFault(
                f"the input storage is not answering: {stuck} reads are stuck past --read-timeout at once "
                f"(more than {self.max_stuck}); check the mount (a hung network file system?)"
            )

    def wait(self, job: _Job) -> Any:
        """The job's result; DecodeError when it ran past its deadline (the caller goes on without it)."""
        while not job.done.wait(POLL_S):
            self._reap()
            if job.abandoned:
                raise DecodeError(
                    f"reading the file did not finish within {job.timeout:g} s (--read-timeout); the storage "
                    "is slow or hung: the scan went on without this file"
                )
        if job.abandoned and job.error is None:  # finished late, but finished
            return job.value
        if isinstance(job.error, _Cancelled):
            raise DecodeError(f"reading the file did not finish within {job.timeout:g} s (--read-timeout)")
        if job.error is not None:
            raise job.error
        return job.value

    def run(self, fn: Callable[[threading.Event], Any], timeout: float) -> Any:
        return self.wait(self.submit(fn, timeout))


_shared: ReaderPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> ReaderPool:
    """This process's reader pool (one per process: its threads do not survive a fork)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ReaderPool()
        return _shared


def _forget_pool_after_fork() -> None:
    global _shared, _shared_lock
    _shared, _shared_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _check_timeout(timeout: float) -> float:
    if not timeout > 0:
        raise ValueError(f"a read timeout must be > 0 seconds, got {timeout!r}")
    return float(timeout)


def read_file(path: str | os.PathLike, timeout: float = DEFAULT_READ_TIMEOUT_S, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at `path`, within `timeout` seconds; DecodeError says what is wrong."""
    text = os.fspath(path)
    return shared_pool().run(lambda cancel: read_regular_file(text, max_bytes, cancel), _check_timeout(timeout))


def read_files(
    paths: Sequence[str | os.PathLike | None], timeout: float = DEFAULT_READ_TIMEOUT_S, max_bytes: int | None = None
) -> list[bytes | Exception | None]:
    """Read a batch in parallel: per path its bytes, or the exception that says why not (None for None).

    Raises only for a failure of the machine (StorageFault, OutOfMemory)."""
    pool, timeout = shared_pool(), _check_timeout(timeout)
    jobs = [
        None if p is None else pool.submit(lambda cancel, t=os.fspath(p): read_regular_file(t, max_bytes, cancel), timeout)
        for p in paths
    ]
    out: list[bytes | Exception | None] = []
    try:
        for job in jobs:
            if job is None:
                out.append(None)
                continue
            try:
                out.append(pool.wait(job))
            except (StorageFault, OutOfMemory):
                raise
            except Exception as exc:  # noqa: BLE001 - one file never stops a scan
                out.append(exc)
    finally:
        for job in jobs[len(out) :]:
            if job is not None:
                job.cancel.set()
    return out
