"""`vade`: the parser over every verb, and the exit codes.

    vade fit DATA --out MODEL_DIR [--category C] [--method patchcore|padim] [--backbone NAME] [--config FILE]
    vade scan MODEL_DIR SOURCE --out OUT_DIR [--resume] [--workers N | --scheduler ADDRESS] [--device cpu|cuda]
    vade eval MODEL_DIR DATA [--category C] [--json FILE]
    vade report OUT_DIR
    vade demo

Exit codes: 0 done; 1 `vade scan --strict` with error rows; 2 a usage, input or model problem (one
line on stderr); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time

from engine import __version__
from engine.cli import demo, evaluate, fit, report, scan
from engine.cli.common import say
from engine.errors import VadeError

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vade", description="Visual anomaly detection engine")
    parser.add_argument("--version", action="version", version=f"vade {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in (fit, scan, evaluate, report, demo):
        verb.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        code = int(args.func(args) or 0)
    except VadeError as exc:
        say(f"vade {args.command}: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        say(f"vade {args.command}: interrupted")
        return EXIT_INTERRUPTED
    if args.command != "scan":
        say(f"vade {args.command}: done in {time.perf_counter() - t0:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
