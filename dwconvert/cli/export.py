"""``dwconvert export``: a converted checkpoint to ONNX and/or TorchScript, checked first."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import CheckpointError, load, read_recipe
from ..export import ONNX_EXPORTERS, ExportError, export_onnx, export_torchscript, require_onnx
from .common import (
    HelpFormatter,
    EXIT_USAGE,
    CLIError,
    check_input_shape,
    check_output_path,
    parse_input_shape,
)

EXAMPLE = """example:
  dwconvert export model-dw.safetensors --onnx model-dw.onnx
  dwconvert export model-dw.safetensors --onnx model-dw.onnx --torchscript model-dw.pt
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a converted checkpoint to ONNX or TorchScript, checked against PyTorch",
        description="Load a converted checkpoint with dwconvert.load and export it with a "
                    "dynamic batch dimension. Each file is run (onnxruntime for ONNX) at "
                    "batch sizes 1 and 3 and compared with PyTorch before it is written.",
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("converted", metavar="CONVERTED", help="a dwconvert checkpoint")
    parser.add_argument("--onnx", metavar="OUT.onnx", default=None, help="ONNX file to write")
    parser.add_argument("--torchscript", metavar="OUT.pt", default=None,
                        help="TorchScript file to write (traced)")
    parser.add_argument("--input-shape", type=parse_input_shape, default=None,
                        metavar="C,H,W",
                        help="input shape (default: the one the checkpoint was converted at)")
    parser.add_argument("--exporter", choices=ONNX_EXPORTERS, default="dynamo",
                        help="ONNX exporter: dynamo (torch.export) or torchscript (tracing); "
                             "default: dynamo")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset version (default: the exporter's)")
    parser.add_argument("--arch", default=None, metavar="MODULE:CALLABLE",
                        help="build the model with this instead of the checkpoint's recipe")
    parser.add_argument("--force", action="store_true", help="replace outputs that exist")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.onnx is None and args.torchscript is None:
        raise CLIError("nothing to export: give --onnx OUT.onnx and/or --torchscript OUT.pt",
                       EXIT_USAGE)
    outputs = [p for p in (args.onnx, args.torchscript) if p is not None]
    if len(outputs) == 2 and Path(args.onnx).resolve() == Path(args.torchscript).resolve():
        raise CLIError("--onnx and --torchscript name the same file", EXIT_USAGE)
    paths = [check_output_path(p, [args.converted], args.force) for p in outputs]
    if args.onnx is not None:
        try:
            require_onnx()
        except ImportError as err:
            raise CLIError(str(err), EXIT_USAGE) from None
    try:
        meta = read_recipe(args.converted)
        model = load(args.converted, arch=args.arch)
    except CheckpointError as err:
        raise CLIError(str(err)) from None
    shape = args.input_shape or meta.get("extra", {}).get("input_shape")
    if shape is None:
        raise CLIError(f"{args.converted!r} does not say its input shape; give --input-shape "
                       "C,H,W", EXIT_USAGE)
    example = check_input_shape(model, tuple(shape))[:1]
    try:
        if args.onnx is not None:
            check = export_onnx(model, example, paths[0], exporter=args.exporter,
                                opset=args.opset, overwrite=args.force)
            print(f"wrote {check.path} (onnxruntime matches PyTorch at batch sizes "
                  f"{', '.join(map(str, check.batch_sizes))}: relative max error "
                  f"{check.max_error:.1e})")
        if args.torchscript is not None:
            check = export_torchscript(model, example, paths[-1], overwrite=args.force)
            print(f"wrote {check.path} (TorchScript matches PyTorch at batch sizes "
                  f"{', '.join(map(str, check.batch_sizes))}: relative max error "
                  f"{check.max_error:.1e})")
    except ExportError as err:
        raise CLIError(str(err), 4) from None
    return 0
