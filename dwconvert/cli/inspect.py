"""``dwconvert inspect``: each conv's share of the cost and each form's error, no conversion."""

from __future__ import annotations

import argparse

from ..inspection import DEFAULT_FRACTIONS, inspect
from .common import (
    HelpFormatter,
    EXIT_USAGE,
    CLIError,
    add_arch_options,
    add_report_option,
    check_input_shape,
    check_report_path,
    load_original,
    parse_floats,
    parse_input_shape,
    write_report,
)

EXAMPLE = """example:
  dwconvert inspect model.pth --arch digit_recognizer.model:CNN --input-shape 1,28,28 \\
      --report inspect.md
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="list each conv's share of the cost and each form's error, converting nothing",
        description="List every conv of a checkpoint with its share of the model's MACs and "
                    "parameters, whether the conversion can convert it (and why not), and "
                    "the relative weight error each form would have at the ranks that keep "
                    "a few fractions of the conv's MACs. Nothing is converted or written, "
                    "except the --report file.",
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT",
                        help="state_dict or training checkpoint (.pth/.pt/.safetensors)")
    add_arch_options(parser, required=False)
    parser.add_argument("--input-shape", type=parse_input_shape, required=True,
                        metavar="C,H,W", help="input shape at which MACs are measured")
    parser.add_argument("--fractions", type=parse_floats, default=DEFAULT_FRACTIONS,
                        metavar="F,F,...",
                        help="fractions of each conv's MACs at which to predict the error "
                             "(default: " + ",".join(map(str, DEFAULT_FRACTIONS)) + ")")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="treat convs whose name matches this glob as kept (repeatable)")
    parser.add_argument("--cp-iters", type=int, default=10,
                        help="ALS iterations per predicted cp rank (default: 10)")
    add_report_option(parser)
    parser.add_argument("--force", action="store_true",
                        help="replace the --report file if it exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if any(not 0 < f < 1 for f in args.fractions):
        raise CLIError(f"--fractions {','.join(map(str, args.fractions))} should each lie "
                       "in (0, 1), e.g. 0.5,0.25", EXIT_USAGE)
    if args.cp_iters < 1:
        raise CLIError(f"--cp-iters {args.cp_iters} should be at least 1", EXIT_USAGE)
    report_path = check_report_path(args.report, [args.input], args.force)
    model = load_original(args.input, args.arch, args.arch_kwargs, args.allow_pickle)
    example = check_input_shape(model, args.input_shape)
    try:
        report = inspect(model, example, fractions=args.fractions, exclude=args.exclude,
                         cp_iters=args.cp_iters)
    except ValueError as err:
        raise CLIError(str(err)) from None
    print(report.table())
    print()
    print(report.summary())
    write_report(report, report_path, args.force)
    return 0
