"""Which failures are the machine's, and the one line and exit code each gets (engine.faults)."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from engine.faults import (
    DiskFull,
    Interrupted,
    ModelChanged,
    OutOfMemory,
    OutputUnwritable,
    StorageFault,
    as_machine_fault,
    machine_faults,
)


def _os_error(code: int, filename: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), filename)


@pytest.fixture()
def scan_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "_done").mkdir(parents=True)
    (out / "scan.json").write_text('{"shards": 6, "state": "running"}')
    for k in range(2):
        (out / "_done" / f"shard-{k:08d}.json").write_text("{}")
    return out


def test_each_fault_has_its_kind_and_exit_code(scan_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    cases = [
        (_os_error(errno.ENOSPC, str(scan_dir / "maps.zarr" / "c" / "0")), DiskFull, 4, "disk full: No space left"),
        (_os_error(errno.EDQUOT), DiskFull, 4, "disk full: Disk quota exceeded"),
        # pyarrow's way: errno only in the text
        (OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"), DiskFull, 4, "disk full"),
        (_os_error(errno.EROFS, str(scan_dir / "_parts" / "x")), OutputUnwritable, 5, "is not writable: Read-only file system"),
        (_os_error(errno.EACCES, str(scan_dir / "_done" / "x")), OutputUnwritable, 5, "is not writable: Permission denied"),
        (_os_error(errno.ENOENT, str(scan_dir / "_parts" / "x")), OutputUnwritable, 5, "part of the output folder"),
        (_os_error(errno.ENOENT, str(model / "model.json")), ModelChanged, 6, "model directory"),
        (MemoryError(), OutOfMemory, 7, "out of memory"),
        (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 491520000000000 bytes."),
         OutOfMemory, 7, "out of memory: DefaultCPUAllocator"),
        (_os_error(errno.EIO, "/data/disk3/x.png"), StorageFault, 8, "I/O error: Input/output error"),
        (_os_error(errno.EMFILE), StorageFault, 8, "out of file descriptors"),
    ]  # fmt: skip
    for exc, kind, code, text in cases:
        fault = as_machine_fault(exc, out_dir=scan_dir, model_dir=model)
        assert isinstance(fault, kind) and fault.exit_code == code and text in str(fault), (exc, fault)
    assert as_machine_fault(ValueError("a bug"), out_dir=scan_dir) is None
    assert as_machine_fault(RuntimeError("shape mismatch"), out_dir=scan_dir) is None


def test_a_real_refused_allocation_is_out_of_memory() -> None:
    with pytest.raises(MemoryError) as info:
        bytearray(1 << 62)  # 4 EiB: refused at once
    assert isinstance(as_machine_fault(info.value), OutOfMemory)


def test_the_line_says_how_far_the_scan_got_and_how_to_continue(scan_dir: Path) -> None:
    with pytest.raises(DiskFull) as info, machine_faults(scan_dir):
        raise _os_error(errno.ENOSPC)
    assert str(info.value) == (
        f"disk full: No space left on device (writing {scan_dir}); 2 of 6 shards are finished and kept in "
        f"{scan_dir}: once this is fixed, rerun the same command with --resume to continue from the last finished shard"
    )
    assert isinstance(info.value.__cause__, OSError)  # --debug shows the original
    with pytest.raises(Interrupted) as stop, machine_faults(scan_dir):
        raise Interrupted(signal.SIGTERM)
    assert stop.value.exit_code == 143 and str(stop.value).startswith("stopped by SIGTERM; 2 of 6 shards are finished")
    assert Interrupted(signal.SIGINT).exit_code == 130
    with pytest.raises(ValueError), machine_faults(scan_dir):  # not the machine's: untouched
        raise ValueError("a bug")
