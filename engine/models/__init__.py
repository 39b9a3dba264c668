"""Anomaly models: each file holds only what is particular to its method."""

from __future__ import annotations

from engine.models.base import AnomalyModel, ScoreOutput
from engine.models.padim import PaDiM
from engine.models.patchcore import PatchCore

MODELS: dict[str, type[AnomalyModel]] = {"patchcore": PatchCore, "padim": PaDiM}

__all__ = ["MODELS", "AnomalyModel", "PaDiM", "PatchCore", "ScoreOutput"]
