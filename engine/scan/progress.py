"""Progress of long work (a scan, a fit's feature pass): a redrawn bar with items/s and ETA on a
terminal, plain periodic lines elsewhere, on stderr.

Rates are measured over the items processed in this run (a resumed scan counts what it skipped as
already done, not as speed). `counted` wraps an iterator of batches in a bar.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Thread-safe counter that draws itself. `advance(n)` after each batch, `close()` at the end."""

    def __init__(
        self,
        total: int,
        done: int = 0,
        *,
        stream: TextIO | None = None,
        quiet: bool = False,
        tty: bool | None = None,
        line_every_s: float = 10.0,
        redraw_every_s: float = 0.2,
        label: str = "scan",
        unit: str = "images",
    ):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done, self.start_done = total, done, done
        self.quiet = quiet
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = redraw_every_s if self.tty else line_every_s
        self.label, self.unit = label, unit
        self.note = ""  # shown after the rate and ETA (e.g. a training loss)
        self.started = time.monotonic()
        self._last_draw = self.started
        self._drawn_done = -1  # `done` at the last plain line, so close() does not repeat it
        self._lock = threading.Lock()

    def begin(self, total: int, done: int = 0) -> None:
        """(Re)start the clock once the total is known; `done` images count as already finished."""
        with self._lock:
            self.total, self.done, self.start_done = total, done, done
            self.started = self._last_draw = time.monotonic()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def status(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        u = self.unit
        text = f"{self.done}/{self.total} {u} ({pct:.1f}%), {rate:.1f} {u}/s, ETA {format_duration(eta)}"
        return f"{text}; {self.note}" if self.note else text

    def bar(self, width: int = 30) -> str:
        filled = int(width * self.done / self.total) if self.total else width
        return f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.status()}"

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.quiet or now - self._last_draw < self.interval:
                return
            self._last_draw = now
            self._draw()

    def _draw(self) -> None:
        if self.tty:
            self.stream.write("\r" + self.bar() + "\x1b[K")
        else:
            self.stream.write(f"{self.label}: {self.status()}\n")
            self._drawn_done = self.done
        self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self.quiet:
                return
            if self.tty or self._drawn_done != self.done:
                self._draw()
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()


def counted(
    batches: Iterable[Any], total: int, *, label: str, unit: str = "images", quiet: bool = False,
    stream: TextIO | None = None, tty: bool | None = None, line_every_s: float = 10.0,
) -> Iterator[Any]:  # fmt: skip
    """`batches` unchanged, with a bar that advances by each batch's len() (rows of a tensor) and
    closes when they run out. `quiet` draws nothing."""
    bar = Progress(total, stream=stream, quiet=quiet, tty=tty, line_every_s=line_every_s, label=label, unit=unit)
    for batch in batches:
        yield batch
        bar.advance(len(batch))
    bar.close()
