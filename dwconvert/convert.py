"""The conversion pass: every standard ``Conv2d`` to a factorized form.

Before: ``... -> Conv2d(M, N, k) -> ...``
After:  ``... -> DwPwConv2d | PwDwConv2d | CPConv2d -> ...`` (a chain of smaller convs)
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from fnmatch import fnmatch
from typing import Union

import torch
from torch import nn

from . import factorize, ranks
from .costs import Geometry, ModelCost, conv_macs, conv_params, form_params, measure
from .factorize import FORMS, KernelShape
from .graph import ConvSites, find_convs, replace_module
from .layers import FORM_CLASSES
from .report import ConversionReport, LayerRecord

logger = logging.getLogger(__name__)

Rank = Union[int, str]

DEFAULT_BUDGET = 0.5


def convert(
    model: nn.Module,
    *,
    form: str = "cp",
    rank: Rank | None = None,
    budget: float | None = None,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    exclude: Sequence[str] = (),
    inplace: bool = False,
    cp_iters: int = 100,
    seed: int = 0,
) -> nn.Module:
    """Replace the standard convs of ``model`` by depthwise + pointwise factorizations.

    The convs are found by tracing ``model`` with torch.fx (or, if it cannot be
    traced, by module type) and swapped at their qualified names, so the result
    is the same class as ``model`` with the same ``forward``. 1x1 convs, convs
    that are already depthwise and convs whose factorized form would cost as many
    MACs as the original are left unchanged, and the report says why.

    Args:
        model: the trained network. It is deep-copied unless ``inplace``.
        form: ``"dw-pw"`` (per-input-channel SVD), ``"pw-dw"`` (per-output-channel
            SVD) or ``"cp"`` (pointwise-depthwise-pointwise from a CP decomposition).
        rank: one rank for every conv, clamped to each conv's full rank; ``"full"``
            converts every convertible conv exactly, even where that costs more.
            Give ``rank`` or ``budget``, not both.
        budget: the fraction of the model's MACs to keep, in (0, 1]. With
            ``example_inputs`` it is a whole-model budget; without, each conv keeps
            that fraction of its own MACs. Defaults to 0.5 when ``rank`` is not given.
        example_inputs: a batch (or tuple of forward arguments) at which MACs are
            measured; e.g. ``torch.randn(1, 3, 224, 224)``.
        exclude: qualified names or glob patterns (``"layer4.*"``) of convs to keep.
        inplace: convert ``model`` itself instead of a copy.
        cp_iters: ALS iterations for the ``cp`` form.
        seed: seed of the CP initialisation.

    Returns:
        The converted model. Its ``dwconvert_report`` attribute holds a
        :class:`~dwconvert.report.ConversionReport` with a record per conv.

    Raises:
        ValueError: for an unknown form, a rank below 1, a budget outside (0, 1],
            NaN or Inf weights; :class:`~dwconvert.ranks.BudgetError` (a
            ``ValueError``) for a budget below what the model can reach.
    """
    form, rank, budget = _check_arguments(form, rank, budget)
    if example_inputs is not None and isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    target = model if inplace else copy.deepcopy(model)

    # 1. Find the convs and measure the model.
    sites = find_convs(target)
    before = measure(target, example_inputs) if example_inputs is not None else None
    convs = {name: target.get_submodule(name) for name in sites.names}

    # 2. Decide, per conv, whether it can be converted at all.
    records: dict[str, LayerRecord] = {}
    candidates: list[ranks.LayerCost] = []
    for name, conv in convs.items():
        geometry = _geometry(before, name, conv)
        record, candidate = _examine(name, conv, form, geometry, exclude)
        records[name] = record
        if candidate is not None:
            candidates.append(candidate)

    # 3. Choose ranks.
    chosen = _choose_ranks(candidates, convs, form, rank, budget, before, seed)

    # 4. Factorize and swap in the new modules.
    for candidate in candidates:
        name = candidate.name
        record, conv, layer_rank = records[name], convs[name], chosen[name]
        if layer_rank is None:
            record.reason = (
                "kept: the budget is better spent on other layers"
                if candidate.max_useful_rank() else
                f"{form} at any rank costs as many MACs as the original"
            )
            continue
        if rank != "full" and candidate.macs(layer_rank) >= candidate.original_macs:
            record.reason = (
                f"{form} at rank {layer_rank} would cost {candidate.macs(layer_rank)} MACs, "
                f"not fewer than the original {candidate.original_macs}"
            )
            continue
        _convert_layer(target, name, sites, conv, candidate, layer_rank, record,
                       cp_iters=cp_iters, seed=seed)
        if isinstance(rank, int) and rank > candidate.full_rank:
            record.requested_rank = rank

    # 5. Measure again and report.
    after = measure(target, example_inputs) if example_inputs is not None else None
    report = _report(target, sites, records, before, after, budget, model)
    target.dwconvert_report = report
    return target


def _check_arguments(form, rank, budget):
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}: expected one of {', '.join(FORMS)}")
    if rank is not None and budget is not None:
        raise ValueError(f"give rank or budget, not both (got rank={rank!r}, budget={budget!r})")
    if rank is None and budget is None:
        budget = DEFAULT_BUDGET
    if rank is not None:
        if isinstance(rank, str):
            if rank != "full":
                raise ValueError(f"rank must be a positive int or 'full', got {rank!r}")
        elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int or 'full', got {rank!r}")
    if budget is not None:
        if not isinstance(budget, (int, float)) or not 0 < budget <= 1 or math.isnan(budget):
            raise ValueError(
                f"budget is the fraction of MACs to keep and must lie in (0, 1], got {budget!r}"
            )
    return form, rank, budget


def _geometry(before: ModelCost | None, name: str, conv: nn.Conv2d) -> Geometry:
    if before is not None and name in before.geometries:
        return before.geometries[name]
    return Geometry.per_output_pixel(conv.stride)


def _examine(name, conv, form, geometry, exclude):
    """The record of a conv before conversion, and its cost model if convertible."""
    shape = KernelShape.of(conv.weight, conv.groups)
    macs = conv_macs(shape, geometry)
    record = LayerRecord(name=name, status="skipped", macs_before=macs,
                         params_before=conv_params(shape, conv.bias is not None))
    reason = _skip_reason(name, conv, exclude)
    if reason:
        record.reason = reason
        logger.warning("skipping %s: %s", name, reason)
        return record, None
    if not torch.isfinite(conv.weight).all():
        raise ValueError(
            f"layer {name} has NaN or Inf weights; fix or retrain it, or pass "
            f"exclude=[{name!r}] to leave it unconverted"
        )
    full = factorize.full_rank(form, shape)
    record.full_rank = full
    return record, ranks.LayerCost(name, form, shape, geometry, full)


def _skip_reason(name: str, conv: nn.Conv2d, exclude: Sequence[str]) -> str:
    if any(fnmatch(name, pattern) for pattern in exclude):
        return "excluded by the user"
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is a Conv2d subclass with its own forward"
    if conv.kernel_size == (1, 1):
        return "1x1 conv: already pointwise"
    if conv.groups == conv.in_channels > 1:
        return "already depthwise (groups == in_channels)"
    return ""


def _choose_ranks(candidates, convs, form, rank, budget, before, seed) -> dict[str, int | None]:
    if rank == "full":
        return {c.name: c.full_rank for c in candidates}
    if rank is not None:
        return {c.name: min(rank, c.full_rank) for c in candidates}
    if before is None:
        # No example input: no common scale across layers, so each keeps `budget`.
        return {c.name: c.rank_for(budget * c.original_macs) for c in candidates}

    convertible = sum(c.original_macs for c in candidates)
    fixed = before.macs - convertible
    room = budget * before.macs - fixed
    try:
        errors = {
            c.name: factorize.error_curve(form, convs[c.name].weight, convs[c.name].groups,
                                          c.max_useful_rank(), seed=seed)
            for c in candidates
        }
        return ranks.allocate(candidates, errors, room)
    except ranks.BudgetError as err:
        lowest = (fixed + ranks.minimum_macs(candidates)) / before.macs
        raise ranks.BudgetError(
            f"budget {budget:g} is below what this model can reach: {err}; the lowest "
            f"reachable budget is {lowest:.4f} (the rest is in layers that are not converted)"
        ) from None


def _convert_layer(target, name, sites, conv, candidate, layer_rank, record, **options):
    form = candidate.form
    try:
        decomposition = factorize.decompose(form, conv.weight, conv.groups, layer_rank,
                                            **options)
        module = FORM_CLASSES[form].from_decomposition(conv, decomposition)
    except Exception as err:
        raise RuntimeError(f"converting layer {name} ({conv}) to {form} failed: {err}") from err
    for alias in [name, *sites.aliases.get(name, [])]:
        replace_module(target, alias, module)
    record.status = "converted"
    record.form = form
    record.rank = decomposition.rank
    record.macs_after = candidate.macs(decomposition.rank)
    record.params_after = form_params(form, candidate.shape, decomposition.rank,
                                      conv.bias is not None)
    record.weight_error = decomposition.error
    logger.info("converted %s to %s at rank %d/%d (weight error %.3f)", name, form,
                decomposition.rank, candidate.full_rank, decomposition.error)


def _report(target, sites: ConvSites, records, before, after, budget, original):
    for name in sites.unused:
        records[name] = LayerRecord(name=name, status="skipped", macs_before=0,
                                    params_before=0, reason="never called by forward")
    params_before = sum(p.numel() for p in original.parameters())
    params_after = sum(p.numel() for p in target.parameters())
    report = ConversionReport(
        layers=list(records.values()),
        traced=sites.traced,
        params_before=params_before,
        params_after=params_after,
        macs_before=before.macs if before else None,
        macs_after=after.macs if after else None,
        budget=budget,
    )
    if not sites.traced:
        report.notes.append(f"not traceable ({sites.trace_error}): modules replaced in place")
    if not report.converted and report.layers:
        report.notes.append("no conv was converted: see the note of each layer")
        logger.warning("no conv of %s was converted", type(original).__name__)
    if not report.layers:
        report.notes.append("the model has no nn.Conv2d")
    if before is None:
        report.notes.append("no example input: MACs are per output pixel of each conv")
    return report
