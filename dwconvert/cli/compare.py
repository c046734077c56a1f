"""``dwconvert compare``: accuracy of the original and the converted model on the same data."""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from ..checkpoint import CheckpointError, is_converted_checkpoint, load, read_recipe
from ..costs import measure
from ..data import DATA_SPECS_HELP, DataSpecError, make_loader
from ..errors import first_line
from ..evaluate import compare_models
from ..report import format_count
from .common import CLIError, HelpFormatter, add_arch_options, add_data_options, load_original

EXAMPLE = """example:
  dwconvert compare model.pth model-dw.safetensors --data mnist5k
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="evaluate the original and the converted model on the same data",
        description="Evaluate both models on the same images and print the top-1 accuracy "
                    "of each, how often their top-1 predictions agree, parameters and MACs. "
                    + DATA_SPECS_HELP,
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("original", metavar="ORIGINAL",
                        help="the original checkpoint (state_dict, or a dwconvert checkpoint)")
    parser.add_argument("converted", metavar="CONVERTED", help="a dwconvert checkpoint")
    parser.add_argument("--data", required=True, metavar="SPEC",
                        help="mnist5k, fashion-mnist:DIR, imagefolder:DIR or py:MODULE:FUNCTION")
    add_arch_options(parser, required=False)
    add_data_options(parser)
    parser.set_defaults(run=run)


def _load_pair(args):
    try:
        meta = read_recipe(args.converted)
        converted = load(args.converted, arch=args.arch, arch_kwargs=args.arch_kwargs)
    except CheckpointError as err:
        raise CLIError(str(err)) from None
    if is_converted_checkpoint(args.original):
        try:
            original = load(args.original)
        except CheckpointError as err:
            raise CLIError(str(err)) from None
    else:
        arch = args.arch or meta["arch"]
        kwargs = args.arch_kwargs if args.arch_kwargs is not None else meta["arch_kwargs"]
        original = load_original(args.original, arch, kwargs, args.allow_pickle)
    return original, converted


def _check_accepts(label: str, model, images, data: str) -> None:
    """Data whose images the model cannot take is unusable input, not a bug."""
    try:
        with torch.no_grad():
            model(images)
    except Exception as err:
        first = first_line(err)
        shape = "x".join(map(str, images.shape[1:]))
        raise CLIError(f"the {label} model rejects the {shape} images of {data!r} ({first}); "
                       "give data of the shape the model was trained on") from None


def run(args: argparse.Namespace) -> int:
    original, converted = _load_pair(args)
    try:
        loader = make_loader(args.data, batch_size=args.batch_size, limit=args.limit,
                             offset=args.offset, split=args.split, mean=args.mean,
                             std=args.std)
        images = next(iter(loader))[0]
    except DataSpecError as err:
        raise CLIError(str(err)) from None

    for label, model in (("original", original), ("converted", converted)):
        _check_accepts(label, model, images[:1], args.data)
    comparison = compare_models(original, converted, loader)
    example = (images[:1],)
    rows, macs = [], []
    for label, model, result in (("original", original, comparison.original),
                                 ("converted", converted, comparison.converted)):
        cost = measure(model, example)
        macs.append(cost.macs)
        rows.append([label, f"{100 * result.top1:.2f}%", format_count(cost.params),
                     format_count(cost.macs)])
    print(tabulate(rows, headers=["model", "top-1", "params", "MACs"], disable_numparse=True))
    before, after = macs
    print()
    print(f"{comparison.original.count} images of {args.data}; top-1 agreement "
          f"{100 * comparison.agreement:.2f}%; MACs {after / before:.3f} of the original")
    return 0
