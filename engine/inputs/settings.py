"""Input settings the command line shows before anything heavy is imported (no torch, no Pillow here)."""

from __future__ import annotations

DECODERS = ("auto", "dali", "pillow", "nvjpeg")
# Pillow's own decompression-bomb limit (2 x 89,478,485 pixels, about 13,400 x 13,400): larger images are
# refused unless the caller raises the limit (vade scan --max-pixels).
DEFAULT_MAX_PIXELS = 2 * 89_478_485
# Seconds a scan, fit or eval waits for one file's read to finish (vade scan --read-timeout): far above any
# healthy read (a 200 MB file at 10 MB/s takes 20 s), short enough that a hung network mount costs minutes.
DEFAULT_READ_TIMEOUT_S = 60.0
