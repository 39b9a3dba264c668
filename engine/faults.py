"""Exit codes, and failures of the machine (not of one input file) turned into one clear line.

A broken input is an error row and the scan goes on. A failure of the machine stops the scan:
the disk is full, the output folder was removed or made read-only, the model directory changed,
memory ran out, the input storage stopped answering. Every shard finished before the failure is
kept (each is written whole, then marked done), so the line says what failed and that `--resume`
continues from the last finished shard.

    0    done (a scan: every input has its row, error rows included)
    1    vade scan --strict: the scan completed and some rows are errors
    2    a usage, input or model problem (nothing to resume: fix what the line says)
    3    OUT_DIR is being written by another scan (its lock names the holder)
    4    disk full or quota exceeded
    5    output folder removed, or not writable (read-only file system, permissions)
    6    model directory changed while the scan ran
    7    out of memory (where it can be caught: a MemoryError or a refused allocation)
    8    storage failure: reads stuck past --read-timeout on MAX_STUCK_READS threads at once,
         I/O errors outside one input, out of file descriptors
    70   internal error (a bug): one line; --debug shows the traceback
    130  stopped by SIGINT (Ctrl-C); 143 stopped by SIGTERM

Light on purpose (no heavy imports): the command line imports it before any verb runs.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import VadeError

EXIT_OK, EXIT_STRICT, EXIT_USAGE = 0, 1, 2
EXIT_LOCKED, EXIT_DISK_FULL, EXIT_OUTPUT, EXIT_MODEL_CHANGED, EXIT_OUT_OF_MEMORY, EXIT_STORAGE = 3, 4, 5, 6, 7, 8
EXIT_INTERNAL = 70
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143


class ScanLocked(VadeError):
    """OUT_DIR is held by another running scan (engine.scan.lock)."""

    exit_code = EXIT_LOCKED


class MachineFault(VadeError):
    """A failure of the machine, not of one input: the scan stops; finished shards are kept."""

    exit_code = EXIT_STORAGE
    hinted = False  # the resume hint has been added to the message


class DiskFull(MachineFault):
    exit_code = EXIT_DISK_FULL


class OutputUnwritable(MachineFault):
    exit_code = EXIT_OUTPUT


class ModelChanged(MachineFault):
    exit_code = EXIT_MODEL_CHANGED


class OutOfMemory(MachineFault):
    exit_code = EXIT_OUT_OF_MEMORY


class StorageFault(MachineFault):
    exit_code = EXIT_STORAGE


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: raised in the main thread so every `finally` runs (a clean stop)."""

    def __init__(self, signum: int, hint: str = ""):
        super().__init__(signum, hint)
        self.signum, self.hint = signum, hint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}{self.hint}"


def exit_code_of(exc: BaseException) -> int:
    """The exit code for an exception vade raised on purpose (VadeError, Interrupted); 2 by default."""
    return int(getattr(exc, "exit_code", EXIT_USAGE))


# -- classifying -------------------------------------------------------------------------------------
_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def _errno_of(exc: OSError) -> int | None:
    """exc.errno, or the one its text names (pyarrow and zarr sometimes wrap the OS error in text)."""
    if exc.errno:
        return exc.errno
    found = _ERRNO_IN_TEXT.search(str(exc))
    if found:
        return int(found.group(1))
    text = str(exc).lower()
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOENT, errno.EIO):
        if os.strerror(code).lower() in text:
            return code
    return None


def _under(path: str | os.PathLike | None, folder: Path | None) -> bool:
    if path is None or folder is None:
        return False
    try:
        return Path(os.path.abspath(os.fsdecode(path))).is_relative_to(Path(os.path.abspath(folder)))
    except (TypeError, ValueError):
        return False


def _where(exc: OSError) -> str:
    return f" ({os.fsdecode(exc.filename)})" if exc.filename else ""


