"""A scan's listing: SOURCE enumerated once, kept in a Parquet file, and the shards cut from that file.

A folder or a glob is a live thing: files come and go while a scan of millions runs. Planning a scan
counts the inputs (the size of maps.zarr) and fingerprints them; the shards are cut later. Were the
source walked again for the shards, a file deleted in between would shift every later position and
one added would fall outside maps.zarr. So planning writes each record as it is listed to
OUT_DIR/_listing.parquet (streamed: memory holds one batch), and the shards are read back from there:
every listed entry gets exactly one row, and a file deleted after listing is a "file not found" row.

Columns: `path` and `file` as raw bytes (os.fsencode: a name that is not UTF-8 comes back as it was;
`file` null where it equals `path`), then the source's carried columns with their own types.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.inputs.sources import Plan, Record, Source, plan

LISTING_NAME = "_listing.parquet"
LISTING_BATCH = 16_384  # records buffered before a Parquet row group is written


def write_listing(source: Source, path: Path) -> Plan:
    """Plan `source` (engine.inputs.sources.plan) and keep every record it lists in `path`."""
    schema = pa.schema([("path", pa.binary()), ("file", pa.binary()), *source.extra_schema])
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}

    with pq.ParquetWriter(path, schema, compression="zstd") as out:

        def flush() -> None:
            out.write_batch(pa.record_batch([pa.array(columns[f.name], f.type) for f in schema], schema=schema))
            for values in columns.values():
                values.clear()

        def keep(record: Record) -> None:
            columns["path"].append(os.fsencode(record.path))
            columns["file"].append(None if record.file == record.path else os.fsencode(record.file))
            for name in source.extra_schema.names:
                columns[name].append(record.extra.get(name))
            if len(columns["path"]) >= LISTING_BATCH:
                flush()

        planned = plan(source, keep)
        if columns["path"] or planned.count == 0:
            flush()
    return planned


class ListingSource(Source):
    """The records of a written listing, in order: what `source` listed when the scan was planned."""

    def __init__(self, source: Source, path: Path):
        super().__init__(source.spec)
        self.kind, self.extra_schema, self.path = source.kind, source.extra_schema, Path(path)

    def _items(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        names = self.extra_schema.names
        for batch in pq.ParquetFile(self.path).iter_batches(batch_size=LISTING_BATCH):
            columns = batch.to_pydict()
            for row, raw in enumerate(columns["path"]):
                path = os.fsdecode(raw)
                file = columns["file"][row]
                yield path, path if file is None else os.fsdecode(file), {n: columns[n][row] for n in names}
