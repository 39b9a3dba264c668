"""`vade report` on a scan output folder built from real images of ../shared/data.

The folder is written the way a scan writes it (maps.zarr with one float16 chunk per image, normalised so
0.5 = threshold; scores.parquet with the contract columns; model.json; scan.json), with maps and scores
computed by a small real model (distance to the mean training image), an unreadable file and a missing
file among the inputs.
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import zarr

from engine.cli.report import register
from engine.errors import DataError, DecodeError
from engine.inputs import datasets
from engine.inputs.decode import read_rgb, to_tensor
from engine.report import drift as report_drift
from engine.report.data import HIST_BINS, load_scan
from engine.report.page import build_report

SIZE = 64
SHARD = 16


def _mean_image_maps(images: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    distance = (images - mean).abs().mean(1, keepdim=True)
    return F.avg_pool2d(distance, 5, stride=1, padding=2, count_include_pad=False)[:, 0]


def write_scan(out_dir: Path, paths: list[str], train: list[Path], extra: dict[str, list] | None = None) -> dict:
    """Score `paths` with a mean-image model fitted on `train` and write a scan output folder."""
    fit, holdout = train[: len(train) // 2], train[len(train) // 2 :]
    mean = to_tensor([read_rgb(p) for p in fit], SIZE).mean(0)
    holdout_raw = _mean_image_maps(to_tensor([read_rgb(p) for p in holdout], SIZE), mean).amax(dim=(1, 2)).numpy()
    threshold, centre = float(np.quantile(holdout_raw, 0.99)), float(np.median(holdout_raw))

    def normalize(raw: np.ndarray) -> np.ndarray:
        return 0.5 + 0.5 * (raw - threshold) / (threshold - centre)

    out_dir.mkdir(parents=True)
    maps = zarr.open_group(out_dir / "maps.zarr", mode="w").create_array(
        "maps", shape=(len(paths), SIZE, SIZE), chunks=(1, SIZE, SIZE), dtype="float16", fill_value=np.nan
    )
    columns: dict[str, list] = {k: [] for k in ("path", "index", "score", "raw_score", "is_anomalous", "status", "error", "width", "height", "shard")}
    for position, path in enumerate(paths):
        columns["path"].append(path)
        columns["shard"].append(position // SHARD)
        try:
            rgb = read_rgb(path)
        except DecodeError as exc:
            for key, value in (("index", -1), ("score", None), ("raw_score", None), ("is_anomalous", False),
                               ("status", "error"), ("error", f"{exc} ({path})"), ("width", None), ("height", None)):
                columns[key].append(value)
            continue
        amap = _mean_image_maps(to_tensor([rgb], SIZE), mean)[0].numpy()
        raw = float(amap.max())
        maps[position] = normalize(amap).astype(np.float16)
        for key, value in (("index", position), ("score", float(normalize(np.float64(raw)))), ("raw_score", raw),
                           ("is_anomalous", raw >= threshold), ("status", "ok"), ("error", None),
                           ("width", rgb.shape[1]), ("height", rgb.shape[0])):
            columns[key].append(value)
    table = pa.table({**columns, **(extra or {})})
    table = table.set_column(table.schema.get_field_index("score"), "score", table.column("score").cast(pa.float32()))
    pq.write_table(table, out_dir / "scores.parquet")
    meta = {
        "method": "mean-image", "backbone": "none (pixel colours)", "layers": [], "input_size": SIZE, "bank_size": 1,
        "threshold": threshold, "config": {"target_false_alarm_rate": 0.01},
        "calibration": {"source": "holdout", "threshold": threshold, "centre": centre,
                        "normal_scores_normalized": normalize(holdout_raw).tolist()},
    }
    (out_dir / "model.json").write_text(json.dumps(meta))
    (out_dir / "scan.json").write_text(json.dumps({"source": "test inputs", "count": len(paths), "images_per_second": 123.4}))
    return meta


@pytest.fixture(scope="module")
def scan_dir(bottle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("scan")
    broken = tmp / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    train = datasets.train_images(bottle_root, "bottle")
    paths = [str(i.path) for i in datasets.test_items(bottle_root, "bottle")]
    paths += [str(p) for p in train[100:124]] + [str(broken), str(tmp / "gone.png")]
    write_scan(tmp / "out", paths, train[:60:2])
    return tmp / "out"


@pytest.fixture(scope="module")
def report_html(scan_dir: Path) -> str:
    return build_report(scan_dir, top=12, contrast=4).read_text(encoding="utf-8")


def test_report_sections_and_counts(report_html: str) -> None:
    for anchor in ("summary", "scores", "labels", "anomalous", "typical", "drift", "errors"):
        assert f'id="{anchor}"' in report_html
    assert "mean-image" in report_html and "123.4" in report_html  # model record and scan throughput
    assert "109" in report_html and "107" in report_html  # rows, ok (2 errors)
    for defect in ("broken_large", "broken_small", "contamination"):
        assert defect in report_html
    assert "Errors (2 images)" in report_html


def test_report_is_self_contained(report_html: str) -> None:
    assert not re.search(r"https?:", report_html)
    assert "<script" not in report_html.lower() and "@import" not in report_html
    sources = re.findall(r'\bsrc="([^"]*)"', report_html)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert sum(s.startswith("data:image/jpeg") for s in sources) == 12 + 4  # tiles
    assert sum(s.startswith("data:image/png") for s in sources) == 3  # histogram, ROC/PR, drift
    assert not re.search(r"\bhref=\"(?!#)", report_html)  # only links within the page


def test_errors_are_grouped_by_message(scan_dir: Path) -> None:
    data = load_scan(scan_dir)
    messages = {msg: count for msg, count, _ in data.errors}
    assert sum(messages.values()) == 2 and len(messages) == 2  # unreadable vs missing: different messages
    assert all("<path>" in m for m in messages)  # the paths are not part of the message


def test_error_messages_lose_paths_and_file_bytes() -> None:
    from engine.report.data import _error_message

    assert _error_message("cannot identify image file '/data/a b/x.png'\ntraceback") == "cannot identify image file <path>"
    assert _error_message("file not found /data/x.png") == _error_message("file not found /other/y.png")
    assert _error_message("not an image (file starts with b'hello\\n')") == "not an image (file starts with <bytes>)"
    assert _error_message("image is 3x4 = 12 pixels") == "image is 3x4 = 12 pixels"
    assert _error_message(None) == "unknown error"


def test_top_rows_are_the_highest_scores(scan_dir: Path) -> None:
    data = load_scan(scan_dir, top=5, sample_rows=10)
    table = pq.read_table(scan_dir / "scores.parquet").filter(pa.compute.equal(pa.compute.field("status"), "ok"))
    best = np.sort(table.column("score").to_numpy())[::-1][:5]
    np.testing.assert_allclose([r.score for r in data.top], best, rtol=1e-6)
    assert data.n_rows == 109 and data.n_ok == 107 and data.sample_fraction == pytest.approx(10 / 109)
    assert data.score_hist.sum() == 107  # histograms count every row, not the sample
    # Labels come from the MVTec layout of the paths: train/good rows carry none.
    labelled = {r.label for r in load_scan(scan_dir).sample}
    assert labelled == {"good", "broken_large", "broken_small", "contamination", None}


def test_cli_report_writes_the_page(scan_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    target = tmp_path / "page.html"
    args = parser.parse_args(["report", str(scan_dir), "--out", str(target), "--top", "3", "--group-by", "folder"])
    assert args.func(args) == 0
    assert str(target) in capsys.readouterr().out
    page = target.read_text(encoding="utf-8")
    assert "Drift by folder" in page and page.count("data:image/jpeg") == 3 + 8


def test_missing_scan_output_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="scores.parquet not found"):
        build_report(tmp_path)
    pq.write_table(pa.table({"path": ["a.png"], "score": [0.1]}), tmp_path / "scores.parquet")
    with pytest.raises(DataError, match="lacks the columns \\['index', 'status'\\]"):
        build_report(tmp_path)


def _synthetic_scan(out_dir: Path, scores: np.ndarray, **columns: list) -> None:
    """Scores only (no maps, no images): enough for the counting, drift and label sections."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = scores.size
    table = {
        "path": [f"/nowhere/{i}.png" for i in range(n)], "index": list(range(n)), "score": scores.astype(np.float32),
        "status": ["ok"] * n, "error": [None] * n, "is_anomalous": scores >= 0.5, **columns,
    }
    pq.write_table(pa.table(table), out_dir / "scores.parquet")


