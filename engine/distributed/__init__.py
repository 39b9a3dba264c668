"""Distributed scans: the Dask driver, the clusters it runs on, and the worker-side task."""
