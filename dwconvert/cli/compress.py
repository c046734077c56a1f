"""``dwconvert compress``: convert a trained checkpoint and save the result."""

from __future__ import annotations

import argparse
import logging
import math
import os

import torch
from torch import nn

from ..checkpoint import save
from ..convert import BUDGET_SCOPES, OBJECTIVES, WeightsError, convert
from ..data import DataSpecError, make_loader
from ..errors import first_line
from ..factorize import FORMS
from ..ranks import COST_MEASURES, BudgetError
from .finetune import (
    add_training_options,
    check_resume_file,
    config_from,
    cost_of,
    datasets_from,
    first_image,
    is_main_process,
    print_outcome,
    run_finetune,
)
from .common import (
    HelpFormatter,
    EXIT_CONVERSION,
    EXIT_INPUT,
    EXIT_USAGE,
    CLIError,
    add_arch_options,
    add_data_options,
    add_report_option,
    check_input_shape,
    check_output_path,
    check_report_path,
    load_original,
    non_negative_int,
    notes_in_summary,
    number_parser,
    parse_input_shape,
    positive_int,
    write_report,
)

logger = logging.getLogger(__name__)

EXAMPLE = """examples:
  dwconvert compress model.pth -o model-dw.safetensors \\
      --arch digit_recognizer.model:CNN --input-shape 1,28,28 --budget 0.25
  dwconvert compress model.pth -o model-dw.safetensors \\
      --arch digit_recognizer.model:CNN --input-shape 1,28,28 --budget 0.125 \\
      --calib mnist5k --calib-samples 512 --report model-dw.md
  dwconvert compress model.pth -o model-dw.safetensors \\
      --arch digit_recognizer.model:CNN --input-shape 1,28,28 --budget 0.125 \\
      --finetune mnist5k --finetune-limit 4000 --val-offset 4000 --epochs 1 --lr 0.01
"""


parse_budget = number_parser(
    float, lambda v: 0 < v <= 1,
    "budget {text} is the fraction of MACs to keep and must lie in (0, 1], e.g. 0.25")
parse_max_macs = number_parser(
    float, lambda v: 0 < v <= 1,
    "max-macs {text} is the fraction of MACs to keep at most and must lie in (0, 1], e.g. 0.33")
parse_speedup = number_parser(float, lambda v: 1 <= v < math.inf,
                              "speedup {text} should be a number >= 1, e.g. 1.5")
parse_tolerance = number_parser(float, lambda v: v > 0,
                                "tolerance {text} should be a relative error > 0")
_positive_rank = number_parser(int, lambda v: v >= 1,
                               "rank {text} should be a positive int or 'full'")


