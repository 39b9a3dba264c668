"""One writer per output: a second scan into OUT_DIR is refused naming the holder; a stale lock is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.cli.main import main as cli_main
from engine.faults import ScanLocked
from engine.scan.job import open_scan, scan
from engine.scan.lock import LOCK_NAME, STALE_AFTER_S, ScanLock
from engine.scan.options import ScanOptions

SETTINGS = {"device": "cpu", "shard_size": 4, "batch_size": 4, "decoder": "pillow"}


@pytest.fixture()
def folder(real_images: list[Path]) -> Path:
    return real_images[0].parent


def _write_lock(out: Path, host: str, pid: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01T00:00:00+00:00", "process_start": None}))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_scan_is_refused_naming_the_holder(scan_model_dir: Path, folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    job = open_scan(scan_model_dir, folder, out, ScanOptions(**SETTINGS))  # a scan in progress holds OUT_DIR
    try:
        with pytest.raises(ScanLocked) as info:
            scan(scan_model_dir, folder, out, resume=True, **SETTINGS)
        assert f"pid {os.getpid()} on host {socket.gethostname()}, started " in str(info.value)
        assert info.value.exit_code == 3
        code = cli_main(["scan", str(scan_model_dir), str(folder), "--out", str(out), "--resume", "--debug"])
        err = capsys.readouterr().err
        assert code == 3 and "is being written by another scan (pid" in err and "Traceback" in err  # --debug
        code = cli_main(["scan", str(scan_model_dir), str(folder), "--out", str(out)])  # without --resume too
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 3 and len(err) == 1 and "only one scan may write an output folder" in err[0]
    finally:
        job.close()
    result = scan(scan_model_dir, folder, out, resume=True, **SETTINGS)  # free again: the scan completes
    assert result.counts.ok == len(list(folder.iterdir())) and not (out / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_and_said_so(scan_model_dir: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = _dead_pid()
    _write_lock(out, socket.gethostname(), dead)  # left by a scan killed with SIGKILL
    said: list[str] = []
    result = scan(scan_model_dir, folder, out, say=said.append, **SETTINGS)  # a new scan: the folder holds only the lock
    assert result.counts.total == len(list(folder.iterdir()))
    assert any(f"taking over the lock of a scan that is no longer running (pid {dead} on host" in m for m in said)


def test_a_lock_from_another_host_is_stale_only_without_its_heartbeat(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = _write_lock(out, "node-17.cluster", 4242)
    with pytest.raises(ScanLocked, match=r"pid 4242 on host node-17.cluster.*refreshed \d+ s ago"):
        ScanLock.acquire(out)
    old = time.time() - STALE_AFTER_S - 60
    os.utime(path, (old, old))  # its holder stopped refreshing it
    said: list[str] = []
    with ScanLock.acquire(out, said.append) as lock:
        assert lock.holder.pid == os.getpid() and "node-17.cluster" in said[0]
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_racing_scans_get_one_lock(tmp_path: Path) -> None:
    """Eight threads race for one OUT_DIR, twenty times: exactly one wins each time."""
    for round_ in range(20):
        out = tmp_path / f"out{round_}"
        winners: list[ScanLock] = []
        refused: list[ScanLocked] = []
        start = threading.Barrier(8)

        def race() -> None:
            start.wait()
            try:
                winners.append(ScanLock.acquire(out))
            except ScanLocked as exc:
                refused.append(exc)

        threads = [threading.Thread(target=race) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(winners) == 1 and len(refused) == 7, (round_, len(winners))
        winners[0].release()
        assert not (out / LOCK_NAME).exists()


def test_a_refused_new_scan_leaves_the_folder_as_it_was(scan_model_dir: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "keep.txt").parent.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(Exception, match="already exists and is not empty"):
        scan(scan_model_dir, folder, out, **SETTINGS)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(Exception, match="not a folder"):
        scan(scan_model_dir, tmp_path / "no_such_source", tmp_path / "new", **SETTINGS)
    assert not (tmp_path / "new").exists()
