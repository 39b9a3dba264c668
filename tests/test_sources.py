"""Sources: stable lazy enumeration of folders, globs, lists and Parquet manifests; shards; bounded memory."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.errors import DataError
from engine.inputs.sources import (
    FolderSource,
    GlobSource,
    ListSource,
    ManifestSource,
    iter_shards,
    open_source,
    plan,
    shard_count,
)


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    _touch(
        tmp_path,
        "b.png", "A.JPG", "c.Jpeg", "notes.txt", ".hidden.png", "sub/z.tif", "sub/deeper/y.webp",
        ".git/x.png", "sub/with space ü.png", "sub2/a.BMP",
    )  # fmt: skip
    return tmp_path


def _paths(source) -> list[str]:
    return [r.path for r in source.records()]


def test_folder_is_recursive_sorted_any_case_and_skips_hidden(tree: Path) -> None:
    got = [os.path.relpath(p, tree) for p in _paths(open_source(tree))]
    assert got == ["A.JPG", "b.png", "c.Jpeg", "sub/deeper/y.webp", "sub/with space ü.png", "sub/z.tif", "sub2/a.BMP"]
    assert isinstance(open_source(tree), FolderSource)


def test_mvtec_masks_beside_test_are_not_inputs(tmp_path: Path) -> None:
    _touch(tmp_path, "bottle/test/good/000.png", "bottle/ground_truth/broken/000_mask.png", "bottle/train/good/1.png")
    _touch(tmp_path, "other/ground_truth/kept.png")  # no test/ beside it: an ordinary folder
    got = [os.path.relpath(p, tmp_path) for p in _paths(open_source(tmp_path))]
    assert got == ["bottle/test/good/000.png", "bottle/train/good/1.png", "other/ground_truth/kept.png"]


def test_dangling_link_is_an_input(tree: Path) -> None:
    os.symlink(tree / "gone.png", tree / "link.png")
    assert str(tree / "link.png") in _paths(open_source(tree))  # scanned, it becomes a "file not found" row


def test_folder_symlink_loop_is_walked_once(tree: Path) -> None:
    os.symlink(tree / "sub", tree / "sub" / "loop")
    assert len(_paths(open_source(tree))) == 7


def test_glob_with_double_star_is_sorted(tree: Path) -> None:
    src = open_source(str(tree / "**" / "*.png"))
    assert isinstance(src, GlobSource)
    assert [os.path.relpath(p, tree) for p in _paths(src)] == ["b.png", "sub/with space ü.png"]
    assert [os.path.relpath(p, tree) for p in _paths(open_source(str(tree / "sub*" / "*")))] == [
        "sub/with space ü.png", "sub/z.tif", "sub2/a.BMP",
    ]  # fmt: skip


def test_list_file_keeps_paths_as_given_and_opens_relative_to_the_list(tree: Path) -> None:
    listing = tree / "inputs.txt"
    listing.write_text(f"# a comment\nb.png\n\n  sub/z.tif  \n{tree / 'A.JPG'}\nmissing.png\n", encoding="utf-8")
    src = open_source(listing)
    assert isinstance(src, ListSource)
    records = list(src.records())
    assert [r.path for r in records] == ["b.png", "sub/z.tif", str(tree / "A.JPG"), "missing.png"]
    assert records[0].file == str(tree / "b.png") and records[2].file == str(tree / "A.JPG")
    assert [r.position for r in records] == [0, 1, 2, 3]


def test_manifest_carries_columns(tree: Path) -> None:
    manifest = tree / "m.parquet"
    table = pa.table({"site": ["a", "b"], "path": ["b.png", "sub/z.tif"], "score": [1.5, 2.5]})
    pq.write_table(table, manifest)
    src = open_source(manifest)
    assert isinstance(src, ManifestSource)
    assert src.extra_schema.names == ["site", "score"]
    records = list(src.records())
    assert records[1].extra == {"site": "b", "score": 2.5} and records[1].file == str(tree / "sub/z.tif")


def test_manifest_without_path_column_is_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({"file": ["a.png"]}), tmp_path / "m.parquet")
    with pytest.raises(DataError, match="no 'path' column"):
        open_source(tmp_path / "m.parquet")


def test_unknown_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        open_source(tmp_path / "nothing_here")


def test_shards_are_fixed_size_and_stable(tree: Path) -> None:
    src = open_source(tree)
    shards = list(iter_shards(src, 3))
    assert [(s.id, s.start, len(s.records)) for s in shards] == [(0, 0, 3), (1, 3, 3), (2, 6, 1)]
    assert [r.position for s in shards for r in s.records] == list(range(7))
    assert shard_count(7, 3) == 3
    again = list(iter_shards(open_source(tree), 3))
    assert [[r.path for r in s.records] for s in again] == [[r.path for r in s.records] for s in shards]


def test_plan_counts_and_fingerprints_the_listing(tree: Path) -> None:
    first = plan(open_source(tree))
    assert first.count == 7 and plan(open_source(tree)) == first
    _touch(tree, "new.png")
    assert plan(open_source(tree)).fingerprint != first.fingerprint


@pytest.mark.parametrize("kind", ["list", "manifest"])
def test_large_inputs_stream_in_bounded_memory(tmp_path: Path, kind: str) -> None:
    """100k inputs are counted and sharded holding one shard (and one manifest batch) at a time.

    Holding all 100k records takes 35-50 MiB of Python objects; streaming peaks near 5 MiB (other
    threads of the test session can add a few MiB to the traced peak).
    """
    n = 100_000
    paths = [f"folder_{i // 1000:04d}/image_{i:07d}.jpg" for i in range(n)]
    if kind == "list":
        spec = tmp_path / "inputs.txt"
        spec.write_text("\n".join(paths) + "\n", encoding="utf-8")
    else:
        spec = tmp_path / "inputs.parquet"
        pq.write_table(pa.table({"path": paths, "camera": [i % 7 for i in range(n)]}), spec, row_group_size=50_000)
    del paths
    src = open_source(spec)
    assert plan(src).count == n
    tracemalloc.start()
    try:
        seen = sum(len(s.records) for s in iter_shards(src, 1000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == n
    assert peak < 16 * 1024**2, f"peak {peak / 1024**2:.1f} MiB: the listing was held in memory"


def test_list_with_a_bom_and_a_categorical_manifest_path(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbfa.png\r\nb.png\n")  # saved by a Windows editor
    assert [r.path for r in open_source(listing).records()] == ["a.png", "b.png"]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": pa.array(["a.png", "b.png", "a.png"]).dictionary_encode()}), manifest)
    assert [r.path for r in open_source(manifest).records()] == ["a.png", "b.png", "a.png"]
