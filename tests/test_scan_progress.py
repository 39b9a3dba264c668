"""Progress output: a redrawn bar on a terminal, plain periodic lines elsewhere, nothing when quiet."""

from __future__ import annotations

import io

from engine.scan.progress import Progress, format_duration


def test_terminal_bar_redraws_in_place_with_rate_and_eta() -> None:
    out = io.StringIO()
    progress = Progress(100, stream=out, tty=True, redraw_every_s=0.0)
    progress.advance(40)
    progress.close()
    text = out.getvalue()
    assert text.startswith("\rscan [############") and "40/100 images (40.0%)" in text
    assert "images/s" in text and "ETA " in text and text.endswith("\n")
    assert text.count("\n") == 1  # one line, redrawn


def test_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(10, done=4, stream=out, tty=False, line_every_s=0.0)
    progress.advance(3)
    progress.advance(3)
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("scan: 7/10 images (70.0%)") and lines[-1].startswith("scan: 10/10 images (100.0%)")
    assert "\r" not in out.getvalue() and "ETA 0s" in lines[-1]


def test_lines_are_periodic_not_per_batch() -> None:
    out = io.StringIO()
    progress = Progress(1000, stream=out, tty=False, line_every_s=3600.0)
    for _ in range(100):
        progress.advance(10)
    assert out.getvalue() == ""


def test_quiet_prints_nothing() -> None:
    out = io.StringIO()
    progress = Progress(10, stream=out, quiet=True, tty=True, redraw_every_s=0.0)
    progress.advance(10)
    progress.close()
    assert out.getvalue() == ""


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.4, 75, 3725, float("nan"))] == ["0s", "1m15s", "1h02m05s", "--"]


def test_counted_passes_batches_through_and_counts_their_rows() -> None:
    import torch

    from engine.scan.progress import counted

    out = io.StringIO()
    batches = [torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(2, 3)]
    seen = list(counted(iter(batches), 10, label="fit features", unit="tiles", stream=out, tty=False, line_every_s=0.0))
    assert seen == batches
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fit features: 4/10 tiles (40.0%)") and "tiles/s, ETA" in lines[0]
    assert lines[-1].startswith("fit features: 10/10 tiles (100.0%)")
    quiet = io.StringIO()
    assert len(list(counted(iter(batches), 10, label="x", quiet=True, stream=quiet))) == 3 and not quiet.getvalue()


def test_close_does_not_repeat_the_last_plain_line() -> None:
    out = io.StringIO()
    bar = Progress(10, stream=out, tty=False, line_every_s=0.0, label="coreset", unit="picks")
    bar.advance(10)  # drawn: interval 0
    bar.close()
    assert out.getvalue().count("10/10 picks (100.0%)") == 1
