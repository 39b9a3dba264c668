"""Odd names and odd file-system objects, scanned as a folder, a text list and a Parquet manifest: every
listed entry gets exactly one row saying what it is, and no scan hangs (a FIFO, a socket, /dev/zero,
link loops, a 1 GiB sparse file, a file deleted after listing, names that are not UTF-8)."""

from __future__ import annotations

import faulthandler
import os
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.inputs.sources import open_source
from engine.scan.job import scan
from engine.scan.progress import Progress
from engine.scan.store import utf8_path

SETTINGS = {"device": "cpu", "shard_size": 8, "batch_size": 4, "decoder": "pillow", "max_pixels": 10_000_000}
NOT_UTF8 = b"caf\xe9 latin-1.png"


def _png_with_big_chunk(png: bytes, size: int) -> bytes:
    """A valid PNG with a `size`-byte private ancillary chunk after IHDR (a huge header)."""
    body = b"prVt" + b"\0" * size
    chunk = struct.pack(">I", size) + body + struct.pack(">I", zlib.crc32(body))
    return png[:33] + chunk + png[33:]


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A scan that hangs fails the run with every thread's traceback instead of blocking CI."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture()
def corpus(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A folder of odd entries -> (folder, {entry name: what its row must say ("ok" or a phrase)})."""
    from imagegen import png_bytes

    root = tmp_path / "odd"
    root.mkdir()
    good = png_bytes(40, 40, seed=1)
    expect: dict[str, str] = {}

    def put(name: str, data: bytes, outcome: str = "ok") -> None:
        (root / name).write_bytes(data)
        expect[name] = outcome

    put("good.png", good)
    put("with  spaces .png", good)
    put("-leading-dash.png", good)
    put("ünïcödé 图像.png", good)
    put("new\nline.png", good)
    put("n" * 240 + ".png", good)  # a name near NAME_MAX
    put("zero_bytes.png", b"", "empty file")
    put("text.png", b"hello, not an image\n" * 10, "not a recognised image")
    put("huge_header.png", _png_with_big_chunk(good, 3 << 20))
    put("zz_deleted_after_listing.png", good, "file not found")
    with open(os.fsencode(root) + b"/" + NOT_UTF8, "wb") as fh:
        fh.write(good)
    expect[os.fsdecode(NOT_UTF8)] = "ok"
    with open(root / "sparse_huge.png", "wb") as fh:
        fh.truncate(1 << 30)  # 1 GiB: more than any image within max_pixels can be
    expect["sparse_huge.png"] = "larger than any image"
    os.symlink(root / "good.png", root / "link_to_good.png")
    expect["link_to_good.png"] = "ok"
    os.symlink(root / "gone.png", root / "broken_link.png")
    expect["broken_link.png"] = "broken symbolic link"
    os.symlink("self_loop.png", root / "self_loop.png")
    expect["self_loop.png"] = "symbolic link loop"
    os.mkfifo(root / "fifo.png")
    os.symlink(root / "fifo.png", root / "link_to_fifo.png")
    expect["link_to_fifo.png"] = "is a FIFO"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "sock.png"))
    try:
        yield root, expect
    finally:
        server.close()


def _delete_after_listing(root: Path) -> Progress:
    class Deleting(Progress):
        def begin(self, total: int, done: int = 0) -> None:  # called once the source is planned, before reads
            super().begin(total, done)
            (root / "zz_deleted_after_listing.png").unlink(missing_ok=True)

    return Deleting(0, quiet=True)


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out / "scores.parquet").to_pylist()


def _check(row: dict, outcome: str) -> None:
    if outcome == "ok":
        assert row["status"] == "ok", row
    else:
        assert row["status"] == "error" and outcome in row["error"], row


def test_folder_scan_gives_every_listed_entry_one_row(scan_model_dir: Path, corpus, tmp_path: Path) -> None:
    root, expect = corpus
    listed = [r.path for r in open_source(root).records()]  # what a folder scan lists: FIFO and socket are not files
    assert str(root / "fifo.png") not in listed and str(root / "sock.png") not in listed
    assert sorted(Path(p).name for p in listed) == sorted(expect)
    scan(scan_model_dir, root, tmp_path / "out", progress=_delete_after_listing(root), **SETTINGS)
    rows = _rows(tmp_path / "out")
    assert [r["path"] for r in rows] == [utf8_path(p) for p in listed]  # one row each, in order
    for row, path in zip(rows, listed, strict=True):
        _check(row, expect[Path(path).name])
    (bad,) = [r for r in rows if r["path_bytes"] is not None]
    assert bad["path"].endswith("caf\\xe9 latin-1.png") and bad["path_bytes"] == os.fsencode(root) + b"/" + NOT_UTF8
    with open(bad["path_bytes"], "rb") as fh:  # the raw bytes reopen the file; the escaped text would not
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not os.path.exists(bad["path"])
    assert all(r["path_bytes"] is None for r in rows if r is not bad)


def test_list_and_manifest_scans_give_every_entry_one_row(scan_model_dir: Path, corpus, tmp_path: Path) -> None:
    root, expect = corpus
    extra = {
        str(root / "fifo.png"): "is a FIFO (named pipe)",  # a folder scan skips it; named, it is a row
        str(root / "sock.png"): "is a socket",
        "/dev/zero": "is a character device",
        "/dev/null": "is a character device",
        str(root / "dir.png"): "is a folder",
        str(root / "missing.png"): "file not found",
        str(root / "good.png" / "x.png"): "a part of the path is a file",
        "/" + "d" * 300 + "/x.png": "path too long",
        "relative/../good.png": "file not found",  # opened relative to the list: odd/relative does not exist
    }
    (root / "dir.png").mkdir()
    names = [n for n in sorted(expect) if "\n" not in n and n != os.fsdecode(NOT_UTF8)]  # a list holds lines
    listing = tmp_path / "list.txt"
    with open(listing, "wb") as fh:
        for name in names:
            fh.write(os.fsencode(root / name) + b"\n")
        fh.write(os.fsencode(root) + b"/" + NOT_UTF8 + b"\n")  # raw bytes in the list file
        for path in extra:
            fh.write(os.fsencode(path) + b"\n")
    given = [str(root / n) for n in names] + [os.fsdecode(os.fsencode(root) + b"/" + NOT_UTF8), *extra]
    outcomes = [expect[n] for n in names] + ["ok", *extra.values()]
    scan(scan_model_dir, listing, tmp_path / "list_out", progress=_delete_after_listing(root), **SETTINGS)
    rows = _rows(tmp_path / "list_out")
    assert [r["path"] for r in rows] == [utf8_path(p) for p in given]
    for row, outcome in zip(rows, outcomes, strict=True):
        _check(row, "file not found" if "zz_deleted" in row["path"] else outcome)

    # A manifest holds what a list cannot: a newline in a name, a NUL, an empty path, raw bytes.
    (root / "zz_deleted_after_listing.png").write_bytes((root / "good.png").read_bytes())
    texts = [str(root / n) for n in sorted(expect) if n != os.fsdecode(NOT_UTF8)] + list(extra)
    texts += [str(root / "a\0b.png"), ""]
    raw = [None] * len(texts) + [os.fsencode(root) + b"/" + NOT_UTF8]
    texts.append(utf8_path(os.fsdecode(raw[-1])))
    manifest = tmp_path / "inputs.parquet"
    pq.write_table(pa.table({"path": texts, "path_bytes": pa.array(raw, pa.binary()), "n": list(range(len(texts)))}),
                   manifest)  # fmt: skip
    scan(scan_model_dir, manifest, tmp_path / "manifest_out", **SETTINGS)
    rows = _rows(tmp_path / "manifest_out")
    assert len(rows) == len(texts) and [r["n"] for r in rows] == list(range(len(texts)))
    outcomes = [expect[n] for n in sorted(expect) if n != os.fsdecode(NOT_UTF8)]
    outcomes = [("ok" if o == "file not found" else o) for o in outcomes]  # the deleted file is back
    outcomes += [*extra.values(), "NUL character", "no path given", "ok"]
    for row, outcome in zip(rows, outcomes, strict=True):
        _check(row, outcome)
    assert rows[-1]["path_bytes"] == raw[-1] and rows[-1]["path"] == texts[-1]


def test_a_scans_own_scores_reopen_every_file_as_a_manifest(scan_model_dir: Path, corpus, tmp_path: Path) -> None:
    """scores.parquet, fed back as a manifest (its path_bytes column), rescans the same files: the name
    that is not UTF-8 included."""
    root, _ = corpus
    scan(scan_model_dir, root, tmp_path / "first", **SETTINGS)
    again = tmp_path / "again"
    scan(scan_model_dir, tmp_path / "first" / "scores.parquet", again, **SETTINGS)
    first, second = _rows(tmp_path / "first"), _rows(again)
    assert [r["status"] for r in second] == [r["status"] for r in first]
    assert [(r["path"], r["path_bytes"]) for r in second] == [(r["path"], r["path_bytes"]) for r in first]
    assert [r["score"] for r in second] == [r["score"] for r in first]
