"""Export a converted model to ONNX or TorchScript, checked against PyTorch before writing.

Each export is written to a temporary file beside the target, loaded back
(onnxruntime for ONNX, ``torch.jit.load`` for TorchScript), run at two batch
sizes and compared with the PyTorch model; only a file that agrees is renamed
into place. The batch dimension is dynamic in both formats.

Known limits: the ONNX check runs on onnxruntime's CPU provider; a model larger
than 2 GB, which ONNX stores with external data files, is not supported.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .files import write_atomically

logger = logging.getLogger(__name__)

ONNX_EXPORTERS = ("dynamo", "torchscript")
INSTALL_HINT = "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'dwconvert[onnx]'"


class ExportError(RuntimeError):
    """An export failed, or its result does not compute what the PyTorch model does."""


@dataclass(frozen=True)
class ExportCheck:
    """How closely an exported file matched PyTorch.

    Attributes:
        path: the file written.
        batch_sizes: the batch sizes it was run at.
        max_error: the largest ``max|exported - torch| / max|torch|`` over them.
    """

    path: Path
    batch_sizes: tuple[int, ...]
    max_error: float


def _batch(example: torch.Tensor, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(size)
    return torch.randn((size, *example.shape[1:]), generator=generator, dtype=example.dtype)


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        return float("inf")
    scale = float(ref.abs().max()) or 1.0
    return float((out - ref).abs().max()) / scale


def _check(run, model: nn.Module, example: torch.Tensor, batch_sizes, tolerance: float,
           what: str) -> float:
    worst = 0.0
    for size in batch_sizes:
        x = _batch(example, size)
        with torch.no_grad():
            ref = model(x)
        if not isinstance(ref, torch.Tensor):
            raise ExportError(f"the model returns {type(ref).__name__}; export checks models "
                              "that return one tensor")
        error = _relative(run(x), ref)
        logger.info("%s at batch %d: relative max error %.3g", what, size, error)
        if not error <= tolerance:
            raise ExportError(f"{what} differs from PyTorch at batch size {size}: relative max "
                              f"error {error:.3g} > {tolerance:g}; nothing was written")
        worst = max(worst, error)
    return worst


def require_onnx():
    """onnxruntime, or an ImportError saying how to install the ONNX tools."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return onnxruntime


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                exporter: str = "dynamo", batch_sizes: tuple[int, ...] = (1, 3),
                tolerance: float = 1e-4, opset: int | None = None,
                overwrite: bool = True) -> ExportCheck:
    """Write ``model`` as ONNX with a dynamic batch dimension, checked in onnxruntime.

    Args:
        model: the (converted) model, in eval mode.
        example: an input batch ``(B, C, H, W)``; its shape after the batch
            dimension is fixed in the file.
        path: the ``.onnx`` file to write.
        exporter: ``"dynamo"`` (``torch.export`` based, the default of current
            PyTorch) or ``"torchscript"`` (the older tracing exporter).
        batch_sizes: the batch sizes at which onnxruntime is compared with PyTorch.
        tolerance: the largest relative max error accepted.
        opset: the ONNX opset (the exporter's default if None).
        overwrite: replace ``path`` if it exists; if False, an existing ``path``
            (or one that appears during the export) raises ``FileExistsError``.

    Raises:
        ImportError: onnx or onnxruntime is missing.
        ExportError: the export failed or its outputs differ from PyTorch.
    """
    if exporter not in ONNX_EXPORTERS:
        raise ValueError(f"exporter {exporter!r}: expected one of {', '.join(ONNX_EXPORTERS)}")
    ort = require_onnx()
    model = model.eval()
    options = {} if opset is None else {"opset_version": opset}
    check = {}

    def write(tmp: Path) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                if exporter == "dynamo":
                    batch = torch.export.Dim("batch", min=1)
                    # One self-contained file: external data would be named after tmp.
                    torch.onnx.export(model, (example,), str(tmp), dynamo=True, verbose=False,
                                      external_data=False, input_names=["input"],
                                      output_names=["output"], dynamic_shapes=({0: batch},),
                                      **options)
                else:
                    torch.onnx.export(model, (example,), str(tmp), dynamo=False,
                                      input_names=["input"], output_names=["output"],
                                      dynamic_axes={"input": {0: "batch"},
                                                    "output": {0: "batch"}}, **options)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ExportError(f"the {exporter} ONNX exporter failed: {type(err).__name__}: "
                              f"{first}") from err
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

        check["error"] = _check(run, model, example, batch_sizes, tolerance, "onnxruntime")

    written = write_atomically(path, write, replace=overwrite)
    return ExportCheck(written, tuple(batch_sizes), check["error"])


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                       batch_sizes: tuple[int, ...] = (1, 3),
                       tolerance: float = 1e-5, overwrite: bool = True) -> ExportCheck:
    """Write ``model`` traced to TorchScript, checked after ``torch.jit.load``.

    Tracing records the operations run on ``example``: a model whose forward
    branches on its input is exported for that branch only (the check at other
    batch sizes catches shape-dependent branches). ``overwrite=False`` keeps an
    existing ``path`` as :func:`export_onnx` does.
    """
    model = model.eval()
    check = {}

    def write(tmp: Path) -> None:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
                traced = torch.jit.trace(model, (example,), check_trace=False)
                torch.jit.save(traced, str(tmp))
                loaded = torch.jit.load(str(tmp))
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ExportError(f"TorchScript tracing failed: {type(err).__name__}: "
                              f"{first}") from err
        check["error"] = _check(lambda x: loaded(x), model, example, batch_sizes, tolerance,
                                "TorchScript")

    written = write_atomically(path, write, replace=overwrite)
    return ExportCheck(written, tuple(batch_sizes), check["error"])
