"""Scan inputs: enumerate a source lazily in a stable order, give each input a position, cut shards.

A SOURCE is a folder (recursive, image extensions in any letter case, hidden entries skipped, and in an
MVTec layout the ground_truth/ masks beside test/ skipped), a glob
(`**` allowed), a text file of paths (one a line, `#` comments), or a Parquet manifest with a `path`
column whose other columns travel with each record. Relative paths in a list or manifest are opened
relative to the file that lists them; `path` keeps the text as given. Nothing holds the whole listing:
folders and globs are walked one directory at a time (sorted), lists and manifests are streamed.

Shards are fixed-size runs of consecutive positions: shard k holds positions [k*size, (k+1)*size).
The order, and so every shard, is the same on every run over the same input.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import DataError
from engine.inputs.datasets import is_image_path

MANIFEST_BATCH_ROWS = 16_384  # rows decoded to Python at a time (a few MiB)
_MAGIC = re.compile(r"[*?\[]")
MVTEC_MASKS = "ground_truth"  # beside a test/ folder (MVTec layout): defect masks, not inputs
RAW_PATH_COLUMN = "path_bytes"  # a manifest's (and scores.parquet's) raw bytes of a path that is not UTF-8


@dataclass(frozen=True)
class Record:
    """One input: its position in the enumeration, the path as given, the file to open, carried columns."""

    position: int
    path: str
    file: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Shard:
    """A unit of work and of retry: consecutive records starting at `start`."""

    id: int
    start: int
    records: list[Record]

    @property
    def stop(self) -> int:
        return self.start + len(self.records)


def _walk_sorted(root: Path, ancestors: set[tuple[int, int]] | None = None) -> Iterator[Path]:
    """Files below root, depth first, names sorted within each folder; hidden entries skipped.

    Symlinked folders are followed unless they lead back to a folder being walked (a loop);
    `ancestors` holds the device and inode of the folders on the current path, so memory is O(depth).
    """
    ancestors = set() if ancestors is None else ancestors
    try:
        stat = root.stat()
    except FileNotFoundError:
        if not ancestors:  # SOURCE itself
            raise DataError(f"folder {root} does not exist (any more)") from None
        return  # a subfolder removed while the walk ran: nothing left to list
    key = (stat.st_dev, stat.st_ino)
    if key in ancestors:
        return
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list folder {root}: {exc.strerror}") from exc
    ancestors.add(key)
    mvtec = any(e.name == "test" and e.is_dir() for e in entries)
    for entry in entries:
        if entry.name.startswith(".") or (mvtec and entry.name == MVTEC_MASKS):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:  # a link loop, say: an input whose read says what it is (engine.inputs.reader)
            yield Path(entry.path)
            continue
        if is_dir:
            yield from _walk_sorted(Path(entry.path), ancestors)
        elif entry.is_file(follow_symlinks=True) or entry.is_symlink():  # a dangling link is an input too
            yield Path(entry.path)
    ancestors.discard(key)


def _glob_sorted(base: Path, parts: list[str]) -> Iterator[Path]:
    """Sorted glob: one pattern part per folder level; `**` matches zero or more folders."""
    if not parts:
        if base.is_file():
            yield base
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        yield from _glob_sorted(base, rest)
        for sub in sorted((p for p in _listdir(base) if p.is_dir() and not p.name.startswith(".")), key=str):
            yield from _glob_sorted(sub, parts)
    elif _MAGIC.search(head):
        hidden_ok = head.startswith(".")
        for child in sorted(_listdir(base), key=lambda p: p.name):
            if fnmatch.fnmatchcase(child.name, head) and (hidden_ok or not child.name.startswith(".")):
                yield from _glob_sorted(child, rest)
    else:
        yield from _glob_sorted(base / head, rest)


def _listdir(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder)]
    except (NotADirectoryError, FileNotFoundError):
        return []


class Source:
    """A stable enumeration of inputs. `records()` streams them; `extra_schema` types carried columns."""

    kind = "source"

    def __init__(self, spec: str):
        self.spec = spec
        self.extra_schema = pa.schema([])

    def _items(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        raise NotImplementedError

    def records(self) -> Iterator[Record]:
        for position, (path, file, extra) in enumerate(self._items()):
            yield Record(position, path, file, extra)

    def describe(self) -> str:
        return f"{self.kind} {self.spec}"


class FolderSource(Source):
    kind = "folder"

    def _items(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        for path in _walk_sorted(Path(self.spec)):
            if is_image_path(path):
                yield str(path), str(path), {}


class GlobSource(Source):
    kind = "glob"

    def _items(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        pattern = Path(self.spec)
        parts = list(pattern.parts)
        anchor = Path(parts.pop(0)) if pattern.is_absolute() else Path(".")
        for path in _glob_sorted(anchor, parts):
            text = str(path)
            yield text, text, {}


class ListSource(Source):
    """A text file, one path a line; blank lines and lines starting with # are skipped."""

    kind = "list"

    def _items(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        base = Path(self.spec).parent
        # Paths are bytes on POSIX: bytes that are not UTF-8 survive as surrogates; a BOM is not part of a path.
        with open(self.spec, encoding="utf-8-sig", errors="surrogateescape") as lines:
            for line in lines:
                text = line.rstrip("\r\n").strip()
                if text and not text.startswith("#"):
                    yield text, str(base / text), {}


class ManifestSource(Source):
    """A Parquet file with a `path` column; its other columns are carried into scores.parquet.

    `path` holds strings (or raw bytes: binary). A binary `path_bytes` column, as scores.parquet has,
    names the file by its raw bytes where it is not null (a name that is not UTF-8), so a scan's own
    scores.parquet reopens every file it lists."""

    kind = "manifest"

    def __init__(self, spec: str):
        super().__init__(spec)
        try:
            schema = pq.read_schema(spec)
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"cannot read the Parquet manifest {spec}: {exc}") from exc
        if "path" not in schema.names:
            raise DataError(f"Parquet manifest {spec} has no 'path' column; its columns are {schema.names}")
        if not _is_text_or_bytes(schema.field("path").type):
            raise DataError(f"the 'path' column of {spec} must hold strings, found {schema.field('path').type}")
        self.raw_column = RAW_PATH_COLUMN if RAW_PATH_COLUMN in schema.names else None
        if self.raw_column and not _is_bytes(schema.field(RAW_PATH_COLUMN).type):
            raise DataError(
                f"the {RAW_PATH_COLUMN!r} column of {spec} must hold raw bytes (binary), found "
                f"{schema.field(RAW_PATH_COLUMN).type}"
            )
        self.extra_schema = pa.schema([f for f in schema if f.name not in ("path", RAW_PATH_COLUMN)])

    def _items(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        base = Path(self.spec).parent
        names = self.extra_schema.names
        for batch in pq.ParquetFile(self.spec).iter_batches(batch_size=MANIFEST_BATCH_ROWS):
            columns = batch.to_pydict()
            raw = columns[self.raw_column] if self.raw_column else None
            for row, text in enumerate(columns["path"]):
                extra = {name: columns[name][row] for name in names}
                if raw is not None and raw[row] is not None:
                    text = os.fsdecode(raw[row])  # the name as on disk, not its UTF-8 rendering
                elif isinstance(text, bytes):
                    text = os.fsdecode(text)
                text = text or ""
                yield text, str(base / text), extra


def _is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _is_text_or_bytes(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):  # a pandas categorical
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or _is_bytes(kind)


def open_source(spec: str | Path) -> Source:
    """Pick the kind of source from SPEC: folder, Parquet manifest, text list, or glob."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        return FolderSource(text)
    if path.is_file():
        if path.suffix.lower() in (".parquet", ".pq"):
            return ManifestSource(text)
        if is_image_path(path):
            return GlobSource(text)  # a single image file
        return ListSource(text)
    if _MAGIC.search(text):
        return GlobSource(text)
    raise DataError(
        f"SOURCE {text!r} is not a folder, a file list, a Parquet manifest or a glob that could match files; "
        "check the path"
    )


@dataclass(frozen=True)
class Plan:
    """What one counting pass over the source found: input count and a fingerprint of the listing."""

    count: int
    fingerprint: str


def plan(source: Source, each: Callable[[Record], None] | None = None) -> Plan:
    """Stream the whole enumeration once: count it and hash paths and carried values (a changed input).

    `each` sees every record on the way (engine.inputs.listing keeps them)."""
    digest = hashlib.sha256()
    count = 0
    for record in source.records():
        if each is not None:
            each(record)
        digest.update(record.path.encode("utf-8", "surrogateescape") + b"\0")
        if record.extra:
            digest.update(repr(list(record.extra.values())).encode("utf-8", "surrogateescape") + b"\0")
        count += 1
    return Plan(count, digest.hexdigest())


def iter_shards(source: Source, shard_size: int) -> Iterator[Shard]:
    """Consecutive fixed-size shards; only one shard's records are held at a time."""
    if shard_size < 1:
        raise DataError(f"shard size must be at least 1, got {shard_size}")
    records: list[Record] = []
    shard_id = 0
    for record in source.records():
        records.append(record)
        if len(records) == shard_size:
            yield Shard(shard_id, shard_id * shard_size, records)
            shard_id, records = shard_id + 1, []
    if records:
        yield Shard(shard_id, shard_id * shard_size, records)


def shard_count(count: int, shard_size: int) -> int:
    return (count + shard_size - 1) // shard_size
