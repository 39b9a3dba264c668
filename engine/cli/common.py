"""What every verb shares: messages to stderr, checks of shared flags."""

from __future__ import annotations

import sys

from engine.errors import ConfigError


def say(msg: str) -> None:
    """A progress or status line for people (stderr; stdout is kept for results)."""
    print(msg, file=sys.stderr, flush=True)


def positive_seconds(seconds: float, flag: str = "--read-timeout") -> float:
    """A flag's number of seconds, refused unless > 0 and finite."""
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"{flag} must be a number of seconds > 0, got {seconds!r}")
    return seconds
