"""``dwconvert bench``: time the original and the converted model on this machine."""

from __future__ import annotations

import argparse
import json
import math
import logging

import torch
from tabulate import tabulate

from ..checkpoint import CheckpointError, is_converted_checkpoint
from ..convert import OBJECTIVES, convert
from ..costs import measure
from ..files import write_text
from ..latency import RUNTIMES, RuntimeUnavailable, format_seconds, time_models
from ..ranks import BudgetError
from .common import (
    EXIT_CONVERSION,
    EXIT_USAGE,
    CLIError,
    add_arch_options,
    check_input_shape,
    check_output_path,
    load_original,
    non_negative_int,
    notes_in_summary,
    number_parser,
    parse_input_shape,
    positive_int,
    thread_count,
)
from .compare import _load_pair
from .compress import parse_budget

logger = logging.getLogger(__name__)

EXAMPLE = """examples:
  dwconvert bench model.pth model-dw.safetensors --input-shape 1,28,28
  dwconvert bench model.pth --arch digit_recognizer.model:CNN --input-shape 1,28,28 \\
      --budget 0.33 --batch 1,8 --runtimes eager,onnxruntime --threads 2
"""


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1 or max(values) >= 2**31:
        raise argparse.ArgumentTypeError(f"{text!r} should be positive ints below 2**31, "
                                         "e.g. 1,8")
    return values


def _runtimes(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in RUNTIMES]
    if not values or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown runtime(s) {', '.join(unknown) or text!r}: choose from {', '.join(RUNTIMES)}")
    return values


duration = number_parser(float, lambda v: 0 <= v < math.inf,
                         "{text} should be a number of seconds >= 0")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time the original and the converted model (PyTorch eager, channels_last, "
             "ONNX Runtime)",
        description="Time the original model and its converted version interleaved in one "
                    "process (warm-up, then medians) in each runtime and batch size, and print "
                    "the speedup and the speedup per MAC reduction. Without CONVERTED the "
                    "original is converted first with --budget and --objective.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("original", metavar="ORIGINAL",
                        help="the original checkpoint (state_dict, or a dwconvert checkpoint)")
    parser.add_argument("converted", metavar="CONVERTED", nargs="?", default=None,
                        help="a dwconvert checkpoint (default: convert ORIGINAL here)")
    add_arch_options(parser, required=False)
    parser.add_argument("--input-shape", type=parse_input_shape, required=True,
                        metavar="C,H,W", help="the shape of one input image")
    parser.add_argument("--batch", type=_ints, default=[1], metavar="B[,B...]",
                        help="batch sizes to time (default: 1)")
    parser.add_argument("--runtimes", type=_runtimes, default=list(RUNTIMES),
                        metavar="R[,R...]", help=f"of {', '.join(RUNTIMES)} (default: all)")
    # SUPPRESS: without the option here, the global ``dwconvert --threads N`` stands.
    parser.add_argument("--threads", type=thread_count, default=argparse.SUPPRESS,
                        help="torch and ONNX Runtime intra-op threads (default: the global "
                             "--threads, else torch's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="device of the PyTorch runtimes (default: cpu)")
    parser.add_argument("--warmup", type=non_negative_int, default=3,
                        help="untimed calls first (default 3)")
    parser.add_argument("--repeats", type=positive_int, default=20,
                        help="timed calls per model at least; the median is reported "
                             "(default 20)")
    parser.add_argument("--min-seconds", type=duration, default=1.0, metavar="S",
                        help="keep timing (up to 10x --repeats calls) until S seconds have "
                             "passed, which steadies small models (default 1)")
    parser.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                        help="fold BatchNorm layers into the conv before them in the PyTorch "
                             "runtimes, in both models (default: on; --no-fold-bn keeps them)")
    parser.add_argument("--budget", type=parse_budget, default=1 / 3,
                        help="without CONVERTED: fraction of the cost to keep (default 1/3)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="macs",
                        help="without CONVERTED: what the budget counts (default: macs)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the results as JSON")
    parser.add_argument("--force", action="store_true", help="replace the JSON file if it exists")
    parser.set_defaults(run=run)


def _models(args, example: torch.Tensor):
    if args.converted is not None:
        return _load_pair(args)
    if is_converted_checkpoint(args.original):
        raise CLIError(f"{args.original!r} is a converted checkpoint: give the original first, "
                       "or both ORIGINAL and CONVERTED")
    original = load_original(args.original, args.arch, args.arch_kwargs, args.allow_pickle)
    check_input_shape(original, tuple(example.shape))
    try:
        with notes_in_summary():
            converted = convert(original, budget=args.budget, objective=args.objective,
                                example_inputs=example)
    except BudgetError as err:
        raise CLIError(str(err), EXIT_CONVERSION) from None
    print(converted.dwconvert_report.summary())
    print()
    return original, converted


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here", EXIT_USAGE)
    inputs = [p for p in (args.original, args.converted) if p is not None]
    output = check_output_path(args.json, inputs, args.force) if args.json else None
    example = torch.randn(1, *args.input_shape[1:])
    try:
        original, converted = _models(args, example)
    except CheckpointError as err:
        raise CLIError(str(err)) from None
    check_input_shape(converted, tuple(example.shape))
    reduction = measure(original, (example,)).macs / measure(converted, (example,)).macs
    device = torch.device(args.device)
    original, converted = original.to(device), converted.to(device)
    rows, results, warned = [], [], set()
    for runtime in args.runtimes:
        for batch in args.batch:
            x = torch.randn(batch, *args.input_shape[1:], device=device)
            try:
                seconds = time_models({"original": original, "converted": converted}, x,
                                      runtime, warmup=args.warmup, repeats=args.repeats,
                                      min_seconds=args.min_seconds, fold_bn=args.fold_bn)
            except RuntimeUnavailable as err:  # often the same at every batch: say it once
                if str(err) not in warned:
                    logger.warning("skipping %s: %s", runtime, err)
                    warned.add(str(err))
                continue
            speedup = seconds["original"] / seconds["converted"]
            rows.append([runtime, batch, format_seconds(seconds["original"]),
                         format_seconds(seconds["converted"]), f"{speedup:.2f}x",
                         f"{reduction:.2f}x", f"{speedup / reduction:.2f}"])
            results.append({"runtime": runtime, "batch": batch, "device": args.device,
                            "original_s": seconds["original"],
                            "converted_s": seconds["converted"], "speedup": speedup,
                            "mac_reduction": reduction, "efficiency": speedup / reduction})
    print(tabulate(rows, headers=["runtime", "batch", "original", "converted", "speedup",
                                  "MAC reduction", "efficiency"], disable_numparse=True))
    print(f"\n{torch.get_num_threads()} thread(s), {args.device}; medians of at least "
          f"{args.repeats} interleaved calls (and {args.min_seconds:g} s) after {args.warmup} "
          "warm-up calls each")
    if output is not None:
        write_text(output, json.dumps({"threads": torch.get_num_threads(),
                                       "results": results}, indent=2) + "\n",
                   replace=args.force)
        print(f"wrote {output}")
    return 0
