"""What every verb shares: messages to stderr."""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    """A progress or status line for people (stderr; stdout is kept for results)."""
    print(msg, file=sys.stderr, flush=True)