def parse_rank(text: str) -> int | str:
    return text if text == "full" else _positive_rank(text)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compress",
        help="convert the convs of a checkpoint to depthwise + pointwise layers",
        description="Convert the standard Conv2d layers of a trained checkpoint into "
                    "factorized depthwise + pointwise layers and save the converted model.",
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT",
                        help="state_dict or training checkpoint (.pth/.pt/.safetensors)")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                        help="converted checkpoint to write (.safetensors)")
    add_arch_options(parser, required=False)
    parser.add_argument("--input-shape", type=parse_input_shape, required=True,
                        metavar="C,H,W", help="input shape at which MACs are measured")
    parser.add_argument("--form", choices=("auto", *FORMS), default="auto",
                        help="factorized form; auto chooses per conv (default: auto)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--rank", type=parse_rank, default=None,
                        help="one rank for every conv, or 'full' (exact); needs --form")
    amount.add_argument("--budget", type=parse_budget, default=None,
                        help="fraction of the model's cost to keep, in (0, 1] (default 0.5)")
    amount.add_argument("--tolerance", type=parse_tolerance, default=None,
                        help="largest relative error per conv (output error with --calib); "
                             "each conv gets the cheapest form and rank within it")
    amount.add_argument("--speedup", type=parse_speedup, default=None,
                        help="with --objective latency: how many times faster the model "
                             "should run, e.g. 1.5, instead of --budget")
    parser.add_argument("--objective", choices=OBJECTIVES, default="macs",
                        help="what --budget counts: MACs (or --budget-on params), or the "
                             "time measured on this machine at --input-shape, with the "
                             "current torch threads (default: macs)")
    parser.add_argument("--max-macs", type=parse_max_macs, default=None, metavar="FRACTION",
                        help="with --objective latency: keep at most this fraction of the "
                             "MACs too (of the model, or see --budget-scope)")
    parser.add_argument("--rank-multiple", type=int, default=None, metavar="N",
                        help="only ranks whose inner channel count is a multiple of N "
                             "(default: 8 with --objective latency, else 1)")
    parser.add_argument("--layout", default=None, metavar="LAYOUT",
                        help="how the new layers run: auto (time each candidate and keep the "
                             "fastest; the default with --objective latency), plain (the "
                             "default otherwise), channels_last or matmul")
    parser.add_argument("--channels-last", action="store_true",
                        help="with --objective latency or --layout auto: time the layers with "
                             "the whole model and example in channels_last memory format, as "
                             "a channels_last deployment runs them (--layout channels_last "
                             "is a layout of the new layers alone)")
    parser.add_argument("--budget-on", choices=COST_MEASURES, default="macs",
                        help="what --budget counts (default: macs)")
    parser.add_argument("--budget-scope", choices=BUDGET_SCOPES, default="model",
                        help="--budget as a fraction of the whole model, or of the convs "
                             "that can be converted (default: model)")
    parser.add_argument("--calib", metavar="SPEC", default=None,
                        help="calibration images (a data spec, e.g. mnist5k) that make the "
                             "conversion data-aware; labels are not used")
    parser.add_argument("--calib-samples", type=int, default=512, metavar="N",
                        help="calibration images to use (default: 512)")
    parser.add_argument("--calib-split", default="train", choices=("train", "test"),
                        help="split of the calibration data spec (default: train)")
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="re-estimate BatchNorm statistics on the calibration images")
    parser.add_argument("--fold-bn", action="store_true",
                        help="fold each eval-mode BatchNorm2d that follows a conv into it "
                             "first; for inference only (the BatchNorm statistics are gone)")
    add_data_options(parser, evaluation=False)
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="leave convs whose name matches this glob unconverted (repeatable)")
    parser.add_argument("--cp-iters", type=int, default=100, help="ALS iterations for cp")
    add_report_option(parser)
    parser.add_argument("--force", action="store_true",
                        help="replace OUTPUT and the --report file if they exist")
    tuning = parser.add_argument_group(
        "fine-tuning after conversion (by distillation from the original; see finetune)")
    tuning.add_argument("--finetune", metavar="SPEC", default=None,
                        help="training images (a data spec); OUTPUT then holds the fine-tuned "
                             "model of the best epoch")
    tuning.add_argument("--finetune-split", default="train", choices=("train", "test"),
                        help="split of --finetune, where it has splits (default: train)")
    tuning.add_argument("--finetune-limit", type=positive_int, default=None, metavar="N",
                        help="train on N images only")
    tuning.add_argument("--finetune-offset", type=non_negative_int, default=0, metavar="N",
                        help="skip the first N training images")
    add_training_options(parser)
    parser.set_defaults(run=run)


def calibration_loader(args):
    if args.calib is None:
        return None
    if args.calib_samples < 1:
        raise CLIError(f"--calib-samples {args.calib_samples} should be at least 1", EXIT_USAGE)
    try:
        return make_loader(args.calib, split=args.calib_split, limit=args.calib_samples,
                           batch_size=64, mean=args.mean, std=args.std)
    except DataSpecError as err:
        raise CLIError(str(err)) from None


