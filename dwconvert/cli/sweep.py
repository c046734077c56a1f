"""``dwconvert sweep``: convert at several budgets; CSV, plot and checkpoints in a folder."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from ..checkpoint import save
from ..data import DATA_SPECS_HELP, DataSpecError, make_loader
from ..factorize import FORMS
from ..files import write_text
from ..sweep import CSV_FIELDS, sweep
from .common import (
    HelpFormatter,
    EXIT_USAGE,
    CLIError,
    add_arch_options,
    add_data_options,
    add_report_option,
    check_input_shape,
    check_output_path,
    check_report_path,
    load_original,
    parse_input_shape,
    write_report,
)
from .compress import calibration_loader, parse_budget

EXAMPLE = """example:
  dwconvert sweep model.pth --arch digit_recognizer.model:CNN --input-shape 1,28,28 \\
      --budgets 1,0.5,0.25,0.125 --data mnist5k -o sweep
"""


def parse_budgets(text: str) -> tuple[float, ...]:
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("--budgets should list budgets, e.g. 1,0.5,0.25")
    budgets = tuple(parse_budget(part.strip()) for part in parts)
    names = [f"{b:g}" for b in budgets]  # the checkpoints are named budget-B.safetensors
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(
            f"--budgets {text!r} lists budget {', '.join(repeated)} more than once (as "
            "printed to 6 digits, which names the checkpoints)")
    return budgets


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="convert at several budgets; accuracy and latency against MACs (CSV, PNG)",
        description="Convert a checkpoint at each budget, then measure every conversion and "
                    "the original in the same run: MACs, parameters, top-1 on --data (when "
                    "given) and the median latency of batch-1 forward passes. Writes "
                    "DIR/sweep.csv, DIR/sweep.png (needs matplotlib: the 'plot' extra) and "
                    "DIR/budget-B.safetensors for each budget. " + DATA_SPECS_HELP,
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT",
                        help="state_dict or training checkpoint (.pth/.pt/.safetensors)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="folder for the CSV, the plot and the converted checkpoints "
                             "(created if missing)")
    add_arch_options(parser, required=False)
    parser.add_argument("--input-shape", type=parse_input_shape, required=True,
                        metavar="C,H,W", help="input shape at which MACs and latency are measured")
    parser.add_argument("--budgets", type=parse_budgets, default=(1.0, 0.5, 0.25, 0.125),
                        metavar="B,B,...",
                        help="fractions of the model's MACs to keep (default: 1,0.5,0.25,0.125)")
    parser.add_argument("--form", choices=("auto", *FORMS), default="auto",
                        help="factorized form; auto chooses per conv (default: auto)")
    parser.add_argument("--data", metavar="SPEC", default=None,
                        help="labelled images for top-1 accuracy, e.g. mnist5k (default: none)")
    add_data_options(parser)
    parser.add_argument("--calib", metavar="SPEC", default=None,
                        help="calibration images (a data spec) for data-aware conversion")
    parser.add_argument("--calib-samples", type=int, default=512, metavar="N",
                        help="calibration images to use (default: 512)")
    parser.add_argument("--calib-split", default="train", choices=("train", "test"),
                        help="split of the calibration data spec (default: train)")
    parser.add_argument("--repeats", type=int, default=50, metavar="N",
                        help="timed batch-1 forward passes per model (default: 50)")
    parser.add_argument("--no-plot", action="store_true",
                        help="write no PNG (and need no matplotlib)")
    add_report_option(parser)
    parser.add_argument("--force", action="store_true",
                        help="replace files in DIR and the --report file if they exist")
    parser.set_defaults(run=run)


def _outputs(args) -> dict[str, Path]:
    """Every file the sweep writes, checked before any work is done."""
    folder = Path(args.output)
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"output {args.output!r} is a file; give a folder", EXIT_USAGE)
    if not folder.exists():  # created once the results are in
        check_output_path(str(folder), [args.input], args.force)
    names = {"csv": "sweep.csv"}
    if not args.no_plot:
        names["png"] = "sweep.png"
    names.update({budget: f"budget-{budget:g}.safetensors" for budget in args.budgets})
    paths = {key: folder / name for key, name in names.items()}
    if folder.exists():
        for path in paths.values():
            check_output_path(str(path), [args.input], args.force)
    return paths


def _csv(rows) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return stream.getvalue()


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise CLIError(f"--repeats {args.repeats} should be at least 1", EXIT_USAGE)
    if not args.no_plot:
        from ..plot import require_matplotlib

        try:
            require_matplotlib()
        except ImportError as err:
            raise CLIError(f"{err}; or pass --no-plot", EXIT_USAGE) from None
    outputs = _outputs(args)
    report_path = check_report_path(args.report, [args.input], args.force)
    model = load_original(args.input, args.arch, args.arch_kwargs, args.allow_pickle)
    example = check_input_shape(model, args.input_shape)[:1]  # latency at batch 1
    loader = None
    if args.data is not None:
        try:
            loader = make_loader(args.data, batch_size=args.batch_size, limit=args.limit,
                                 offset=args.offset, split=args.split, mean=args.mean,
                                 std=args.std)
        except DataSpecError as err:
            raise CLIError(str(err)) from None
    calibration = calibration_loader(args)
    try:
        result, models = sweep(model, example, args.budgets, data=loader, data_name=args.data,
                               repeats=args.repeats, keep_models=True, form=args.form,
                               calibration=calibration, calib_samples=args.calib_samples)
    except ValueError as err:
        raise CLIError(str(err), EXIT_USAGE) from None
    print(result.table())
    print()
    print(result.summary())

    Path(args.output).mkdir(exist_ok=True)
    write_text(outputs["csv"], _csv(result.rows()), replace=args.force)
    print(f"wrote {outputs['csv']}")
    if "png" in outputs:
        from ..plot import plot_sweep

        plot_sweep(result, outputs["png"], title=Path(args.input).name, overwrite=args.force)
        print(f"wrote {outputs['png']}")
    models = {b: m for b, m in models.items() if m.dwconvert_report.converted}
    for budget, converted in models.items():
        save(converted, outputs[budget], arch=args.arch, arch_kwargs=args.arch_kwargs,
             overwrite=args.force,
             extra={"source": str(args.input), "input_shape": list(args.input_shape),
                    "report": converted.dwconvert_report.to_dict()})
    if models:
        print(f"wrote {len(models)} converted checkpoints to {args.output}")
    write_report(result, report_path, args.force)
    return 0