def test_drift_flags_the_shifted_shard_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(0.0, 0.2, 300)
    scores = rng.normal(0.0, 0.2, 2000)
    shards = np.repeat(np.arange(10), 200)
    scores[shards == 7] += 0.3  # new lighting in shard 7
    scores[shards == 3] -= 0.3  # a darker camera in shard 3
    _synthetic_scan(tmp_path, scores, shard=shards.tolist())
    (tmp_path / "model.json").write_text(json.dumps({"method": "padim", "normal_scores": reference.tolist()}))
    page = build_report(tmp_path).read_text(encoding="utf-8")
    data = load_scan(tmp_path)
    assert data.group_kind == "shard" and len(data.group_names) == 10
    result = report_drift.drift(data.hist_edges, data.group_hists, data.group_names, np.sort(reference), None)
    assert [g.name for g in result.flagged] == ["3", "7"]
    assert [round(g.median_shift, 1) for g in result.flagged] == [-0.3, 0.3]
    assert "2 of 10 groups flagged" in page and "KS distance" in page
    assert page.count("DRIFT &uarr;") == 1 and page.count("DRIFT &darr;") == 1
    assert "No labels" in page and "maps.zarr could not be opened" in page  # tiles are drawn all the same


def test_drift_by_time_column_and_label_column(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random(600) < 0.2).astype(int)
    scores = rng.normal(0.0, 0.2, 600) + 0.8 * labels
    start = datetime(2024, 5, 1)
    times = [start + timedelta(hours=i) for i in range(600)]
    _synthetic_scan(tmp_path, scores, timestamp=times, label=labels.tolist())
    data = load_scan(tmp_path)
    assert data.group_kind == "time column 'timestamp'" and len(data.group_names) == 25  # 24 bins + "no time"
    assert data.group_hists.sum() == 600
    page = build_report(tmp_path).read_text(encoding="utf-8")
    assert "anomalous" in page and "AUROC" in page and "the other groups of this scan" in page


