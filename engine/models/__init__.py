"""Anomaly models: base.py holds what every method shares, one file per method, registry.py the names."""
