"""Scanning: options, the loader, model and writer stages, the overlapped loop, outputs and progress."""
