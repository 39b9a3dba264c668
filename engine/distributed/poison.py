"""Poison inputs found by a distributed scan, kept on disk so a resumed scan does not crash on them again.

Finding one input that kills its worker costs several worker deaths per level of splitting
(engine.distributed.driver). Each one found is recorded at once, with its error row's message, in
OUT_DIR/_parts/shard-K.poison.json (beside the shard's part, written atomically, by the driver only).
When a driver dies before that shard is finished, the resumed scan reads the record and scans the
shard around the known inputs: their error rows are written from the record (the same message, so the
result is the same bytes as an uninterrupted scan), and no worker dies for them again. The records go
when scores.parquet is consolidated, with the parts.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from engine.inputs.sources import Record, Shard
from engine.scan.store import ScanStore


class PoisonLedger:
    """Per shard: the positions of inputs that killed their worker every time, and their messages."""

    def __init__(self, store: ScanStore):
        self.folder = store.parts_dir

    def _path(self, shard_id: int) -> Path:
        return self.folder / f"shard-{shard_id:08d}.poison.json"

    def known(self, shard_id: int) -> dict[int, str]:
        path = self._path(shard_id)
        if not path.is_file():
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
        return {int(position): str(message) for position, message in data["inputs"].items()}

    def add(self, shard_id: int, position: int, message: str) -> None:
        inputs = {**self.known(shard_id), position: message}
        data = {"shard": shard_id, "inputs": {str(p): m for p, m in sorted(inputs.items())}}
        path = self._path(shard_id)
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(json.dumps(data, indent=1).encode("utf-8"))
        os.replace(tmp, path)


def around(shard: Shard, known: dict[int, str]) -> tuple[list[Shard], list[Shard]]:
    """The shard cut at its known poison inputs: (runs of the other records, one-record pieces of the poison)."""
    runs: list[Shard] = []
    poison: list[Shard] = []
    current: list[Record] = []
    for record in shard.records:
        if record.position in known:
            if current:
                runs.append(Shard(shard.id, current[0].position, current))
                current = []
            poison.append(Shard(shard.id, record.position, [record]))
        else:
            current.append(record)
    if current:
        runs.append(Shard(shard.id, current[0].position, current))
    return runs, poison
