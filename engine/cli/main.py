"""`vade`: the parser over every verb, and the exit codes.

    vade fit DATA --out MODEL_DIR [--category C] [--method patchcore|padim|stfpm|feature_ae] [--backbone NAME] [--config FILE]
    vade scan MODEL_DIR SOURCE --out OUT_DIR [--resume] [--workers N | --scheduler ADDRESS] [--device cpu|cuda]
    vade calibrate MODEL_DIR IMAGES [--target-far A] [--out NEW_DIR | --force]
    vade update MODEL_DIR IMAGES [--out NEW_DIR | --force]
    vade eval MODEL_DIR DATA [--category C] [--json FILE]
    vade report OUT_DIR
    vade demo
    vade bench [MODEL_DIR] [SOURCE] [--device ...] [--workers N | --gpus ... | --scheduler ...] [--images N] [--json FILE] [--sweep]

Every verb takes --debug (a traceback after the one line). Exit codes (engine/faults.py):

    0    done (a scan: every input has its row, error rows included)
    1    vade scan --strict: some rows are errors
    2    a usage, input or model problem (one line on stderr)
    3    OUT_DIR is being written by another scan (the line names its host, pid and start time)
    4    disk full or quota exceeded                          \\
    5    output folder removed or not writable                 |  failures of the machine: one line
    6    model directory changed during the scan               |  saying what failed; a scan's finished
    7    out of memory                                         |  shards are kept and --resume
    8    storage failure (reads stuck, I/O errors, no fds)    /   continues from the last one
    70   internal error (a bug; --debug shows the traceback)
    130  stopped by SIGINT (Ctrl-C); 143 by SIGTERM: a scan stops at a clean point, --resume continues it
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from engine import __version__
from engine.cli import bench, calibrate, demo, evaluate, fit, report, scan, update
from engine.cli.common import say
from engine.errors import VadeError
from engine.faults import (
    EXIT_INTERNAL,
    EXIT_SIGINT,
    Interrupted,
    as_machine_fault,
    exit_code_of,
    quiet_shutdown,
    stop_on_signals,
    with_hint,
)

EXIT_USAGE, EXIT_INTERRUPTED = 2, EXIT_SIGINT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vade", description="Visual anomaly detection engine")
    parser.add_argument("--version", action="version", version=f"vade {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback after an error's one line")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in (fit, calibrate, update, scan, evaluate, report, demo, bench):
        verb.register(sub)
    for verb_parser in sub.choices.values():
        verb_parser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="print the traceback after an error's one line"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    t0 = time.perf_counter()
    out_dir = getattr(args, "out", None) if args.command == "scan" else None
    try:
        with stop_on_signals():
            code = int(args.func(args) or 0)
    except Interrupted as exc:
        with_hint(exc, out_dir)
        say(f"vade {args.command}: {exc}")
        if not debug:
            quiet_shutdown()
        return exc.exit_code
    except KeyboardInterrupt:
        say(f"vade {args.command}: interrupted")
        return EXIT_INTERRUPTED
    except VadeError as exc:
        return _fail(args.command, exc, "error", exit_code_of(exc), debug)
    except Exception as exc:  # noqa: BLE001 - one line, whatever failed
        fault = as_machine_fault(exc, out_dir=out_dir, model_dir=getattr(args, "model_dir", None))
        if fault is not None:
            with_hint(fault, out_dir)
            return _fail(args.command, exc, "error", fault.exit_code, debug, str(fault))
        return _fail(args.command, exc, "internal error", EXIT_INTERNAL, debug,
                     f"{type(exc).__name__}: {exc} (a bug: rerun with --debug for the traceback, and report it)")
    if args.command != "scan":
        say(f"vade {args.command}: done in {time.perf_counter() - t0:.1f} s")
    return code


def _fail(verb: str, exc: BaseException, label: str, code: int, debug: bool, text: str | None = None) -> int:
    say(f"vade {verb}: {label}: {text if text is not None else exc}")
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    else:
        quiet_shutdown()  # writes the failure abandoned (zarr's event loop) must not print at exit
    return code


if __name__ == "__main__":
    sys.exit(main())
