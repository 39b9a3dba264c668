"""One writer per output: a scan holds OUT_DIR/scan.lock from opening OUT_DIR to its last write.

    lock = ScanLock.acquire(out_dir, say)      # ScanLocked names the holder when another scan has it
    ...; lock.release()

The lock is an flock(2) on OUT_DIR/scan.lock, which also records the holder (host, pid, process
start, start time) for the refusal message. The kernel drops an flock when its process dies, however
it dies, so a lock left by a killed scan is free: the next scan takes it over and says whose it was.
Where flock does not reach (a file system without it, or one whose locks do not span hosts), the
record decides: a holder on this host is alive if its pid runs with the same process start time; a
holder on another host is alive while it refreshes the file's mtime (every HEARTBEAT_S) and is stale
after STALE_AFTER_S without. Dask workers writing the driver's shards take no lock: the driver holds
it for them, so they are never "second scans".
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from engine.faults import ScanLocked

LOCK_NAME = "scan.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid from the holder), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # ISO time, UTC
    process_start: str | None

    @classmethod
    def me(cls) -> Holder:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), now, _process_start(os.getpid()))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"

    def alive_here(self) -> bool:
        """For a holder on this host: does its process still run (the same process, not a reused pid)?"""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        start = _process_start(self.pid)
        return start is None or self.process_start is None or start == self.process_start


def _read_holder(fd: int) -> Holder | None:
    try:
        data = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        return Holder(str(data["host"]), int(data["pid"]), str(data["started"]), data.get("process_start"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _flock(fd: int) -> bool | None:
    """True: locked; False: another holder has it; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise


def _refuse(out_dir: Path, holder: Holder | None, why: str = "") -> ScanLocked:
    who = holder.describe() if holder else "another process (its lock file names no holder yet)"
    return ScanLocked(
        f"{out_dir} is being written by another scan ({who}{why}); only one scan may write an output folder. "
        f"Wait for it to finish (then --resume if it was stopped), or choose another --out; if that scan is "
        f"certainly gone, delete {out_dir / LOCK_NAME}"
    )


class ScanLock:
    """The held lock on one OUT_DIR (see the module docstring); release() or process exit frees it."""

    def __init__(self, path: Path, fd: int, holder: Holder, created_dir: bool):
        self.path, self.fd, self.holder, self.created_dir = path, fd, holder, created_dir
        self._stop = threading.Event()
        self._finalizer = weakref.finalize(self, _release, path, fd, self._stop, created_dir)
        threading.Thread(target=_heartbeat, args=(fd, self._stop), name="vade-lock-heartbeat", daemon=True).start()

    @classmethod
    def acquire(cls, out_dir: str | Path, say: Callable[[str], None] | None = None) -> ScanLock:
        """Take OUT_DIR's lock (creating OUT_DIR); ScanLocked names the holder if a live scan has it."""
        out_dir = Path(out_dir)
        try:
            out_dir.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
        path = out_dir / LOCK_NAME
        for _attempt in range(20):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                locked = _flock(fd)
                previous = _read_holder(fd)
                if locked is False:
                    raise _refuse(out_dir, previous)
                if not _same_file(fd, path):  # the holder released (unlinked) it between our open and flock
                    os.close(fd)
                    continue
                if previous is not None:
                    _check_stale(out_dir, fd, previous, flock_works=locked is True)
                    if say:
                        say(f"taking over the lock of a scan that is no longer running ({previous.describe()})")
                me = Holder.me()
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(asdict(me)).encode("utf-8"), 0)
                os.fsync(fd)
                with _held_lock:
                    _held.add(_key(fd))
                return cls(path, fd, me, created)
            except BaseException:
                os.close(fd)
                if created:
                    _remove_if_empty(out_dir)
                raise
        raise ScanLocked(f"could not take the lock {path}: other scans keep taking and releasing it")

    def release(self) -> None:
        """Drop the lock (and OUT_DIR itself when this lock created it and nothing else was written)."""
        self._finalizer()

    def __enter__(self) -> ScanLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_stale(out_dir: Path, fd: int, previous: Holder, flock_works: bool) -> None:
    """A previous holder is recorded and flock let us in (or there is no flock): refuse unless the
    record shows that holder is gone."""
    if previous.host == socket.gethostname():
        if previous.pid == os.getpid():  # this process: NFS's flock does not tell its own locks apart
            if _key(fd) in _held:
                raise _refuse(out_dir, previous)
            return
        if not flock_works and previous.alive_here():  # no flock here: the pid decides
            raise _refuse(out_dir, previous)
        return  # flock works between processes of one host: the holder would still hold it if it ran
    age = time.time() - os.fstat(fd).st_mtime
    if age < STALE_AFTER_S:  # flock may not span hosts: trust the heartbeat
        raise _refuse(out_dir, previous, f"; its lock was refreshed {age:.0f} s ago, stale after {STALE_AFTER_S:.0f} s")


_held: set[tuple[int, int]] = set()  # (device, inode) of the lock files this process holds
_held_lock = threading.Lock()


def _key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _heartbeat(fd: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(fd)
        except OSError:
            return  # the output folder is gone or read-only: the scan itself reports that


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _release(path: Path, fd: int, stop: threading.Event, created_dir: bool) -> None:
    stop.set()
    with _held_lock:
        _held.discard(_key(fd))
    try:
        if _same_file(fd, path):
            path.unlink()  # while still holding it: a newcomer then finds no file, or a new one
    except OSError:
        pass
    finally:
        os.close(fd)
    if created_dir:
        _remove_if_empty(path.parent)
