"""Look before converting: each conv's share of the cost, and what each form would lose.

:func:`inspect` runs the first steps of :func:`dwconvert.convert` (find the convs,
measure the model, decide which can be converted) and then, for every
convertible conv, the error each form would have at the ranks that keep a few
fixed fractions of that conv's MACs. Nothing is converted and the model is not
changed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from . import factorize
from .convert import Survey, survey
from .factorize import FORMS
from .progress import progress
from .ranks import LayerCost
from .report import format_count, markdown

logger = logging.getLogger(__name__)

# The fractions of a conv's own MACs at which each form's error is predicted.
DEFAULT_FRACTIONS = (0.5, 0.25, 0.125)


@dataclass
class RankError:
    """The predicted error of one form at one rank.

    Attributes:
        form: ``"dw-pw"``, ``"pw-dw"`` or ``"cp"``.
        fraction: the fraction of the conv's MACs this rank was chosen to keep.
        rank: the highest rank of ``form`` costing at most that fraction, or
            ``None`` when even rank 1 costs more.
        full_rank: the rank at which the form is exact.
        macs: MACs per image of the form at ``rank``.
        error: relative weight error ``||W - W_r|| / ||W||`` at ``rank`` (exact
            for the SVD forms; for ``cp`` an ALS fit of few iterations, so an
            upper estimate of what a conversion reaches). ``None`` when not
            measured.
        note: why the error was not measured, if it was not.
    """

    form: str
    fraction: float
    rank: int | None
    full_rank: int
    macs: int | None
    error: float | None
    note: str = ""


@dataclass
class ConvInspection:
    """One conv of the model: its cost, whether it can be converted, and at what error.

    Attributes:
        name: qualified module name.
        in_channels / out_channels / kernel_size / groups: the conv's shape.
        macs / params: MACs per image (at the example input) and parameters.
        mac_share / param_share: fraction of the whole model's MACs and parameters.
        convertible: whether :func:`dwconvert.convert` may convert it.
        reason: why it cannot be converted (empty when it can).
        errors: predicted errors of each form at each fraction.
    """

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    groups: int
    macs: int
    params: int
    mac_share: float | None
    param_share: float
    convertible: bool
    reason: str
    errors: list[RankError] = field(default_factory=list)

    def error(self, form: str, fraction: float) -> RankError | None:
        return next((e for e in self.errors if e.form == form and e.fraction == fraction),
                    None)


@dataclass
class InspectionReport:
    """Every conv of a model, with the whole model's MACs and parameters."""

    layers: list[ConvInspection]
    macs: int | None
    params: int
    traced: bool
    fractions: tuple[float, ...]
    forms: tuple[str, ...]

    @property
    def convertible(self) -> list[ConvInspection]:
        return [layer for layer in self.layers if layer.convertible]

    @property
    def convertible_mac_share(self) -> float | None:
        """Fraction of the model's MACs in convs that can be converted."""
        if not self.macs:
            return None
        return sum(layer.macs for layer in self.convertible) / self.macs

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["convertible_mac_share"] = self.convertible_mac_share
        return data

    def table(self, tablefmt: str = "simple") -> str:
        """One row per conv and form: shape, shares, and the form's error at each fraction."""
        headers = ["layer", "shape", "MACs", "MAC share", "params", "convert", "form"]
        headers += [f"err @{fraction:g}" for fraction in self.fractions]
        rows = []
        for layer in self.layers:
            kh, kw = layer.kernel_size
            shape = f"{layer.in_channels}->{layer.out_channels} {kh}x{kw}"
            if layer.groups > 1:
                shape += f" g{layer.groups}"
            head = [layer.name, shape, format_count(layer.macs),
                    "" if layer.mac_share is None else f"{100 * layer.mac_share:.1f}%",
                    format_count(layer.params), "yes" if layer.convertible else layer.reason]
            if not layer.convertible:
                rows.append(head + [""] * (1 + len(self.fractions)))
                continue
            for index, form in enumerate(self.forms):
                row = head if index == 0 else [""] * len(head)
                rows.append(row + [form] + [_format_error(layer.error(form, fraction))
                                            for fraction in self.fractions])
        return tabulate(rows, headers=headers, disable_numparse=True, tablefmt=tablefmt)

    def to_markdown(self) -> str:
        return markdown("Inspection", self.table("github"), self.summary())

    def summary(self) -> str:
        lines = [f"{len(self.convertible)} of {len(self.layers)} convs can be converted"
                 + ("" if self.traced else " (model not traceable: convs found by type)")]
        share = self.convertible_mac_share
        if share is not None:
            lines.append(f"model MACs {format_count(self.macs)}, {100 * share:.1f}% of them in "
                         "convertible convs")
        lines.append(f"parameters {format_count(self.params)}")
        lines.append("err @f: relative weight error, and rank, at the highest rank within a "
                     "fraction f of the conv's MACs")
        lines.append("('-': no rank is that cheap; '(slow)': cp not measured, beyond "
                     "cp_size_limit)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table() + "\n\n" + self.summary()


def _format_error(error: RankError | None) -> str:
    if error is None:
        return ""
    if error.rank is None:
        return "-"
    if error.error is None:
        return f"(slow) r{error.rank}"
    return f"{error.error:.3f} r{error.rank}"


def inspect(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    forms: Sequence[str] = FORMS,
    exclude: Sequence[str] = (),
    cp_iters: int = 10,
    cp_size_limit: float = 2e8,
    seed: int = 0,
) -> InspectionReport:
    """Each conv's share of the model's cost, and the error each form would have.

    The model is not changed. The convs that :func:`dwconvert.convert` would
    leave alone (1x1, depthwise, ``exclude`` d, ...) are listed with the same
    reason the conversion gives.

    Args:
        model: the trained network.
        example_inputs: a batch (or tuple of forward arguments) at which MACs are
            measured, e.g. ``torch.randn(1, 3, 224, 224)``.
        fractions: fractions of each conv's MACs, in (0, 1), at which to predict
            the error of each form.
        forms: the forms to predict.
        exclude: qualified names or glob patterns of convs to keep, as in
            :func:`dwconvert.convert`.
        cp_iters: ALS iterations per measured CP rank.
        cp_size_limit: as in :func:`dwconvert.convert`: CP errors are not measured
            for a conv whose kernel size times CP rank exceeds this (its ALS would
            take minutes); ``convert(form="auto")`` does not try CP there either.
        seed: seed of the CP initialisation.

    Returns:
        An :class:`InspectionReport` with a :class:`ConvInspection` per conv.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    fractions = tuple(float(f) for f in fractions)
    if not fractions or any(not 0 < f < 1 or math.isnan(f) for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1), got {fractions}")
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise ValueError(f"unknown form {unknown[0]!r}: expected some of {', '.join(FORMS)}")
    if isinstance(exclude, str):
        exclude = [exclude]

    found: Survey = survey(model, tuple(example_inputs), exclude)
    params = sum(p.numel() for p in model.parameters())
    layers = []
    for name, record in progress(found.records.items(), "predicting errors",
                                 total=len(found.records), unit="layer"):
        conv = found.convs[name]
        layer = ConvInspection(
            name=name, in_channels=conv.in_channels, out_channels=conv.out_channels,
            kernel_size=tuple(conv.kernel_size), groups=conv.groups,
            macs=record.macs_before, params=record.params_before,
            mac_share=record.macs_before / found.before.macs if found.before.macs else None,
            param_share=record.params_before / params if params else math.nan,
            convertible=record.convertible, reason=record.reason,
        )
        if record.convertible:
            layer.errors = _predicted_errors(found.layers[name], conv, forms, fractions,
                                             cp_iters, cp_size_limit, seed)
        layers.append(layer)
    return InspectionReport(layers=layers, macs=found.before.macs, params=params,
                            traced=found.sites.traced, fractions=fractions, forms=tuple(forms))


def _rank_within(layer: LayerCost, form: str, fraction: float) -> int | None:
    """The highest rank of ``form`` costing at most ``fraction`` of the conv's MACs."""
    limit = fraction * layer.original("macs")
    top = layer.full_rank(form)
    best = None
    for rank in range(1, top + 1):  # costs grow linearly in the rank
        if layer.cost(form, rank, "macs") > limit:
            break
        best = rank
    return best


def _predicted_errors(layer: LayerCost, conv: nn.Conv2d, forms, fractions, cp_iters,
                      cp_size_limit, seed) -> list[RankError]:
    results = []
    for form in forms:
        ranks = {fraction: _rank_within(layer, form, fraction) for fraction in fractions}
        wanted = sorted({r for r in ranks.values() if r is not None})
        curve, note = [], ""
        if form == "cp" and wanted and conv.weight.numel() * max(wanted) > cp_size_limit:
            note = "not measured: ALS at this rank would be slow (beyond cp_size_limit)"
            logger.info("%s: %s", layer.name, note)
            wanted = [r for r in wanted if conv.weight.numel() * r <= cp_size_limit]
        if wanted:
            # For cp, measuring at exactly the wanted ranks makes the curve exact there.
            curve = factorize.error_curve(form, conv.weight, conv.groups, max(wanted),
                                          cp_ranks=wanted if form == "cp" else None,
                                          cp_iters=cp_iters, seed=seed)
        for fraction in fractions:
            rank = ranks[fraction]
            measured = rank is not None and rank <= len(curve)
            results.append(RankError(
                form=form, fraction=fraction, rank=rank, full_rank=layer.full_rank(form),
                macs=None if rank is None else layer.cost(form, rank, "macs"),
                error=curve[rank - 1] if measured else None,
                note="" if measured or rank is None else note,
            ))
    return results
