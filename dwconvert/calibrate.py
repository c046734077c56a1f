"""Data-aware conversion: input statistics, least-squares refits, BatchNorm recalibration.

Three steps use calibration images (no labels needed):

1. :func:`collect_stats` runs the original model once over the images and keeps,
   for every conv, the second moments of its input patches. They let the
   factorization minimise the error of the layer's *output* instead of its
   weights (see :mod:`dwconvert.factorize`, ``whitening``).
2. :func:`refit` then goes through the converted layers in forward order. For
   each one it runs the original model (to get the layer's true output) and the
   converted model (to get the input that the already-converted layers produce),
   and solves a ridge-regularised least-squares problem in float64 for the
   weights and bias of the chain's last layer. Errors of earlier layers are
   thereby corrected instead of piling up.
3. :func:`recalibrate_batchnorm` re-estimates BatchNorm running statistics.

Only the sufficient statistics (Gram matrices) are kept, never the activations of
the whole calibration set; each refit pass stops the forward as soon as the layer
of interest has been reached.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .modes import eval_mode
from .progress import progress

logger = logging.getLogger(__name__)

# Unfolded patches are built in pieces of at most this many elements (float32: 256 MB).
_CHUNK_ELEMENTS = 64 * 2**20


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted layer has run."""


def as_batches(calibration, max_samples: int | None = None,
               batch_size: int = 64) -> list[torch.Tensor]:
    """Normalise calibration data to a list of input batches.

    Args:
        calibration: a tensor batch ``(B, C, H, W)``, or an iterable of batches
            or of ``(input, label)`` pairs (such as a ``DataLoader``).
        max_samples: keep at most this many images.
        batch_size: split larger batches into pieces of this size.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"calib_samples must be at least 1 (or None for all), got {max_samples}")
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise TypeError(
            f"calibration must be a tensor batch or an iterable of batches or (input, label) "
            f"pairs, got {type(calibration).__name__}"
        )
    batches, count = [], 0
    for item in calibration:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"a calibration batch must be a tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(
                f"calibration batches must be image batches (B, C, H, W), got shape "
                f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)"
            )
        if max_samples is not None:
            x = x[: max_samples - count]
        for piece in x.split(batch_size):
            batches.append(piece)
        count += len(x)
        if max_samples is not None and count >= max_samples:
            break
    if not batches or count == 0:
        raise ValueError("the calibration data holds no images")
    return batches


def _patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input patches of ``conv`` at each output position: ``(B, C, k2, L)`` in float64."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    pad = conv._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x.to(torch.float64), conv.kernel_size, dilation=conv.dilation,
                    stride=conv.stride)
    b, c = x.shape[:2]
    return cols.view(b, c, conv.kernel_size[0] * conv.kernel_size[1], -1)


def _pieces(x: torch.Tensor, per_image: int):
    step = max(1, _CHUNK_ELEMENTS // max(per_image, 1))
    return x.split(step)


@dataclass
class InputStats:
    """Second moments of a conv's input patches, summed over calibration positions.

    Shapes: ``patch (M, k2, k2)`` (per input channel), ``channel (g, Mg, Mg)``
    (summed over taps), ``patch_sum (M, k2)`` the summed patches; ``out_energy``
    the summed squared deviation of the output from its per-channel mean;
    ``count`` the number of output positions.
    """

    patch: torch.Tensor
    channel: torch.Tensor
    patch_sum: torch.Tensor
    out_energy: float
    count: int

    @property
    def mean_patch(self) -> torch.Tensor:
        """The average input patch of each channel, ``(M, k2)``."""
        return self.patch_sum / max(self.count, 1)

    @property
    def spatial(self) -> torch.Tensor:
        """Tap covariance of each group, summed over its channels: ``(g, k2, k2)``."""
        g = self.channel.shape[0]
        m, k2, _ = self.patch.shape
        return self.patch.reshape(g, m // g, k2, k2).sum(dim=1)


class _StatsAccumulator:
    def __init__(self, conv: nn.Conv2d) -> None:
        self.conv = conv
        m, g = conv.in_channels, conv.groups
        k2 = conv.kernel_size[0] * conv.kernel_size[1]
        like = dict(dtype=torch.float64, device=conv.weight.device)
        self.patch = torch.zeros(m, k2, k2, **like)
        self.channel = torch.zeros(g, m // g, m // g, **like)
        self.patch_sum = torch.zeros(m, k2, **like)
        self.out_sum = torch.zeros(conv.out_channels, **like)
        self.out_sq = 0.0
        self.count = 0

    def __call__(self, module, inputs, output) -> None:
        x = inputs[0].detach()
        g = self.conv.groups
        k2 = self.patch.shape[1]
        for piece in _pieces(x, x[0].numel() * k2):
            p = _patches(self.conv, piece)  # (B, M, k2, L)
            self.patch += torch.einsum("bmsl,bmtl->mst", p, p)
            pg = p.reshape(p.shape[0], g, -1, k2, p.shape[-1])
            self.channel += torch.einsum("bgmsl,bgnsl->gmn", pg, pg)
            self.patch_sum += p.sum(dim=(0, 3))
            self.count += p.shape[0] * p.shape[-1]
        y = output.detach().to(torch.float64)
        self.out_sum += y.sum(dim=(0, 2, 3))
        self.out_sq += float(y.pow(2).sum())

    def result(self) -> InputStats:
        # Energy of the output around its per-channel mean: what a conv's signal is.
        energy = self.out_sq - float(self.out_sum.pow(2).sum()) / max(self.count, 1)
        return InputStats(self.patch, self.channel, self.patch_sum, max(energy, 0.0), self.count)


def collect_stats(model: nn.Module, names: list[str],
                  batches: list[torch.Tensor]) -> dict[str, InputStats]:
    """Input patch statistics of the convs ``names`` over all calibration batches."""
    accumulators = {name: _StatsAccumulator(model.get_submodule(name)) for name in names}
    handles = [model.get_submodule(name).register_forward_hook(acc)
               for name, acc in accumulators.items()]
    try:
        _run(model, progress(batches, "calibration statistics", unit="batch"))
    finally:
        for h in handles:
            h.remove()
    return {name: acc.result() for name, acc in accumulators.items()}


def _run(model: nn.Module, batches: list[torch.Tensor]) -> None:
    device, dtype = _device_dtype(model)
    with eval_mode(model), torch.no_grad():
        for x in batches:
            try:
                model(x.to(device=device, dtype=dtype))
            except _Stop:
                pass


def _device_dtype(model: nn.Module):
    p = next(model.parameters(), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, p.dtype


# --- least-squares refit of the last layer of a chain ---------------------------------------


@dataclass
class Refit:
    """The outcome of refitting one converted layer on calibration data.

    ``error_before`` / ``error_after``: relative output error
    ``||y_converted - y_original|| / ||y_original - mean||`` of the layer (the mean
    per output channel), measured on the calibration inputs that the converted
    network produces.
    """

    name: str
    error_before: float
    error_after: float


class _NormalEquations:
    """Accumulates ``Z^T Z``, ``Z^T Y`` and ``Y^T Y`` per group of the last layer."""

    def __init__(self, last: nn.Conv2d) -> None:
        self.last = last
        groups = last.groups
        k2 = last.kernel_size[0] * last.kernel_size[1]
        features = last.in_channels // groups * k2 + (1 if last.bias is not None else 0)
        outputs = last.out_channels // groups
        like = dict(dtype=torch.float64, device=last.weight.device)
        self.zz = torch.zeros(groups, features, features, **like)
        self.zy = torch.zeros(groups, features, outputs, **like)
        self.yy = torch.zeros(groups, outputs, **like)
        self.y_sum = torch.zeros(groups, outputs, **like)
        self.count = 0

    def _features(self, z: torch.Tensor) -> torch.Tensor:
        # (B, Cin, H, W) -> (g, B*L, Cin/g * k2 [+1])
        last, g = self.last, self.last.groups
        p = _patches(last, z)  # (B, Cin, k2, L)
        b, cin, k2, positions = p.shape
        p = p.reshape(b, g, cin // g * k2, positions).permute(1, 0, 3, 2)
        p = p.reshape(g, b * positions, cin // g * k2)
        if last.bias is not None:
            p = torch.cat([p, p.new_ones(g, p.shape[1], 1)], dim=2)
        return p

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        g = self.last.groups
        k2 = self.last.kernel_size[0] * self.last.kernel_size[1]
        per_image = z[0].numel() * k2  # unfolded features of one image
        for z_piece, y_piece in zip(_pieces(z, per_image), _pieces(y, per_image)):
            feats = self._features(z_piece)
            # (B, N, H, W) -> (g, B*L, N/g)
            b, n = y_piece.shape[:2]
            target = y_piece.to(torch.float64).reshape(b, g, n // g, -1).permute(1, 0, 3, 2)
            target = target.reshape(g, -1, n // g)
            self.zz += feats.transpose(1, 2) @ feats
            self.zy += feats.transpose(1, 2) @ target
            self.yy += target.pow(2).sum(dim=1)
            self.y_sum += target.sum(dim=1)
            self.count += target.shape[1]

    def current(self) -> torch.Tensor:
        """The last layer's present weights as LS coefficients: ``(g, features, N/g)``."""
        last, g = self.last, self.last.groups
        w = last.weight.detach().to(torch.float64)  # (N, Cin/g, kh, kw)
        n = w.shape[0]
        coef = w.reshape(g, n // g, -1).transpose(1, 2)
        if last.bias is not None:
            bias = last.bias.detach().to(torch.float64).reshape(g, 1, n // g)
            coef = torch.cat([coef, bias], dim=1)
        return coef

    def relative_error(self, coef: torch.Tensor) -> float:
        """``||Z w - y|| / ||y - mean(y)||``: the error relative to the output's variation."""
        # ||Z w - y||^2 = w^T Z^T Z w - 2 w^T Z^T y + y^T y, summed over groups and outputs
        sq = (coef * (self.zz @ coef)).sum() - 2 * (coef * self.zy).sum() + self.yy.sum()
        spread = self.yy.sum() - self.y_sum.pow(2).sum() / max(self.count, 1)
        return float(sq.clamp_min(0).sqrt() / spread.sqrt()) if spread > 0 else 0.0

    def solve(self, ridge: float) -> torch.Tensor:
        zz = self.zz.clone()
        features = zz.shape[-1]
        weights = features - (1 if self.last.bias is not None else 0)
        diag = zz.diagonal(dim1=1, dim2=2)
        scale = diag[:, :weights].mean(dim=1, keepdim=True).clamp_min(1e-12)
        diag[:, :weights] += ridge * scale
        return torch.linalg.solve(zz, self.zy)

    def assign(self, coef: torch.Tensor) -> None:
        last = self.last
        n = last.out_channels
        has_bias = last.bias is not None
        w = coef[:, :-1] if has_bias else coef
        weight = w.transpose(1, 2).reshape(last.weight.shape)
        with torch.no_grad():
            # copy_ keeps the parameter's own strides, so its memory format survives.
            last.weight.copy_(weight.to(last.weight.dtype))
            if has_bias:
                last.bias.copy_(coef[:, -1].reshape(n).to(last.bias.dtype))


def refit(original: nn.Module, converted: nn.Module, names: list[str],
          batches: list[torch.Tensor], *, ridge: float = 1e-4) -> list[Refit]:
    """Refit the last layer of each converted module ``names`` (in forward order).

    ``original`` and ``converted`` must hold the original conv and its factorized
    replacement at each name.
    """
    results = []
    for name in progress(names, "refitting", unit="layer"):
        conv = original.get_submodule(name)
        module = converted.get_submodule(name)
        layers = module.layers()
        head, last = layers[:-1], layers[-1]
        equations = _NormalEquations(last)

        for x in batches:
            y = _capture(original, conv, x, output=True)
            z = _capture(converted, module, x, output=False)
            with torch.no_grad():
                for layer in head:
                    z = layer(z)
            equations.add(z.detach(), y.detach())

        before = equations.relative_error(equations.current())
        coef = equations.solve(ridge)
        after = equations.relative_error(coef)
        if after < before:
            equations.assign(coef)
        else:
            after = before
        results.append(Refit(name, before, after))
        logger.info("refit %s: output error %.4f -> %.4f", name, before, after)
    return results


def _capture(model: nn.Module, module: nn.Module, x: torch.Tensor, *, output: bool):
    """Run ``model`` on ``x`` until ``module`` is reached; return its input or output."""
    captured = {}

    def pre_hook(mod, inputs):
        captured["value"] = inputs[0]
        raise _Stop

    def post_hook(mod, inputs, out):
        captured["value"] = out
        raise _Stop

    handle = (module.register_forward_hook(post_hook) if output
              else module.register_forward_pre_hook(pre_hook))
    try:
        _run(model, [x])
    finally:
        handle.remove()
    if "value" not in captured:
        raise RuntimeError(f"the calibration forward pass never reached {module}")
    return captured["value"]


# --- BatchNorm --------------------------------------------------------------------------------


def recalibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> int:
    """Re-estimate the running statistics of every BatchNorm layer on ``batches``.

    Returns the number of BatchNorm layers updated. The model's training mode is
    restored afterwards.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    saved = [m.momentum for m in norms]
    with eval_mode(model):
        try:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over all batches
                m.train()
            device, dtype = _device_dtype(model)
            with torch.no_grad():
                for x in batches:
                    model(x.to(device=device, dtype=dtype))
        finally:
            for m, momentum in zip(norms, saved):
                m.momentum = momentum
    return len(norms)
