"""Optional per-stage timing of a scan (`vade bench`): named spans of thread time, off unless attached.

    clock = StageClock()
    with attached(clock):            # this thread's spans go to `clock` (the scan loop attaches its threads)
        with span("decode"): ...     # anywhere below: costs one attribute lookup when no clock is attached

Spans nest: a span's time excludes the spans opened inside it (each stage gets its self time), so
"scoring" around a model call that makes its maps inside a "map" span counts the kNN search only.
Totals are thread-seconds, twice: wall time inside the span (what the stage took, waits and
preemption by other processes included) and the thread's CPU time (what it cost a core, steady on a
loaded machine). Stages that run at once in different threads add up to more than the wall time. No torch here: `sync` (e.g. torch.cuda.synchronize) is called at span ends when given.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

_local = threading.local()
_NOTHING = nullcontext()


class StageClock:
    """Seconds per stage name, added from any thread."""

    def __init__(self, sync: Callable[[], Any] | None = None):
        self.sync = sync
        self._totals: dict[str, float] = {}
        self._cpu: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float, cpu_seconds: float | None = None) -> None:
        """Add wall seconds (and CPU seconds: the same when not given, as for device time)."""
        with self._lock:
            self._totals[stage] = self._totals.get(stage, 0.0) + seconds
            self._cpu[stage] = self._cpu.get(stage, 0.0) + (seconds if cpu_seconds is None else cpu_seconds)

    def totals(self) -> dict[str, float]:
        """Wall seconds per stage."""
        with self._lock:
            return dict(self._totals)

    def cpu_totals(self) -> dict[str, float]:
        """CPU seconds per stage (of the threads that ran it)."""
        with self._lock:
            return dict(self._cpu)


class _Span:
    __slots__ = ("clock", "stage", "start", "cpu", "inner", "inner_cpu")

    def __init__(self, clock: StageClock, stage: str):
        self.clock, self.stage = clock, stage

    def __enter__(self) -> _Span:
        self.inner = self.inner_cpu = 0.0
        _local.stack.append(self)
        self.start, self.cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.clock.sync is not None:
            self.clock.sync()
        elapsed, cpu = time.perf_counter() - self.start, time.thread_time() - self.cpu
        stack = _local.stack
        stack.pop()
        if stack:
            stack[-1].inner += elapsed
            stack[-1].inner_cpu += cpu
        self.clock.add(self.stage, elapsed - self.inner, cpu - self.inner_cpu)


def current() -> StageClock | None:
    """The clock attached to this thread, if any."""
    return getattr(_local, "clock", None)


def span(stage: str) -> Any:
    """A context manager timing `stage` on this thread's clock; a no-op when none is attached."""
    clock = getattr(_local, "clock", None)
    return _NOTHING if clock is None else _Span(clock, stage)


def add(stage: str, seconds: float) -> None:
    """Add seconds measured another way (CUDA events) to this thread's clock, if any."""
    clock = getattr(_local, "clock", None)
    if clock is not None:
        clock.add(stage, seconds)


def attach(clock: StageClock | None) -> None:
    """Attach `clock` to this thread for good (a pool thread's initializer); None detaches."""
    _local.clock = clock
    _local.stack = []


@contextmanager
def detached() -> Iterator[None]:
    """No clock on this thread inside the block (work timed another way, e.g. by CUDA events)."""
    before = (getattr(_local, "clock", None), getattr(_local, "stack", []))
    _local.clock = None
    try:
        yield
    finally:
        _local.clock, _local.stack = before


@contextmanager
def attached(clock: StageClock | None) -> Iterator[None]:
    """This thread's spans go to `clock` inside the block (nothing changes when it is None)."""
    if clock is None:
        yield
        return
    before = (getattr(_local, "clock", None), getattr(_local, "stack", []))
    attach(clock)
    try:
        yield
    finally:
        _local.clock, _local.stack = before
