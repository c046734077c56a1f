"""Entry point of ``dwconvert``: parse, dispatch, and turn errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import sys

from .. import __version__
from ..files import OutputExists
from ..progress import logging_above_bars, set_progress
from . import bench, compare, compress, export, finetune, inspect, sweep
from .common import EXIT_CODES_HELP, EXIT_FAILURE, EXIT_USAGE, CLIError, thread_count

SUBCOMMANDS = (compress, compare, finetune, inspect, sweep, bench, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwconvert",
        description="Convert the standard convs of a trained PyTorch CNN into depthwise + "
                    "pointwise layers, and compare accuracy before and after.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"dwconvert {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log each layer")
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           help="log errors only, and draw no progress bars")
    parser.add_argument("--progress", action="store_true",
                        help="draw progress bars even when stderr is not a terminal")
    parser.add_argument("--threads", type=thread_count, default=None, metavar="N",
                        help="torch threads (default: torch's choice); on a machine busy with "
                             "other work, 1 can be many times faster")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else \
        logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    set_progress(False if args.quiet else True if args.progress else None)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        with logging_above_bars():
            return args.run(args)
    except CLIError as err:
        if args.debug:
            raise
        print(f"dwconvert {args.command}: error: {err}", file=sys.stderr)
        return err.code
    except FileExistsError as err:  # an output that appeared while the command ran
        if args.debug:
            raise
        message = err.for_cli() if isinstance(err, OutputExists) else str(err)
        print(f"dwconvert {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"dwconvert {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: one line, and the way to see more
        if args.debug:
            raise
        print(f"dwconvert {args.command}: unexpected error: {type(err).__name__}: {err} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