def test_ks_statistic_matches_scipy_on_the_histogram_edges() -> None:
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(2)
    group, reference = rng.normal(0.1, 0.2, 3000), rng.normal(0.0, 0.2, 200)
    edges = np.linspace(-1.5, 1.5, HIST_BINS + 1)
    hist = np.histogram(group, bins=edges)[0][None, :]
    result = report_drift.drift(edges, hist, ["g"], np.sort(reference), None)
    expected = ks_2samp(group, reference)
    assert result.groups[0].statistic == pytest.approx(expected.statistic, abs=0.01)
    assert result.groups[0].quantiles[0.5] == pytest.approx(np.median(group), abs=0.01)


def _chromium() -> str | None:
    import shutil

    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_report_renders_in_headless_chromium(report_html: str, scan_dir: Path, tmp_path: Path) -> None:
    """The page as a browser draws it: not blank, and the embedded plots decode (their colours show)."""
    import subprocess

    from PIL import Image

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
    shot = tmp_path / "report.png"
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", "--window-size=1280,2400", (scan_dir / "report.html").as_uri(),
    ]
    subprocess.run(command, check=True, timeout=120, capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape == (2400, 1280, 3)
    assert pixels.std() > 20  # not a blank page
    background = (np.abs(pixels - np.array([250, 250, 250])).sum(axis=2) < 6).mean()
    assert background < 0.9
    for bar_colour in ((0x4C, 0x72, 0xB0), (0xC4, 0x4E, 0x52)):  # histogram bars below / above the threshold
        assert (np.abs(pixels - np.array(bar_colour)).sum(axis=2) < 24).sum() > 200


def test_model_record_found_through_the_fingerprinted_model_dir(scan_dir: Path, tmp_path: Path) -> None:
    import hashlib
    import shutil

    from engine.report.meta import find_model_meta

    out = tmp_path / "out"
    shutil.copytree(scan_dir, out)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (out / "model.json").rename(model_dir / "model.json")
    blob = (model_dir / "model.json").read_bytes()
    scan_meta = {"model_dir": str(model_dir), "model_fingerprint": hashlib.sha256(blob).hexdigest()}
    meta, where = find_model_meta(out, scan_meta)
    assert meta is not None and meta["method"] == "mean-image" and "fingerprint checked" in where
    # another model.json in that folder now: not this scan's model, so only the maps' summary is used
    zarr.open_array(out / "maps.zarr" / "maps", mode="r+").attrs.update({"model": {"method": "padim"}, "threshold_raw": 1.5})
    meta, where = find_model_meta(out, {**scan_meta, "model_fingerprint": "0" * 64})
    assert meta == {"method": "padim", "threshold": 1.5} and "summary only" in where


@pytest.mark.slow
def test_report_of_a_real_scan(scan_model_dir: Path, bottle_root: Path, tmp_path: Path) -> None:
    """A real `scan` (PatchCore, 64 px) of bottle test images plus an unreadable file, then the report."""
    pipeline = pytest.importorskip("engine.scan.job", reason="the scan engine (engine/scan/job.py) is not there yet")
    items = datasets.test_items(bottle_root, "bottle")
    picked = [i.path for i in items if i.defect == "good"][:8] + [i.path for i in items if i.defect != "good"][::4]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(map(str, [*picked, broken])) + "\n")
    out = tmp_path / "scan"
    pipeline.scan(scan_model_dir, listing, out, pipeline.ScanOptions(device="cpu", shard_size=8, decoder="pillow"))
    page = build_report(out, top=6, contrast=3).read_text(encoding="utf-8")
    data = load_scan(out)
    assert data.n_rows == len(picked) + 1 and data.n_error == 1
    assert data.model_meta is not None and data.model_meta.get("method") == "patchcore"
    assert "patchcore" in page and "efficientnet_lite0" in page
    assert page.count("data:image/jpeg") == 6 + 3 and not re.search(r"https?:", page)
    assert {"good", "broken_large"} <= {r.label for r in data.sample}
    assert "Labelled accuracy" in page and "AUROC" in page