def to_channels_last(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """``model`` (moved in place) and ``example`` in channels_last, or a clear error."""
    model = model.to(memory_format=torch.channels_last)
    example = example.contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            model(example)
    except Exception as err:  # e.g. a ``view`` in the model's forward
        first = first_line(err)
        raise CLIError(f"the model fails in channels_last memory format ({first}); convert "
                       "without --channels-last", EXIT_USAGE) from None
    return model, example


def run(args: argparse.Namespace) -> int:
    main = is_main_process()  # under torchrun, the other processes only train
    if not main:
        logging.getLogger().setLevel(logging.ERROR)
    timed = args.objective == "latency" or args.layout == "auto"
    if args.channels_last and not timed:
        raise CLIError("--channels-last changes only what is timed: give --objective latency "
                       "or --layout auto too", EXIT_USAGE)
    if args.resume and args.finetune is None:
        raise CLIError("--resume continues a fine-tuning run: give --finetune SPEC too",
                       EXIT_USAGE)
    if args.resume and timed:
        raise CLIError("--resume: a timed conversion (--objective latency or --layout auto) "
                       "can choose other layers on each run, so its fine-tuning cannot be "
                       "continued here; convert first (dwconvert compress without --finetune), "
                       "then fine-tune with dwconvert finetune, which can resume", EXIT_USAGE)
    if args.finetune is not None:
        check_resume_file(args.output, args)  # first: its message names --resume
    output = check_output_path(args.output, [args.input], args.force or args.resume)
    if args.finetune is not None:
        config_from(args)  # a bad recipe is refused before the conversion, not after
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and timed:
            raise CLIError("under torchrun each process would time its own layers and could "
                           "choose other ranks: convert first (dwconvert compress without "
                           "torchrun), then run dwconvert finetune under torchrun", EXIT_USAGE)
    report_path = check_report_path(args.report, [args.input, args.output], args.force)
    model = load_original(args.input, args.arch, args.arch_kwargs, args.allow_pickle)
    example = check_input_shape(model, args.input_shape)
    if args.channels_last:
        model, example = to_channels_last(model, example)
    calibration = calibration_loader(args)
    try:
        with notes_in_summary(printed=main):
            converted = convert(model, form=args.form, rank=args.rank, budget=args.budget,
                                tolerance=args.tolerance, budget_on=args.budget_on,
                                budget_scope=args.budget_scope, example_inputs=example,
                                calibration=calibration, calib_samples=args.calib_samples,
                                recalibrate_bn=args.recalibrate_bn, fold_bn=args.fold_bn,
                                exclude=args.exclude,
                                cp_iters=args.cp_iters, objective=args.objective,
                                speedup=args.speedup, layout=args.layout,
                                rank_multiple=args.rank_multiple, max_macs=args.max_macs)
    except BudgetError as err:
        raise CLIError(str(err), EXIT_CONVERSION) from None
    except WeightsError as err:
        raise CLIError(f"{args.input!r}: {err}", EXIT_INPUT) from None
    except ValueError as err:
        raise CLIError(str(err), EXIT_USAGE) from None
    report = converted.dwconvert_report
    if main:
        print(report.table())
        print()
        print(report.summary())
    if not report.converted:
        raise CLIError("no conv was converted, so nothing was written; see the notes above",
                       EXIT_CONVERSION)

    arch = args.arch
    if arch is None:  # a whole pickled model: rebuild it from its class
        cls = type(model)
        arch = f"{cls.__module__}:{cls.__qualname__}"
    extra = {"source": str(args.input), "input_shape": list(args.input_shape),
             "memory_format": "channels_last" if args.channels_last else "contiguous",
             "report": report.to_dict()}
    if args.finetune is not None:
        _finetune(args, model, converted, output, arch, extra)
        if main:
            write_report(report, report_path, args.force)
        return 0
    save(converted, output, arch=arch, arch_kwargs=args.arch_kwargs, overwrite=args.force,
         extra=extra)
    print(f"wrote {output}")
    write_report(report, report_path, args.force)
    return 0


def _finetune(args, original, converted, output, arch, extra) -> None:
    """Fine-tunes the converted model with the original as teacher; writes the best epoch."""
    train, held_out = datasets_from(args, args.finetune, args.finetune_split,
                                    args.finetune_limit, args.finetune_offset)
    example = first_image(held_out)
    converted_cost = cost_of(converted, example)
    result = run_finetune(converted, original, args, train, held_out, output, arch,
                          args.arch_kwargs, extra)
    if is_main_process():
        print()
        print_outcome(result, original, converted_cost, example, len(held_out))
        print(f"wrote {output}")
