"""Input settings the command line shows before anything heavy is imported (no torch, no Pillow here)."""

from __future__ import annotations

DECODERS = ("auto", "dali", "pillow", "nvjpeg")
# Pillow's own decompression-bomb limit (2 x 89,478,485 pixels, about 13,400 x 13,400): larger images are
# refused unless the caller raises the limit (vade scan --max-pixels).
DEFAULT_MAX_PIXELS = 2 * 89_478_485
