"""The conversion pass: every standard ``Conv2d`` to a factorized form.

Before: ``... -> Conv2d(M, N, k) -> ...``
After:  ``... -> DwPwConv2d | PwDwConv2d | CPConv2d -> ...`` (a chain of smaller convs)

Steps: find the convs (:mod:`dwconvert.graph`), measure the model at the example
input (:mod:`dwconvert.costs`), collect input statistics when calibration data is
given (:mod:`dwconvert.calibrate`), choose a form and rank per conv
(:mod:`dwconvert.ranks`), factorize and swap the modules, refit them on the
calibration data in forward order, and report.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from collections.abc import Sequence
from fnmatch import fnmatch
from typing import Any, Union

import torch
from torch import nn

from . import calibrate, factorize, fold, ranks
from .costs import Geometry, ModelCost, measure
from .factorize import FORMS, KernelShape, Whitening
from .graph import ConvSites, find_convs, replace_module
from .layers import FORM_CLASSES
from .ranks import COST_MEASURES, LayerCost, Option
from .report import ConversionReport, LayerRecord

logger = logging.getLogger(__name__)

Rank = Union[int, str]

class WeightsError(ValueError):
    """A conv whose weights cannot be factorized (NaN or Inf values)."""


DEFAULT_BUDGET = 0.5
AUTO = "auto"
BUDGET_SCOPES = ("model", "convertible")


def convert(
    model: nn.Module,
    *,
    form: str = AUTO,
    rank: Rank | None = None,
    budget: float | None = None,
    tolerance: float | None = None,
    budget_on: str = "macs",
    budget_scope: str = "model",
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    calibration: Any = None,
    calib_samples: int | None = 512,
    recalibrate_bn: bool = False,
    fold_bn: bool = False,
    exclude: Sequence[str] = (),
    inplace: bool = False,
    cp_iters: int = 100,
    cp_size_limit: float = 2e8,
    seed: int = 0,
) -> nn.Module:
    """Replace the standard convs of ``model`` by depthwise + pointwise factorizations.

    The convs are found by tracing ``model`` with torch.fx (or, if it cannot be
    traced, by module type) and swapped at their qualified names, so the result
    is the same class as ``model`` with the same ``forward``. 1x1 convs, convs
    that are already depthwise and convs whose factorized form would cost as much
    as the original are left unchanged, and the report says why.

    Args:
        model: the trained network. It is deep-copied unless ``inplace``.
        form: ``"dw-pw"`` (per-input-channel SVD), ``"pw-dw"`` (per-output-channel
            SVD), ``"cp"`` (pointwise-depthwise-pointwise from a CP decomposition),
            or ``"auto"``: per conv, whichever form and rank serve the budget best.
        rank: one rank for every conv, clamped to each conv's full rank; ``"full"``
            converts every convertible conv exactly, even where that costs more.
            Needs an explicit ``form``.
        budget: the fraction of the model's cost to keep, in (0, 1]. With
            ``example_inputs`` it is a whole-model budget; without, each conv keeps
            that fraction of its own cost. The default when neither ``rank`` nor
            ``tolerance`` is given: 0.5.
        tolerance: instead of a budget, the largest relative error allowed per conv
            (its output error on the calibration data, or its weight error without
            calibration); each conv gets the cheapest form and rank within it.
        budget_on: what the budget counts: ``"macs"`` or ``"params"``.
        budget_scope: ``"model"`` (the budget is a fraction of the whole model's
            cost) or ``"convertible"`` (a fraction of the cost of the convs that
            can be converted, leaving out 1x1 and depthwise convs and the rest).
        example_inputs: a batch (or tuple of forward arguments) at which MACs are
            measured, e.g. ``torch.randn(1, 3, 224, 224)``.
        calibration: images that make the conversion data-aware: a tensor batch,
            or an iterable of batches or ``(input, label)`` pairs. Each conv is
            factorized to minimise the error of its output on them, and the last
            layer of each replacement is refitted by least squares, in forward
            order, on the inputs the converted network produces.
        calib_samples: use at most this many calibration images.
        recalibrate_bn: re-estimate BatchNorm running statistics on the
            calibration images after the refit.
        fold_bn: first fold each eval-mode ``BatchNorm2d`` that directly follows a
            conv into that conv (``W * s``, ``(b - mean) * s + beta``), and put a
            :class:`~dwconvert.fold.FoldedBatchNorm2d` (an identity) in its place.
            For inference only: the folded BatchNorms' statistics are gone.
        exclude: qualified names or glob patterns (``"layer4.*"``) of convs to keep.
        inplace: convert ``model`` itself instead of a copy.
        cp_iters: ALS iterations for the ``cp`` form.
        cp_size_limit: with ``form="auto"``, ``cp`` is not tried for a conv whose
            kernel size times CP rank exceeds this, because its ALS would take
            minutes; such convs choose between the SVD forms.
        seed: seed of the CP initialisation.

    Returns:
        The converted model. Its ``dwconvert_report`` attribute holds a
        :class:`~dwconvert.report.ConversionReport` with a record per conv.

    Raises:
        ValueError: for an unknown form, a rank below 1, a budget outside (0, 1],
            or ``example_inputs`` the model rejects; :class:`WeightsError` (a
            ``ValueError``) for NaN or Inf weights, naming the layer;
            :class:`~dwconvert.ranks.BudgetError` (a ``ValueError``) for a budget
            below what the model can reach.
    """
    forms, rank, budget = _check_arguments(form, rank, budget, tolerance, budget_on,
                                           budget_scope)
    if not isinstance(cp_iters, int) or cp_iters < 1:
        raise ValueError(f"cp_iters must be a positive int, got {cp_iters!r}")
    if isinstance(exclude, str):
        exclude = [exclude]
    if example_inputs is not None and isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    batches = None
    if calibration is not None:
        batches = calibrate.as_batches(calibration, calib_samples)
    params_before = sum(p.numel() for p in model.parameters())
    target = model if inplace else copy.deepcopy(model)
    reference = copy.deepcopy(model) if inplace and batches is not None else model
    fold_notes = _fold(target) if fold_bn else []
    if fold_bn and batches is not None:
        reference = copy.deepcopy(target)  # the refit targets the folded convs' outputs

    # 1. Find the convs and measure the model.
    sites = find_convs(target)
    before = _measure_example(target, example_inputs)
    convs = {name: target.get_submodule(name) for name in sites.names}

    # 2. Decide, per conv, whether it can be converted at all.
    records: dict[str, LayerRecord] = {}
    layers: dict[str, LayerCost] = {}
    for name, conv in convs.items():
        layer = LayerCost(name, KernelShape.of(conv.weight, conv.groups),
                          _geometry(before, name, conv), conv.bias is not None)
        records[name] = LayerRecord(name=name, status="skipped",
                                    macs_before=layer.original("macs"),
                                    params_before=layer.original("params"))
        names = [name, *sites.aliases.get(name, [])]
        reason = _skip_reason(names, conv, exclude)
        if not reason and before is not None and name not in before.geometries:
            reason = "not called at the example input, so its cost is unknown"
        if reason:
            records[name].reason = reason
            # 1x1 and depthwise convs are expected; other skips deserve attention.
            expected = reason.startswith(("1x1", "already depthwise"))
            logger.log(logging.INFO if expected else logging.WARNING, "skipping %s: %s",
                       name, reason)
            continue
        if not torch.isfinite(conv.weight).all():
            raise WeightsError(
                f"layer {name} has NaN or Inf weights; fix or retrain it, or leave it "
                f"unconverted with exclude=[{name!r}] (CLI: --exclude {name})"
            )
        layers[name] = layer
        records[name].convertible = True

    # 3. Statistics of each conv's input, for data-aware factorization.
    whitening: dict[str, Whitening] = {}
    if batches is not None and layers:
        stats = calibrate.collect_stats(target, list(layers), batches)
        whitening = {name: Whitening.from_moments(s.patch, s.channel, s.out_energy,
                                                  s.patch_sum, s.count)
                     for name, s in stats.items()}

    # 4. Choose a form and rank per conv.
    choice = _choose(layers, convs, forms, rank, budget, tolerance, budget_on, budget_scope,
                     before, params_before, whitening, seed, cp_size_limit)

    # 5. Factorize and swap in the new modules.
    converted = []
    for name, option in choice.items():
        record, conv = records[name], convs[name]
        if isinstance(rank, int) and rank > layers[name].full_rank(forms[0]):
            record.requested_rank = rank
            record.full_rank = layers[name].full_rank(forms[0])
        if option.keeps_original:
            record.reason = _keep_reason(layers[name], forms, rank, budget_on, tolerance)
            continue
        _convert_layer(target, name, sites, conv, layers[name], option, record,
                       whitening.get(name), cp_iters=cp_iters, seed=seed)
        converted.append(name)

    # 6. Refit on calibration data, layer by layer in forward order.
    notes = []
    if batches is not None and converted:
        for result in calibrate.refit(reference, target, converted, batches):
            record = records[result.name]
            record.output_error = result.error_after
            # The refit moved the last layer: measure the kernel the chain now computes.
            module = target.get_submodule(result.name)
            now = factorize.Decomposition(module.form, module.rank,
                                          tuple(layer.weight for layer in module.layers()), 0.0)
            record.weight_error = factorize.relative_error(
                convs[result.name].weight, factorize.reconstruct(now, module.groups))
        if recalibrate_bn:
            count = calibrate.recalibrate_batchnorm(target, batches)
            notes.append(f"recalibrated {count} BatchNorm layers on the calibration data")

    # 7. Measure again and report.
    after = measure(target, example_inputs) if example_inputs is not None else None
    report = _report(target, sites, records, before, after, budget, params_before, notes)
    report.budget_on, report.budget_scope = budget_on, budget_scope
    report.notes[:0] = fold_notes
    target.dwconvert_report = report
    return target


def _measure_example(model: nn.Module, example_inputs) -> ModelCost | None:
    if example_inputs is None:
        return None
    try:
        return measure(model, example_inputs)
    except Exception as err:  # the model's own error, for an input it cannot take
        shapes = ", ".join("x".join(map(str, x.shape)) if isinstance(x, torch.Tensor)
                           else type(x).__name__ for x in example_inputs)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"the model rejects example_inputs of shape {shapes} "
                         f"({type(err).__name__}: {first}); give inputs of the shape "
                         "it expects") from err


def _fold(target: nn.Module) -> list[str]:
    result = fold.fold_batchnorm(target)
    notes = [f"folded {len(result.folds)} BatchNorm2d into the conv before each "
             "(inference only: their running statistics are gone)"]
    if not result.traced and result.kept:
        notes.append(f"no BatchNorm folded: {next(iter(result.kept.values()))}")
    return notes


def _check_arguments(form, rank, budget, tolerance, budget_on, budget_scope):
    if form != AUTO and form not in FORMS:
        raise ValueError(f"unknown form {form!r}: expected one of auto, {', '.join(FORMS)}")
    if budget_on not in COST_MEASURES:
        raise ValueError(f"budget_on must be one of {', '.join(COST_MEASURES)}, got {budget_on!r}")
    if budget_scope not in BUDGET_SCOPES:
        raise ValueError(
            f"budget_scope must be one of {', '.join(BUDGET_SCOPES)}, got {budget_scope!r}"
        )
    given = [n for n, v in (("rank", rank), ("budget", budget), ("tolerance", tolerance))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one of rank, budget or tolerance, not {' and '.join(given)}")
    if not given:
        budget = DEFAULT_BUDGET
    if rank is not None:
        if form == AUTO:
            raise ValueError(
                f"rank={rank!r} needs an explicit form (dw-pw, pw-dw or cp); "
                "form='auto' chooses ranks from a budget or a tolerance"
            )
        if isinstance(rank, str):
            if rank != "full":
                raise ValueError(f"rank must be a positive int or 'full', got {rank!r}")
        elif isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int or 'full', got {rank!r}")
    if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool)
                               or math.isnan(budget) or not 0 < budget <= 1):
        raise ValueError(
            f"budget is the fraction of the cost to keep and must lie in (0, 1], got {budget!r}"
        )
    if tolerance is not None and (not isinstance(tolerance, (int, float))
                                  or math.isnan(tolerance) or tolerance <= 0):
        raise ValueError(f"tolerance is a relative error and must be > 0, got {tolerance!r}")
    forms = FORMS if form == AUTO else (form,)
    return forms, rank, budget


def _geometry(before: ModelCost | None, name: str, conv: nn.Conv2d) -> Geometry:
    if before is not None and name in before.geometries:
        return before.geometries[name]
    return Geometry.per_output_pixel(conv.stride)


def _skip_reason(names: Sequence[str], conv: nn.Conv2d, exclude: Sequence[str]) -> str:
    if any(fnmatch(name, pattern) for name in names for pattern in exclude):
        return "excluded by the user"
    if type(conv) is not nn.Conv2d and (
            type(conv).forward is not nn.Conv2d.forward
            or type(conv)._conv_forward is not nn.Conv2d._conv_forward):
        return f"{type(conv).__name__} is a Conv2d subclass with its own forward"
    if conv.kernel_size == (1, 1):
        return "1x1 conv: already pointwise"
    if conv.groups == conv.in_channels > 1:
        return "already depthwise (groups == in_channels)"
    if not conv.weight.detach().any():
        return "all-zero kernel: nothing to factorize"
    return ""


def _keep_reason(layer: LayerCost, forms, rank, budget_on, tolerance) -> str:
    if rank is not None:
        form = forms[0]
        r = min(rank, layer.full_rank(form))
        return (f"{form} at rank {r} would cost {layer.cost(form, r)} MACs, not fewer than "
                f"the original {layer.original()}")
    useful = any(layer.max_useful_rank(f, budget_on) for f in forms)
    if not useful:
        return f"{' / '.join(forms)} at any rank costs as much as the original"
    if tolerance is not None:
        return f"no form within tolerance {tolerance:g} is cheaper than the original"
    return "kept: the budget is better spent on other layers"


def _choose(layers, convs, forms, rank, budget, tolerance, on, scope, before, model_params,
            whitening, seed, cp_size_limit) -> dict[str, Option]:
    """One option per convertible conv, from a rank, a budget or a tolerance."""
    if rank is not None:
        form = forms[0]
        chosen = {}
        for name, layer in layers.items():
            full = layer.full_rank(form)
            r = full if rank == "full" else min(rank, full)
            option = Option(form, r, layer.cost(form, r, "macs"), math.nan)
            if rank != "full" and option.cost >= layer.original("macs"):
                option = Option(None, None, layer.original("macs"), 0.0)
            chosen[name] = option
        return chosen

    # The total the budget is a fraction of (None: no common scale across layers).
    total = model_params if on == "params" else before.macs if before is not None else None
    if scope == "convertible" and total is not None:
        total = sum(layer.original(on) for layer in layers.values())
    if budget is not None and total is not None:
        _check_reachable(layers, forms, budget, on, total)
    options = {name: _options(layer, convs[name], forms, on, budget, whitening.get(name),
                              seed, cp_size_limit)
               for name, layer in layers.items()}
    if tolerance is not None:
        return {name: ranks.within_tolerance(opts, tolerance) for name, opts in options.items()}
    if total is None:
        return {name: ranks.within_own_budget(opts, budget) for name, opts in options.items()}
    convertible = sum(layer.original(on) for layer in layers.values())
    room = budget * total - (total - convertible)
    return ranks.allocate(options, room)


def _check_reachable(layers, forms, budget, on, total) -> None:
    """Fail early, before any decomposition, if the budget is out of reach."""
    if budget is None:
        return
    lowest = total
    for layer in layers.values():
        useful = [layer.cost(f, 1, on) for f in forms
                  if layer.max_useful_rank(f, on)]
        lowest -= layer.original(on) - min(useful, default=layer.original(on))
    if budget * total < lowest:
        raise ranks.BudgetError(
            f"budget {budget:g} is below what this model can reach: the lowest reachable "
            f"budget is {lowest / total:.4f} (every convertible conv at rank 1 of its "
            f"cheapest form; the rest is in layers that are not converted)",
            minimum=lowest / total,
        )


def _options(layer: LayerCost, conv: nn.Conv2d, forms, on, budget, whitening, seed,
             cp_size_limit) -> list[Option]:
    curves = {}
    for form in forms:
        top = layer.max_useful_rank(form, on)
        cp_ranks = None
        if form == "cp" and top:
            cp_ranks = _cp_ranks(layer, top, on, budget)
            size = conv.weight.numel() * max(cp_ranks)
            if len(forms) > 1 and size > cp_size_limit:
                logger.info("not trying cp for %s: ALS at rank %d would be slow (size %.2g "
                            "> cp_size_limit %.2g)", layer.name, max(cp_ranks), size,
                            cp_size_limit)
                continue
        curves[form] = factorize.error_curve(form, conv.weight, conv.groups, top, seed=seed,
                                             whitening=whitening, cp_ranks=cp_ranks)
    return ranks.options_for(layer, curves, on)


def _cp_ranks(layer: LayerCost, top: int, on: str, budget: float | None) -> list[int]:
    """The CP ranks worth measuring: around the budget if there is one, else spread out."""
    if budget is None:
        return [round(top ** (i / 3)) for i in range(4)]
    per_rank = layer.cost("cp", 2, on) - layer.cost("cp", 1, on)
    fractions = (budget / 3, budget, min(3 * budget, 1.0))
    return sorted({max(1, min(top, int(f * layer.original(on) / per_rank))) for f in fractions})


def _convert_layer(target, name, sites, conv, layer, option, record, whitening, **options):
    form = option.form
    try:
        decomposition = factorize.decompose(form, conv.weight, conv.groups, option.rank,
                                            whitening=whitening, **options)
        # With calibration data the refit also fits a bias, to correct the output mean.
        module = FORM_CLASSES[form].from_decomposition(conv, decomposition,
                                                       out_bias=whitening is not None)
    except Exception as err:
        raise RuntimeError(f"converting layer {name} ({conv}) to {form} failed: {err}") from err
    for alias in [name, *sites.aliases.get(name, [])]:
        replace_module(target, alias, module)
    record.status = "converted"
    record.form = form
    record.rank = decomposition.rank
    record.full_rank = layer.full_rank(form)
    record.macs_after = layer.cost(form, decomposition.rank, "macs")
    record.params_after = sum(p.numel() for p in module.parameters())
    # Without whitening the decomposition's own error is the weight error.
    record.weight_error = decomposition.error if whitening is None else \
        factorize.relative_error(conv.weight, factorize.reconstruct(decomposition, conv.groups))
    logger.info("converted %s to %s at rank %d/%d (weight error %.3f)", name, form,
                decomposition.rank, record.full_rank, record.weight_error)


def _report(target, sites: ConvSites, records, before, after, budget, params_before, notes):
    for name in sites.unused:
        records[name] = LayerRecord(name=name, status="skipped", macs_before=0,
                                    params_before=0, reason="never called by forward")
    report = ConversionReport(
        layers=list(records.values()),
        traced=sites.traced,
        params_before=params_before,
        params_after=sum(p.numel() for p in target.parameters()),
        macs_before=before.macs if before else None,
        macs_after=after.macs if after else None,
        budget=budget,
        notes=notes,
    )
    if not sites.traced:
        report.notes.append(f"not traceable ({sites.trace_error}): modules replaced in place")
    if not report.converted and report.layers:
        reasons = Counter(r.reason for r in report.layers)
        why = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common())
        report.notes.append(f"no conv was converted: {why}")
        logger.warning("no conv of %s was converted: %s", type(target).__name__, why)
    if not report.layers:
        report.notes.append("the model has no nn.Conv2d")
    if before is None:
        report.notes.append("no example input: MACs are per output pixel of each conv")
    return report
