"""What the subcommands share: options, input parsing, errors and exit codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, build_model, load_weights, read_state_dict
from ..errors import first_line
from ..files import write_text
from ..report import IN_NOTES, REPORT_SUFFIXES, render

EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected error: a bug, reported with --debug
EXIT_USAGE = 2  # bad options
EXIT_INPUT = 3  # a checkpoint, arch, data or input shape that cannot be used
EXIT_CONVERSION = 4  # the conversion cannot do what was asked (e.g. an unreachable budget)

EXIT_CODES_HELP = (
    "exit codes: 0 success, 1 unexpected error (rerun with --debug), 2 bad options, "
    "3 unusable input (checkpoint, arch, data, input shape, NaN or Inf weights), "
    "4 conversion impossible "
    "as asked (e.g. budget below the reachable minimum, an export that does not match "
    "PyTorch), 130 interrupted (Ctrl-C or SIGTERM)"
)


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions to the terminal; keeps example epilogs line for line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class CLIError(Exception):
    """An error for the user: one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.code = code


def number_parser(convert: Callable[[str], float], accept: Callable[[float], bool],
                  message: str) -> Callable[[str], float]:
    """An argparse ``type``: ``convert(text)``, refused with ``message`` unless ``accept``.

    ``message`` names the value as ``{text}`` (quoted), e.g.
    ``"budget {text} must lie in (0, 1]"``.
    """
    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(message.format(text=repr(text)))
        return value
    return parse


positive_int = number_parser(int, lambda v: v >= 1, "{text} should be a whole number of at "
                             "least 1")
non_negative_int = number_parser(int, lambda v: v >= 0, "{text} should be a whole number of "
                                 "at least 0")
thread_count = number_parser(int, lambda v: 1 <= v <= 4096,
                             "{text} should be a whole number from 1 to 4096")
# Bounded where torch's own limits would otherwise fail deep inside with a traceback.
parse_batch_size = number_parser(int, lambda v: 1 <= v < 2**31,
                                 "{text} should be a whole number of images from 1 to 2**31-1")
# Seeds are offset by the epoch and the process rank, so well inside torch's 64 bits.
parse_seed = number_parser(int, lambda v: 0 <= v < 2**32,
                           "{text} should be a whole number from 0 to 2**32-1")


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,28,28"`` or ``"1x3x224x224"`` -> a batch shape with batch size 1 if omitted."""
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        dims = ()
    if len(dims) not in (3, 4) or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(
            f"input shape {text!r} should be C,H,W or N,C,H,W of positive ints, e.g. 3,224,224"
        )
    return dims if len(dims) == 4 else (1, *dims)


def parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"{text!r} should be a JSON object, e.g. '{{\"num_classes\": 10}}'"
        )
    return value


def parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} should be comma-separated numbers, e.g. 0.1307"
        ) from None


def add_arch_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--arch", required=required, metavar="MODULE:CALLABLE",
        help="how to build the model whose weights the checkpoint holds, "
             "e.g. digit_recognizer.model:CNN or torchvision.models:resnet18",
    )
    parser.add_argument("--arch-kwargs", type=parse_json_object, default=None, metavar="JSON",
                        help="keyword arguments for --arch, e.g. '{\"num_classes\": 10}'")
    parser.add_argument(
        "--allow-pickle", action="store_true",
        help="allow a checkpoint that is a whole pickled model; unpickling runs arbitrary "
             "code, so use it only for files you trust (the default loads tensors only)",
    )


def add_data_options(parser: argparse.ArgumentParser, evaluation: bool = True) -> None:
    parser.add_argument("--mean", type=parse_floats, default=None,
                        help="input normalisation mean per channel, e.g. 0.1307")
    parser.add_argument("--std", type=parse_floats, default=None,
                        help="input normalisation std per channel, e.g. 0.3081")
    if evaluation:
        parser.add_argument("--limit", type=int, default=None,
                            help="evaluate N images only")
        parser.add_argument("--offset", type=int, default=0,
                            help="skip the first N images (e.g. those used by --calib)")
        parser.add_argument("--split", default="test", choices=("train", "test"),
                            help="split of the data spec, where it has splits (default: test)")
        parser.add_argument("--batch-size", type=parse_batch_size, default=256,
                            help="evaluation batch size")


