"""The model directory must not change under a running scan: ModelGuard notices when it does.

A scan holds its model in memory, but its scan.json names the model by the SHA-256 of model.json, and
--resume refuses another model. A model replaced mid-scan would leave a scan that can no longer be
resumed, or (on a cluster) workers loading a different model: so the scan stops, saying so
(ModelChanged, exit 6). check() costs a stat of two files; the files are hashed only when a stat changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from engine.artifact import META_FILE, TENSORS_FILE, file_sha256, model_fingerprint
from engine.faults import ModelChanged


def _stat_key(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ModelGuard:
    """Raises ModelChanged from check() once MODEL_DIR no longer holds the model with `fingerprint`."""

    def __init__(self, model_dir: str | Path, fingerprint: str):
        self.model_dir, self.fingerprint = Path(model_dir), fingerprint
        self.files = (self.model_dir / META_FILE, self.model_dir / TENSORS_FILE)
        self._seen = self._stats()

    def _stats(self) -> tuple:
        return tuple(_stat_key(p) for p in self.files)

    def check(self) -> None:
        now = self._stats()
        if now == self._seen:
            return
        problem = self._problem()
        if problem:
            raise ModelChanged(
                f"the model directory {self.model_dir} changed during the scan: {problem}; put back the model "
                f"the scan started with (model.json SHA-256 {self.fingerprint[:12]}...)"
            )
        self._seen = now  # touched or copied over with the same bytes

    def _problem(self) -> str | None:
        meta, tensors = self.files
        if not meta.is_file() or not tensors.is_file():
            return f"{META_FILE} or {TENSORS_FILE} is gone"
        try:
            if model_fingerprint(self.model_dir) != self.fingerprint:
                return f"{META_FILE} is not the one the scan started with"
            recorded = json.loads(meta.read_text(encoding="utf-8")).get("weights_sha256")
            if recorded and file_sha256(tensors) != recorded:
                return f"{TENSORS_FILE} no longer matches {META_FILE}"
        except (OSError, ValueError) as exc:
            return f"it cannot be read ({exc})"
        return None
