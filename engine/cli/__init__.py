"""The `vade` command line: one module per verb, each a thin layer over engine.api and its stages.

Parsing a command line imports nothing heavy (no torch, zarr, dask, pyarrow or matplotlib): each verb
imports what it needs when it runs, so `vade --help` and usage errors answer at once.
"""
