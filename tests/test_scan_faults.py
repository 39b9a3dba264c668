"""Failures of the machine end a scan in one line with their own exit code; --resume then gives the same
bytes as a clean run (benchmarks/compare_scans.py compares). Real faults: a full tmpfs, a read-only bind
mount, a removed folder, a rewritten model, a refused allocation; ENOSPC is injected in the writer only
where no file system can be mounted (not root)."""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from engine.cli.main import main as cli_main
from engine.faults import ModelChanged, OutOfMemory, OutputUnwritable
from engine.scan.job import scan
from engine.scan.lock import LOCK_NAME
from engine.scan.progress import Progress

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"device": "cpu", "shard_size": 8, "batch_size": 8, "decoder": "pillow"}
FLAGS = ["--device", "cpu", "--shard-size", "8", "--batch-size", "8", "--decoder", "pillow"]

_spec = importlib.util.spec_from_file_location("compare_scans", REPO / "benchmarks" / "compare_scans.py")
compare_scans = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_scans)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread, as the subprocesses get (OMP_NUM_THREADS=1): CPU sums depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 small generated images and one broken file: 6 shards of 8."""
    from imagegen import jpeg_bytes, png_bytes, write_files

    folder = tmp_path_factory.mktemp("fault_inputs")
    files = {f"img_{i:02d}.png": png_bytes(72, 72, seed=i) for i in range(20)}
    files.update({f"img_{i:02d}.jpg": jpeg_bytes(72, 72, seed=i) for i in range(20, 40)})
    files["img_99_broken.png"] = b"\x89PNG\r\n\x1a\n not really"
    write_files(folder, files)
    return folder


@pytest.fixture(scope="module")
def clean(scan_model_dir: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("fault_clean") / "out"
        scan(scan_model_dir, inputs, out, **SETTINGS)
    finally:
        torch.set_num_threads(threads)
    return out


class FaultAfter(Progress):
    """A quiet progress bar that injects a fault (runs `action`) once `images` images are scanned."""

    def __init__(self, images: int, action: Callable[[], None]):
        super().__init__(0, quiet=True)
        self.at, self.action, self.fired = images, action, False

    def advance(self, n: int) -> None:
        super().advance(n)
        if not self.fired and self.done >= self.at:
            self.fired = True
            self.action()


def _resume_equals_clean(model_dir: Path, inputs: Path, out: Path, clean: Path) -> None:
    assert not (out / "scores.parquet").exists() and (out / "_done").is_dir()
    result = scan(model_dir, inputs, out, resume=True, **SETTINGS)
    assert result.shards_skipped >= 1  # finished shards were kept, not redone
    assert compare_scans.compare(clean, out) is None  # rows and maps bitwise
    assert not (out / LOCK_NAME).exists()


def _sh(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs, or skip where none can be mounted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if not _can_mount() or _sh("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the ENOSPC injection test stands in")
    yield mnt
    _sh("umount", "-l", str(mnt))


def _pages(folder: Path) -> int:
    return sum((p.stat().st_size + 4095) // 4096 * 4096 for p in folder.rglob("*") if p.is_file())


def test_disk_full_is_one_line_and_exit_4_then_resume_equals_clean(
    scan_model_dir: Path, inputs: Path, clean: Path, small_disk: Path
) -> None:
    """`vade scan` onto a real tmpfs with room for about half the output: exit 4, one line; free the space,
    --resume, and the result is the clean run's, bit for bit."""
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - _pages(clean) // 2))
    out = small_disk / "out"
    cmd = [sys.executable, "-m", "engine.cli", "scan", str(scan_model_dir), str(inputs), "--out", str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run([*cmd, *FLAGS], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 4, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("vade scan: error: disk full: No space left on device")
    assert "shards are finished and kept" in lines[0] and "--resume to continue from the last finished shard" in lines[0]
    assert not (out / LOCK_NAME).exists() and not list((out / "_parts").glob("*.tmp-*"))  # no half-written temp
    filler.unlink()  # space freed
    _resume_equals_clean(scan_model_dir, inputs, out, clean)


def test_disk_full_injected_in_the_writer(
    scan_model_dir: Path, inputs: Path, clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Where no small file system can be made: the writer's third shard part hits ENOSPC."""
    from engine.scan.store import ScanStore

    real = ScanStore.finish_shard
    calls = {"n": 0}

    def finish_shard(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ScanStore, "finish_shard", finish_shard)
    out = tmp_path / "out"
    code = cli_main(["scan", str(scan_model_dir), str(inputs), "--out", str(out), "--quiet", *FLAGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and "disk full" in err[0] and "2 of 6 shards are finished" in err[0]
    monkeypatch.setattr(ScanStore, "finish_shard", real)
    _resume_equals_clean(scan_model_dir, inputs, out, clean)


def test_output_made_read_only_mid_scan_exits_5_then_resumes(
    scan_model_dir: Path, inputs: Path, clean: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    undo: list[list[str]] = []

    def read_only() -> None:
        # The writer thread finishes shards behind the model stage that counts images: wait until a
        # first shard is finished (its marker written), so the resume has a finished shard to keep.
        for _ in range(3000):
            if any((out / "_done").glob("*.json")):
                break
            time.sleep(0.01)
        if _can_mount():  # a read-only bind mount over OUT_DIR: writes fail with EROFS
            assert _sh("mount", "--bind", str(out), str(out)).returncode == 0
            undo.append(["umount", "-l", str(out)])
            for _ in range(400):  # "busy" while the writer has a file open through the new mount: retry
                if _sh("mount", "-o", "remount,ro,bind", str(out)).returncode == 0:
                    break
                time.sleep(0.005)
            else:
                pytest.fail("could not make the bind mount read-only")
        else:  # without root: no new files in any folder of OUT_DIR
            for folder in [out, *(p for p in out.rglob("*") if p.is_dir())]:
                folder.chmod(0o555)
                undo.append(["chmod", "755", str(folder)])

    with pytest.raises(OutputUnwritable) as info:
        scan(scan_model_dir, inputs, out, progress=FaultAfter(16, read_only), **SETTINGS)
    for cmd in reversed(undo):
        _sh(*cmd)
    assert info.value.exit_code == 5 and "is not writable" in str(info.value)
    assert "--resume to continue from the last finished shard" in str(info.value)
    _resume_equals_clean(scan_model_dir, inputs, out, clean)


def test_output_removed_mid_scan_exits_5(scan_model_dir: Path, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    def remove() -> None:  # gone at once (a plain rmtree would race the writer, which keeps adding files)
        out.rename(tmp_path / "trash")
        shutil.rmtree(tmp_path / "trash", ignore_errors=True)

    with pytest.raises(OutputUnwritable) as info:
        scan(scan_model_dir, inputs, out, progress=FaultAfter(16, remove), **SETTINGS)
    assert info.value.exit_code == 5 and f"the output folder {out} was removed during the scan" in str(info.value)
    assert "holds no resumable scan" in str(info.value) and "run the scan again" in str(info.value)


def test_model_changed_mid_scan_exits_6_then_resumes(
    scan_model_dir: Path, inputs: Path, clean: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(scan_model_dir, model)
    original = (model / "model.json").read_bytes()
    out = tmp_path / "out"
    with pytest.raises(ModelChanged) as info:
        scan(model, inputs, out, progress=FaultAfter(8, lambda: (model / "model.json").write_bytes(original + b"\n")),
             **SETTINGS)  # fmt: skip
    assert info.value.exit_code == 6 and "model.json is not the one the scan started with" in str(info.value)
    assert "--resume" in str(info.value)
    (model / "model.json").write_bytes(original)  # put back
    _resume_equals_clean(model, inputs, out, clean)


def test_out_of_memory_is_a_fault_not_a_crash(scan_model_dir: Path, inputs: Path, tmp_path: Path) -> None:
    """Micro-batches of 10^10 images: the allocation (hundreds of TB) is refused at once, as a real OOM is."""
    with pytest.raises(OutOfMemory) as info:
        scan(scan_model_dir, inputs, tmp_path / "out", **{**SETTINGS, "model_batch": 10**10})
    assert info.value.exit_code == 7 and str(info.value).startswith("out of memory")
    assert not (tmp_path / "out" / LOCK_NAME).exists()
