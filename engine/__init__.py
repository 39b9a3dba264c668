"""vade: visual anomaly detection engine (PatchCore, PaDiM) for very large image collections."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
