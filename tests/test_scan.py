"""End-to-end scans with a real model: every input one row, broken files as error rows, outputs readable."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from imagegen import broken_files, huge_jpeg, valid_files, write_files

from engine.cli.main import main as cli_main
from engine.errors import ConfigError
from engine.scan.job import scan
from engine.scan.store import utf8_path

REPO = Path(__file__).resolve().parents[1]


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out / "scores.parquet").to_pylist()


def _maps(out: Path) -> zarr.Array:
    return zarr.open_group(out / "maps.zarr", mode="r")["maps"]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory, real_images: list[Path]) -> Path:
    folder = tmp_path_factory.mktemp("mixed")
    write_files(folder / "valid", {**valid_files(), "huge.jpg": huge_jpeg(4000, 3000)})
    write_files(folder / "broken", {name: data for name, (data, _) in broken_files().items()})
    for path in real_images[:4]:
        shutil.copyfile(path, folder / path.name)
    with open(os.fsencode(folder / "valid") + b"/latin1_caf\xe9.png", "wb") as fh:  # a name that is not UTF-8
        fh.write(valid_files()["plain.png"])
    return folder


@pytest.fixture(scope="module")
def mixed_scan(scan_model_dir: Path, mixed_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixed_scan") / "out"
    scan(scan_model_dir, mixed_folder, out, device="cpu", batch_size=4, shard_size=8, max_pixels=50_000_000)
    return out


def test_every_input_gets_exactly_one_row(mixed_scan: Path, mixed_folder: Path) -> None:
    rows = _rows(mixed_scan)
    files = sorted(utf8_path(str(p)) for p in mixed_folder.rglob("*") if p.is_file())
    assert sorted(r["path"] for r in rows) == files
    assert {r["status"] for r in rows if r["path"].endswith("latin1_caf\\xe9.png")} == {"ok"}
    assert [r["position"] for r in rows] == list(range(len(files)))
    assert [r["shard"] for r in rows] == [p // 8 for p in range(len(files))]


def test_broken_files_are_error_rows_that_say_why(mixed_scan: Path) -> None:
    by_name = {Path(r["path"]).name: r for r in _rows(mixed_scan)}
    for name, (_, word) in broken_files().items():
        row = by_name[name]
        assert row["status"] == "error" and word in row["error"], (name, row["error"])
        assert row["index"] == -1 and row["score"] is None and row["is_anomalous"] is False
        assert np.isnan(_maps(mixed_scan)[row["position"]]).all()


def test_unusual_valid_files_are_scored(mixed_scan: Path) -> None:
    rows = _rows(mixed_scan)
    by_name = {Path(r["path"]).name: r for r in rows}
    maps = _maps(mixed_scan)
    for name in [*valid_files(), "huge.jpg"]:
        row = by_name[name]
        assert row["status"] == "ok" and row["error"] is None, (name, row["error"])
        assert row["index"] == row["position"] and math.isfinite(row["score"]) and math.isfinite(row["raw_score"])
        assert np.isfinite(maps[row["index"]]).all()
    assert (by_name["exif_rotated.jpg"]["width"], by_name["exif_rotated.jpg"]["height"]) == (64, 96)
    assert (by_name["huge.jpg"]["width"], by_name["huge.jpg"]["height"]) == (4000, 3000)
    assert (by_name["tiny_1x1.png"]["width"], by_name["tiny_1x1.png"]["height"]) == (1, 1)
    flagged = [r["is_anomalous"] for r in rows if r["status"] == "ok"]
    assert flagged == [r["raw_score"] >= _maps(mixed_scan).attrs["threshold_raw"] for r in rows if r["status"] == "ok"]


def test_outputs_follow_the_contract(mixed_scan: Path, scan_model_dir: Path) -> None:
    table = pq.read_table(mixed_scan / "scores.parquet")
    types = {f.name: f.type for f in table.schema}
    assert types["path"] == pa.string() and types["index"] == pa.int64() and types["score"] == pa.float32()
    assert types["is_anomalous"] == pa.bool_() and types["status"] == pa.string() and types["error"] == pa.string()
    maps = _maps(mixed_scan)
    assert maps.shape == (table.num_rows, 64, 64) and maps.chunks == (1, 64, 64) and maps.dtype == np.float16
    assert maps.attrs["_ARRAY_DIMENSIONS"] == ["image", "y", "x"] and maps.attrs["map_size"] == [64, 64]
    assert "resize" in maps.attrs and maps.attrs["threshold_normalised"] == 0.5
    assert not (mixed_scan / "_parts").exists()


def test_manifest_columns_are_carried(scan_model_dir: Path, real_images: list[Path], tmp_path: Path) -> None:
    manifest = tmp_path / "inputs.parquet"
    paths = [str(real_images[0]), "does/not/exist.png", real_images[1].name]
    pq.write_table(pa.table({"path": paths, "site": ["a", "b", "c"], "score": [1.0, 2.0, 3.0]}), manifest)
    shutil.copyfile(real_images[1], tmp_path / real_images[1].name)  # relative to the manifest's folder
    result = scan(scan_model_dir, manifest, tmp_path / "out", device="cpu")
    rows = _rows(tmp_path / "out")
    assert [r["path"] for r in rows] == paths and [r["site"] for r in rows] == ["a", "b", "c"]
    assert [r["source_score"] for r in rows] == [1.0, 2.0, 3.0]
    assert [r["status"] for r in rows] == ["ok", "error", "ok"] and rows[1]["error"] == "file not found"
    assert (result.counts.ok, result.counts.error) == (2, 1)


def test_scores_and_maps_do_not_depend_on_batch_size_or_decoder(
    scan_model_dir: Path, real_images: list[Path], tmp_path: Path
) -> None:
    outs = []
    for i, (batch_size, decoder) in enumerate([(1, "pillow"), (5, "dali"), (12, "auto")]):
        outs.append(tmp_path / f"out{i}")
        scan(scan_model_dir, real_images[0].parent, outs[-1], device="cpu", batch_size=batch_size, decoder=decoder)
    first = pq.read_table(outs[0] / "scores.parquet")
    assert first.num_rows == len(real_images) and set(first.column("status").to_pylist()) == {"ok"}
    for out in outs[1:]:
        table = pq.read_table(out / "scores.parquet")
        assert table.column("raw_score").equals(first.column("raw_score"))  # bitwise
        assert table.column("score").equals(first.column("score"))
        assert np.array_equal(_maps(out)[:], _maps(outs[0])[:])


def test_existing_out_dir_is_refused_and_a_complete_scan_resumes_as_a_no_op(
    scan_model_dir: Path, real_images: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    scan(scan_model_dir, real_images[0].parent, out, device="cpu")
    before = (out / "scores.parquet").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        scan(scan_model_dir, real_images[0].parent, out, device="cpu")
    with pytest.raises(ConfigError, match="shard_size"):
        scan(scan_model_dir, real_images[0].parent, out, device="cpu", resume=True, shard_size=3)
    result = scan(scan_model_dir, real_images[0].parent, out, device="cpu", resume=True)
    assert result.shards_skipped == result.shards and (out / "scores.parquet").read_bytes() == before
    assert result.counts.ok == len(real_images)


def test_cli_refuses_existing_out_dir_with_exit_2(
    scan_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code = cli_main(["scan", str(scan_model_dir), str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_vade_scan_command_strict_exit_code_and_summary(scan_model_dir: Path, tmp_path: Path) -> None:
    """The real command in a subprocess: error rows -> exit 0, or 1 with --strict; a summary line."""
    folder = tmp_path / "in"
    write_files(folder, {"a.png": valid_files()["plain.png"], "b.jpg": broken_files()["truncated.jpg"][0]})
    base = [sys.executable, "-m", "engine.cli", "scan", str(scan_model_dir), str(folder), "--device", "cpu"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([*base, "--out", str(tmp_path / "o1"), "--strict"], capture_output=True, text=True, env=env)
    assert done.returncode == 1, done.stderr
    assert "scanned 2 images: 1 ok, 1 error, " in done.stdout
    again = subprocess.run([*base, "--out", str(tmp_path / "o1"), "--resume", "--quiet"], capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "1 ok, 1 error" in again.stdout and again.stderr == ""


def test_a_decoder_that_cannot_run_is_refused_before_any_output(
    scan_model_dir: Path, real_images: list[Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="nvjpeg decodes on a GPU"):
        scan(scan_model_dir, real_images[0].parent, tmp_path / "out", device="cpu", decoder="nvjpeg")
    assert not (tmp_path / "out").exists()