def as_machine_fault(
    exc: BaseException, *, out_dir: str | Path | None = None, model_dir: str | Path | None = None
) -> MachineFault | None:
    """The MachineFault `exc` amounts to, or None when it is not a failure of the machine."""
    if isinstance(exc, MachineFault):
        return exc
    out = Path(out_dir) if out_dir is not None else None
    model = Path(model_dir) if model_dir is not None else None
    if isinstance(exc, MemoryError):
        return OutOfMemory("out of memory (a memory allocation failed); free memory, or lower --batch-size")
    if isinstance(exc, RuntimeError) and (
        type(exc).__name__ == "OutOfMemoryError" or any(t in str(exc).lower() for t in _OOM_TEXT)
    ):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return OutOfMemory(f"out of memory: {first[:300]}; free memory, or lower --batch-size")
    if not isinstance(exc, OSError):
        return None
    code = _errno_of(exc)
    reason = os.strerror(code) if code else str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT):
        where = _where(exc) or (f" (writing {out})" if out is not None else "")
        return DiskFull(f"disk full: {reason}{where}")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) and (exc.filename is None or _under(exc.filename, out)):
        return OutputUnwritable(f"the output folder {out} is not writable: {reason}{_where(exc)}")
    if code == errno.ENOENT and out is not None and (exc.filename is None or _under(exc.filename, out)):
        if not out.is_dir() or not (out / "scan.json").is_file():
            return OutputUnwritable(f"the output folder {out} was removed during the scan ({reason}{_where(exc)})")
        return OutputUnwritable(f"part of the output folder {out} was removed during the scan: {reason}{_where(exc)}")
    if _under(exc.filename, model):
        return ModelChanged(f"the model directory {model} changed during the scan: {reason}{_where(exc)}")
    if code in (errno.EMFILE, errno.ENFILE):
        return StorageFault(f"out of file descriptors: {reason}; raise the limit (ulimit -n)")
    if code == errno.ENOMEM:
        return OutOfMemory(f"out of memory: {reason}{_where(exc)}")
    return StorageFault(f"I/O error: {reason}{_where(exc)}")


def resume_hint(out_dir: str | Path | None, when: str = "once this is fixed, ") -> str:
    """What the user can do next: how much of OUT_DIR is finished and that --resume continues it."""
    if out_dir is None:
        return ""
    out = Path(out_dir)
    try:
        manifest = json.loads((out / "scan.json").read_text(encoding="utf-8"))
        done = sum(1 for _ in (out / "_done").glob("shard-*.json"))
    except (OSError, ValueError):
        if out.is_dir() and any(out.iterdir()):
            return f"; {out} holds no resumable scan (no scan.json): {when}remove it and run the scan again"
        return f"; {out} holds no resumable scan: {when}run the scan again"
    if manifest.get("state") == "complete":
        return ""
    return (
        f"; {done} of {manifest.get('shards', '?')} shards are finished and kept in {out}: {when}"
        "rerun the same command with --resume to continue from the last finished shard"
    )


def with_hint(exc: MachineFault | Interrupted, out_dir: str | Path | None) -> None:
    """Append the resume hint to a fault's (or an interruption's) message, once."""
    if isinstance(exc, Interrupted):
        exc.hint = exc.hint or resume_hint(out_dir, when="")
    elif not exc.hinted:
        exc.args = (f"{exc}{resume_hint(out_dir)}",)
        exc.hinted = True


@contextmanager
def machine_faults(out_dir: str | Path | None, model_dir: str | Path | None = None) -> Iterator[None]:
    """Turn OS errors, memory errors and interruptions in the block into MachineFault / Interrupted
    messages that say what failed and how to resume OUT_DIR."""
    try:
        yield
    except Interrupted as exc:
        with_hint(exc, out_dir)
        raise
    except MachineFault as exc:
        with_hint(exc, out_dir)
        raise
    except VadeError:
        raise
    except (OSError, MemoryError, RuntimeError) as exc:
        fault = as_machine_fault(exc, out_dir=out_dir, model_dir=model_dir)
        if fault is None:
            raise
        with_hint(fault, out_dir)
        raise fault from exc


# -- signals -----------------------------------------------------------------------------------------
def _interrupt(signum: int, _frame: object) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal stops at once (still resumable)
        signal.signal(sig, signal.SIG_DFL)
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM raise Interrupted in the main thread (elsewhere: no-op)."""
    try:
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals are the caller's business
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def quiet_shutdown() -> None:
    """After a fault, keep the one line alone: no asyncio 'Task was destroyed' or unraisable noise at exit
    from writes that the fault abandoned (zarr's event loop)."""
    import logging
    import sys
    import warnings

    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 1)
    sys.unraisablehook = lambda _unraisable: None
    warnings.simplefilter("ignore")
