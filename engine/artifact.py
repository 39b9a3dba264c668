"""Model files: MODEL_DIR/model.safetensors (the fitted tensors) + MODEL_DIR/model.json (everything else).

Never pickle. model.json records the SHA-256 of model.safetensors and every tensor's shape and dtype,
so a truncated, tampered or mismatched file is refused with a message that names the problem.
Backbone weights are not copied into the model (no 100 MB folder per fit): they come from the installed
package, or from the weights file recorded at fit time (override with `weights=`).

This module is the file format only: it writes what a model hands it and reads back checked tensors
and metadata. Turning those into a model object is engine.models.registry.load_model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from engine import __version__
from engine.errors import ModelFileError

if TYPE_CHECKING:
    import torch

FORMAT = "vade-model"
FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
META_FILE = "model.json"
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+ and torch.save's zip container


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class SavableModel(Protocol):
    """What save_model needs of a model: its tensors and its JSON description."""

    meta: dict[str, Any]

    def tensors(self) -> dict[str, torch.Tensor]: ...


def model_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 of model.json: what a scan means by "the same model" (model.json holds the tensors' hash)."""
    return file_sha256(Path(model_dir) / META_FILE)


def save_model(model: SavableModel, model_dir: str | Path) -> Path:
    """Write model.safetensors then model.json (json last: a model without it is incomplete)."""
    from safetensors.torch import save

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = model.tensors()
    blob = save(tensors, metadata={"format": FORMAT})
    _atomic_write(model_dir / TENSORS_FILE, blob)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vade_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **model.meta,
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for name, t in tensors.items()},
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    _atomic_write(model_dir / META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    return model_dir


def read_meta(model_dir: str | Path, methods: tuple[str, ...] | None = None) -> dict:
    """model.json, checked for format, required keys and (given `methods`) a known method."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFileError(f"model directory not found: {model_dir} (create one with `vade fit`)")
    meta_path = model_dir / META_FILE
    if not meta_path.is_file():
        raise ModelFileError(f"{meta_path} is missing: {model_dir} is not a vade model directory")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{meta_path} is not valid JSON (truncated or edited?): {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{meta_path} is not a vade model description (format must be {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{meta_path} has format_version {meta.get('format_version')!r}; this vade {__version__} reads "
            f"version {FORMAT_VERSION}: refit the model or use a matching vade"
        )
    for key in ("method", "config", "tensors", "weights_sha256", "calibration"):
        if key not in meta:
            raise ModelFileError(f"{meta_path} lacks the key {key!r}: the file is incomplete")
    if methods is not None and meta["method"] not in methods:
        raise ModelFileError(f"{meta_path} names an unknown method {meta['method']!r}; known: {sorted(methods)}")
    return meta


def read_tensors(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    if not path.is_file():
        raise ModelFileError(f"{path} is missing")
    blob = path.read_bytes()
    if blob[:4].startswith(PICKLE_MAGIC):
        raise ModelFileError(
            f"{path} is a pickle / torch.save file, not safetensors; vade never loads pickles "
            "(they can run code). Refit the model with `vade fit`."
        )
    if hashlib.sha256(blob).hexdigest() != meta["weights_sha256"]:
        raise ModelFileError(
            f"{path} does not match the SHA-256 recorded in model.json: the file is truncated, "
            "tampered with, or from another model. Refit, or restore both files together."
        )
    try:
        tensors = load(blob)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelFileError(f"{path} is not a readable safetensors file: {exc}") from exc
    expected = meta["tensors"]
    if set(tensors) != set(expected):
        raise ModelFileError(f"{path} holds tensors {sorted(tensors)}, model.json expects {sorted(expected)}")
    for name, spec in expected.items():
        shape, dtype = list(tensors[name].shape), str(tensors[name].dtype).removeprefix("torch.")
        if shape != spec["shape"] or dtype != spec["dtype"]:
            raise ModelFileError(f"tensor {name!r} is {dtype}{shape}, model.json expects {spec['dtype']}{spec['shape']}")
    return tensors