def load_original(path: str, arch: str | None, arch_kwargs: dict | None,
                  allow_pickle: bool) -> nn.Module:
    """Build ``arch`` and fill it from a user's checkpoint (or unpickle a whole model)."""
    try:
        content = read_state_dict(path, allow_pickle=allow_pickle)
        if isinstance(content, nn.Module):
            return content.eval()
        if arch is None:
            raise CLIError(f"{path!r} holds a state_dict: give --arch MODULE:CALLABLE to build "
                           "the model it belongs to")
        model = build_model(arch, arch_kwargs)
        load_weights(model, content, repr(path))
    except CheckpointError as err:
        raise CLIError(str(err)) from None
    return model.eval()


def check_input_shape(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """An example input of ``shape`` that the model accepts, or a clear error."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    example = torch.randn(shape, dtype=dtype)
    try:
        with torch.no_grad():
            model(example)
    except Exception as err:
        first = first_line(err)
        raise CLIError(
            f"the model rejects an input of shape {'x'.join(map(str, shape))} ({first}); "
            "give the shape it expects with --input-shape C,H,W"
        ) from None
    return example


def check_output_path(output: str, inputs: list[str], force: bool) -> Path:
    """Refuse to overwrite an input, or an existing file without --force."""
    out = Path(output)
    for source in inputs:
        if Path(source).exists() and out.exists() and os.path.samefile(out, source) \
                or out.resolve() == Path(source).resolve():
            raise CLIError(f"output {output!r} is the input file; choose another path",
                           EXIT_USAGE)
    if out.is_symlink() and not out.exists():
        raise CLIError(f"output {output!r} is a symlink to a missing file; remove the link or "
                       "choose another path", EXIT_USAGE)
    if out.is_dir():
        raise CLIError(f"output {output!r} is a folder; give the path of a file", EXIT_USAGE)
    if out.exists() and not out.is_file():
        raise CLIError(f"output {output!r} exists and is not a regular file; choose another path",
                       EXIT_USAGE)
    if out.exists() and not force:
        raise CLIError(f"output {output!r} exists; pass --force to replace it", EXIT_USAGE)
    if not out.parent.exists():
        raise CLIError(f"the folder of output {output!r} does not exist", EXIT_USAGE)
    if not os.access(out.parent, os.W_OK):
        raise CLIError(f"the folder of output {output!r} is not writable", EXIT_USAGE)
    return out


def add_report_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", metavar="PATH", default=None,
                        help="also write the records to PATH: .json (every field) or .md "
                             "(the table as Markdown)")


def check_report_path(path: str | None, inputs: list[str], force: bool) -> Path | None:
    """The --report path, checked like any output, or None when not asked for."""
    if path is None:
        return None
    if Path(path).suffix not in REPORT_SUFFIXES:
        raise CLIError(f"--report {path!r} should end in .json or .md", EXIT_USAGE)
    return check_output_path(path, inputs, force)


def write_report(report, path: Path | None, force: bool) -> None:
    """Write ``report`` as JSON or Markdown by the suffix of ``path`` (atomically).

    Without ``force`` a file that appeared at ``path`` since it was checked is kept.
    """
    if path is None:
        return
    write_text(path, render(report, path.suffix), replace=force)
    print(f"wrote {path}")


@contextlib.contextmanager
def notes_in_summary(printed: bool = True) -> Iterator[None]:
    """Leave out the conversion's log records that the printed summary repeats as notes.

    ``printed``: whether this process prints the summary (under torchrun, only the
    main one does; the others keep the records).
    """
    def not_a_note(record: logging.LogRecord) -> bool:
        return not all(getattr(record, key, False) for key in IN_NOTES)

    convert_logger = logging.getLogger("dwconvert.convert")
    if printed:
        convert_logger.addFilter(not_a_note)
    try:
        yield
    finally:
        convert_logger.removeFilter(not_a_note)
