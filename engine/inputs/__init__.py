"""Inputs: enumerate sources into records and shards, inspect files, decode and resize pixels."""
