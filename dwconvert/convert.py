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
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any, Union

import torch
from torch import nn

from . import calibrate, factorize, fold, ranks, speed
from .costs import Geometry, ModelCost, measure
from .errors import first_line
from .factorize import FORMS, KernelShape, Whitening
from .graph import ConvSites, find_convs, replace_module
from .latency import MedianTimer, ModuleTimer, capture_inputs, format_seconds
from .layers import FORM_CLASSES, PLAIN, layout_options
from .layouts import arrangements, is_channels_last
from .progress import progress
from .ranks import COST_MEASURES, LayerCost, Option
from .report import IN_NOTES, ConversionReport, LayerRecord

logger = logging.getLogger(__name__)

Rank = Union[int, str]

class WeightsError(ValueError):
    """A conv whose weights cannot be factorized (NaN or Inf values)."""


DEFAULT_BUDGET = 0.5
AUTO = "auto"
BUDGET_SCOPES = ("model", "convertible")
OBJECTIVES = ("macs", "latency")
# Data-free, a converted conv with a relative weight error above this is worth a warning.
# Measured: the MNIST CNN at 1/4 of its MACs kept 99.6% top-1 with CP (errors 0.48 and
# 0.57) and fell to 56-65% with dw-pw or pw-dw (0.78-0.84); FashionResNet with one conv
# at 0.97 fell from 92.6% to 19%.
HIGH_WEIGHT_ERROR = 0.75


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
    objective: str = "macs",
    speedup: float | None = None,
    layout: str | None = None,
    timer: ModuleTimer | None = None,
    rank_multiple: int | None = None,
    max_macs: float | None = None,
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
        objective: ``"macs"`` (the budget counts MACs or parameters) or
            ``"latency"``: each conv and a few ranks of each form are timed at
            the conv's input from ``example_inputs`` (on its device, with the
            current torch threads), the budget is a fraction of the model's
            measured time, and a conv whose replacement is not measured faster
            stays as it is (see docs/latency.md).
        speedup: with ``objective="latency"``, the target speedup of the whole
            model (e.g. ``1.5``) instead of a budget: ``budget = 1 / speedup``.
        layout: how the factorized layers run their weights (docs/latency.md):
            ``"auto"`` times the candidate layouts of each layer and keeps the
            fastest (the default with ``objective="latency"``), ``"plain"`` (the
            default otherwise) or a layout such as ``"channels_last"``.
        timer: replaces the timing of modules (a
            :data:`~dwconvert.latency.ModuleTimer`); the default takes interleaved
            medians.
        rank_multiple: choose only ranks whose inner width (the channels between
            the layers of a chain) is a multiple of this, or below it; CPU kernels
            run such widths much faster (docs/latency.md). Default: 8 with
            ``objective="latency"``, else 1 (every rank).
        max_macs: with ``objective="latency"``, a cap on the MACs as well: the
            converted model keeps at most this fraction of the MACs (of the whole
            model, or of the convertible convs with ``budget_scope="convertible"``)
            while the time budget is spent. Alone (no ``budget`` or ``speedup``)
            there is no time budget: the least error within the cap, from options
            measured faster than the original conv.

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
                                           budget_scope, objective, speedup, example_inputs,
                                           max_macs)
    layout = layout or (AUTO if objective == "latency" else PLAIN)
    if rank_multiple is None:
        rank_multiple = 8 if objective == "latency" else 1
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) \
            or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be a positive int, got {rank_multiple!r}")
    timing = layout == AUTO or objective == "latency"
    if timing and example_inputs is None:
        raise ValueError("layout='auto' times each layer at its real input: give example_inputs")
    if layout not in (AUTO, PLAIN):
        for f in forms:
            layout_options(f, layout)
    timer = timer or MedianTimer()
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
    reference = copy.deepcopy(model) if inplace and (batches is not None or timing) else model
    fold_notes = _fold(target) if fold_bn else []
    if fold_bn and (batches is not None or timing):
        reference = copy.deepcopy(target)  # refit and timing compare with the folded convs

    # 1-2. Find the convs, measure the model, decide which convs can be converted.
    found = survey(target, example_inputs, exclude)
    sites, before, convs = found.sites, found.before, found.convs
    records, layers = found.records, found.layers

    # The input each conv receives, at which it and its candidates are timed.
    inputs = capture_inputs(target, {n: convs[n] for n in layers}, example_inputs) \
        if timing and layers else {}

    # 3. Statistics of each conv's input, for data-aware factorization.
    whitening: dict[str, Whitening] = {}
    if batches is not None and layers:
        stats = calibrate.collect_stats(target, list(layers), batches)
        whitening = {name: Whitening.from_moments(s.patch, s.channel, s.out_energy,
                                                  s.patch_sum, s.count)
                     for name, s in stats.items()}

    # 4. Choose a form and rank per conv (max_macs implies objective="latency").
    cap = None if max_macs is None else MacsCap.of(layers, before, budget_scope, max_macs)
    if objective == "latency":
        choice = _choose_by_time(layers, convs, forms, rank, budget, tolerance, budget_scope,
                                 reference, example_inputs, inputs, timer, whitening, seed,
                                 cp_size_limit, records, rank_multiple, cap)
    else:
        choice = _choose(layers, convs, forms, rank, budget, tolerance, budget_on,
                         budget_scope, before, params_before, whitening, seed, cp_size_limit,
                         rank_multiple)

    # 5. Factorize and swap in the new modules.
    converted = []
    for name, option in progress(choice.items(), "factorizing", total=len(choice),
                                 unit="layer"):
        record, conv = records[name], convs[name]
        if isinstance(rank, int) and rank > layers[name].full_rank(forms[0]):
            record.requested_rank = rank
            record.full_rank = layers[name].full_rank(forms[0])
        if option.keeps_original:
            record.reason = record.reason or _keep_reason(
                layers[name], forms, rank, budget_on, tolerance,
                budget if max_macs is None else None)
            continue
        _convert_layer(target, name, sites, conv, layers[name], option, record,
                       whitening.get(name), cp_iters=cp_iters, seed=seed)
        converted.append(name)

    # 5b. Give each new module its layout; by latency, keep convs that are not beaten
    # (unless putting the original back would break the MACs cap).
    macs_left = None if cap is None else cap.room - sum(choice[n].macs for n in layers)
    for name in list(converted):
        module = target.get_submodule(name)
        if timing:
            _time_converted(name, module, convs[name], inputs[name], timer, records[name],
                            layout)
            record = records[name]
            if objective == "latency" and record.time_after >= record.time_before:
                extra = layers[name].original() - choice[name].macs
                if macs_left is not None and extra > macs_left:
                    logger.info("%s: not faster, but kept converted: the original would "
                                "break max_macs", name)
                    continue
                if macs_left is not None:
                    macs_left -= extra
                _revert(target, name, sites, convs[name], record)
                converted.remove(name)
        elif layout != PLAIN:
            module.set_layout(layout)
            records[name].layout = layout

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
        for name in converted:  # the refit assigned new weights: give them the layout's strides
            module = target.get_submodule(name)
            module.set_layout(module.layout)

    # 7. Time the whole model; by latency, undo a conversion that is slower as a whole
    # (per-layer gains that do not add up, as on small models). Then measure and report.
    seconds = None
    if timing:
        seconds = timer({"original": reference, "converted": target}, example_inputs)
    if objective == "latency" and converted and seconds["converted"] >= seconds["original"]:
        seconds = _undo_if_slower(target, reference, example_inputs, sites, convs, records,
                                  converted, timer, max_macs, notes)
    if batches is None:
        _warn_of_high_errors(records, converted, notes)
    after = measure(target, example_inputs) if example_inputs is not None else None
    report = _report(target, sites, records, before, after, budget, params_before, notes)
    report.budget_on, report.budget_scope = budget_on, budget_scope
    report.objective, report.speedup_target = objective, speedup
    report.max_macs = max_macs
    report.notes[:0] = fold_notes
    if seconds is not None:
        report.time_before, report.time_after = seconds["original"], seconds["converted"]
    for record in report.layers:
        if record.time_rose:
            message = (f"{record.name}: MACs fell ({record.macs_before} -> {record.macs_after}) "
                       f"but time rose ({format_seconds(record.time_before)} -> "
                       f"{format_seconds(record.time_after)})")
            report.notes.append("warning: " + message)
            logger.warning(message, extra=IN_NOTES)
    target.dwconvert_report = report
    return target


@dataclass
class Survey:
    """What a model holds before any conv is converted.

    Attributes:
        sites: the model's convs, from the fx trace (or by module type).
        before: MACs and parameters at the example input (``None`` without one).
        convs: every conv module by qualified name, in forward order.
        records: a skipped-so-far record per conv, with the reason for each conv
            that cannot be converted at all.
        layers: the cost model of each convertible conv.
    """

    sites: ConvSites
    before: ModelCost | None
    convs: dict[str, nn.Conv2d]
    records: dict[str, LayerRecord]
    layers: dict[str, LayerCost]


def survey(model: nn.Module, example_inputs: tuple | None,
           exclude: Sequence[str] = ()) -> Survey:
    """Find the convs of ``model``, measure it, and say which convs can be converted.

    Changes nothing; :func:`convert` and :func:`dwconvert.inspect` both start here.

    Raises:
        ValueError: a convertible conv has NaN or Inf weights.
    """
    sites = find_convs(model)
    before = _measure_example(model, example_inputs)
    convs = {name: model.get_submodule(name) for name in sites.names}

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
    return Survey(sites, before, convs, records, layers)


def _measure_example(model: nn.Module, example_inputs) -> ModelCost | None:
    if example_inputs is None:
        return None
    try:
        return measure(model, example_inputs)
    except Exception as err:  # the model's own error, for an input it cannot take
        shapes = ", ".join("x".join(map(str, x.shape)) if isinstance(x, torch.Tensor)
                           else type(x).__name__ for x in example_inputs)
        first = first_line(err)
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


def _check_arguments(form, rank, budget, tolerance, budget_on, budget_scope, objective="macs",
                     speedup=None, example_inputs=None, max_macs=None):
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if max_macs is not None:
        if objective != "latency":
            raise ValueError("max_macs caps the MACs of objective='latency' (CLI: --objective "
                             "latency --max-macs); with the MACs objective give budget instead")
        if not isinstance(max_macs, (int, float)) or isinstance(max_macs, bool) \
                or math.isnan(max_macs) or not 0 < max_macs <= 1:
            raise ValueError(f"max_macs is the fraction of the MACs to keep at most and must "
                             f"lie in (0, 1], got {max_macs!r}")
        if rank is not None or tolerance is not None:
            raise ValueError("max_macs caps a budget or a speedup: give it without "
                             f"{'rank' if rank is not None else 'tolerance'}")
        if budget is None and speedup is None and tolerance is None:
            budget = 1.0  # no time budget: the least error within the MACs cap
    if objective == "latency" and example_inputs is None:
        raise ValueError("objective='latency' times each conv at its real input: give "
                         "example_inputs, e.g. torch.randn(1, 3, 224, 224)")
    if objective == "latency" and budget_on != "macs":
        raise ValueError(f"budget_on={budget_on!r} applies to objective='macs'; with "
                         "objective='latency' the budget is a fraction of the measured time")
    if speedup is not None:
        if objective != "latency":
            raise ValueError("speedup needs objective='latency' (CLI: --objective latency)")
        if not isinstance(speedup, (int, float)) or isinstance(speedup, bool) \
                or not 1 <= speedup < math.inf:
            raise ValueError(f"speedup is how many times faster the model should run and "
                             f"must be a number >= 1, got {speedup!r}")
        if budget is not None or rank is not None or tolerance is not None:
            raise ValueError("give one of rank, budget, tolerance or speedup")
        budget = 1 / speedup
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


def _keep_reason(layer: LayerCost, forms, rank, budget_on, tolerance,
                 budget: float | None = None) -> str:
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
    if budget is not None and budget >= 1:
        return "kept: a budget of 1 leaves room for the exact original"
    return "kept: the budget is better spent on other layers"


def _choose(layers, convs, forms, rank, budget, tolerance, on, scope, before, model_params,
            whitening, seed, cp_size_limit, rank_multiple=1) -> dict[str, Option]:
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
                              seed, cp_size_limit, rank_multiple)
               for name, layer in progress(layers.items(), "measuring errors",
                                           total=len(layers), unit="layer")}
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
             cp_size_limit, rank_multiple=1) -> list[Option]:
    curves = _curves(layer, conv, forms, on, budget, whitening, seed, cp_size_limit)
    return ranks.options_for(layer, curves, on, rank_multiple=rank_multiple)


def _curves(layer: LayerCost, conv: nn.Conv2d, forms, on, budget, whitening, seed,
            cp_size_limit) -> dict[str, list[float]]:
    """Per form, the error at each rank up to the highest rank cheaper than the conv."""
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
    return curves


@dataclass(frozen=True)
class MacsCap:
    """``max_macs`` in MACs: the cap is ``fraction`` of ``total``; ``room`` is what it
    leaves the convertible convs once the layers that are not converted are counted."""

    fraction: float
    total: int
    room: float

    @classmethod
    def of(cls, layers, before: ModelCost, scope: str, fraction: float) -> MacsCap:
        convertible = sum(layer.original() for layer in layers.values())
        total = convertible if scope == "convertible" else before.macs
        return cls(fraction, total, fraction * total - (total - convertible))


def _choose_by_time(layers, convs, forms, rank, budget, tolerance, scope, reference,
                    example_inputs, inputs, timer, whitening, seed, cp_size_limit, records,
                    rank_multiple, cap: MacsCap | None = None) -> dict[str, Option]:
    """One option per conv, with measured seconds as the cost (``objective="latency"``).

    With ``cap``, the chosen options' MACs also stay within ``cap.room``.
    """
    if rank is not None:  # the rank is given: time only what the layout step will check
        return _choose(layers, convs, forms, rank, None, None, "macs", scope, None, 0,
                       whitening, seed, cp_size_limit)
    options, times = {}, {}
    for name, layer in layers.items():
        curves = _curves(layer, convs[name], forms, "macs", budget, whitening.get(name), seed,
                         cp_size_limit)
        curves = {form: errors for form, errors in curves.items() if errors}
        allowed = {form: [r for r in range(1, len(errors) + 1)
                          if ranks.aligned(layer, form, r, rank_multiple)]
                   for form, errors in curves.items()}
        times[name] = speed.time_layer(convs[name], inputs[name], allowed, timer)
        options[name] = ranks.options_for(layer, curves, cost=times[name].time,
                                          original=times[name].original,
                                          rank_multiple=rank_multiple)
        records[name].time_before = records[name].time_after = times[name].original
        if len(options[name]) == 1:
            records[name].reason = (f"kept: no form and rank measured faster than the "
                                    f"original ({format_seconds(times[name].original)})")
        logger.info("timed %s: original %s, %d options faster", name,
                    format_seconds(times[name].original), len(options[name]) - 1)
    if tolerance is not None:
        return {name: ranks.within_tolerance(opts, tolerance) for name, opts in options.items()}
    convertible = sum(t.original for t in times.values())
    total = convertible
    if scope == "model":
        model_time = timer({"model": reference}, example_inputs)["model"]
        total = max(model_time, convertible)
    room = budget * total - (total - convertible)
    lowest = ranks.minimum_cost(options)
    if room < lowest:
        reachable = (total - convertible + lowest) / total
        raise ranks.BudgetError(
            f"{'speedup %.3g' % (1 / budget)} (budget {budget:.3g} of the measured time) is out "
            f"of reach: the fastest options measured keep {reachable:.3f} of the time "
            f"(speedup {1 / reachable:.3f} at most); ask for less, e.g. speedup "
            f"{max(1.0, 0.95 / reachable):.2f} with room for timing noise, or convert the model "
            "on a quieter machine", minimum=reachable)
    if cap is None:
        return ranks.allocate(options, room)
    try:
        return ranks.allocate(options, room, cap.room)
    except ranks.BudgetError as err:  # the time room fits the fastest options: the cap failed
        unconverted = cap.fraction * cap.total - cap.room
        lowest = (err.minimum + unconverted) / cap.total
        raise ranks.BudgetError(
            f"max_macs {cap.fraction:.3g} is out of reach: the fastest options measured keep "
            f"{lowest:.3f} of the MACs (convs with no option measured faster stay whole, "
            "and layers that are not converted keep theirs); allow more MACs",
            minimum=lowest) from None


def _time_converted(name, module, conv, inputs, timer, record, layout) -> None:
    """Time the original conv and its replacement in each layout allowed; keep the fastest."""
    if layout == AUTO:
        candidates = arrangements(module, is_channels_last(inputs[0]))
    else:
        module.set_layout(layout)
        candidates = {module.layout: module}
    contenders = {"original": conv, **candidates}
    seconds = timer(contenders, inputs)
    best = min((k for k in seconds if k != "original"), key=seconds.get)
    module.set_layout(best)
    record.layout = best
    record.time_before, record.time_after = seconds["original"], seconds[best]
    logger.info("%s: layout %s, %s -> %s", name, best, format_seconds(record.time_before),
                format_seconds(record.time_after))


def _warn_of_high_errors(records, converted, notes) -> None:
    """A warning in ``notes`` if converted convs lost much of their kernel, with no data."""
    high = sorted(((records[n].weight_error, n) for n in converted
                   if (records[n].weight_error or 0.0) > HIGH_WEIGHT_ERROR), reverse=True)
    if not high:
        return
    (error, name), count = high[0], len(high)
    notes.append(f"warning: {count} converted conv{'s' if count > 1 else ''} keep a relative "
                 f"weight error above {HIGH_WEIGHT_ERROR} (the worst, {name}: {error:.3f}), "
                 "with no calibration data; accuracy often falls far at such errors: measure "
                 "it, and give calibration data (calibration=, CLI --calib), fine-tune, or "
                 "convert less")
    logger.warning(notes[-1], extra=IN_NOTES)


def _undo_if_slower(target, reference, example_inputs, sites, convs, records, converted,
                    timer, max_macs, notes) -> dict[str, float]:
    """Time the whole model again; if it is still not faster, put every original conv back.

    With ``max_macs`` the conversion stays (the cap is a hard limit) and a note says so.
    Returns the seconds of the final measurement.
    """
    seconds = timer({"original": reference, "converted": target}, example_inputs)
    if seconds["converted"] < seconds["original"]:
        return seconds
    timing = (f"{format_seconds(seconds['original'])} -> "
              f"{format_seconds(seconds['converted'])}, measured twice")
    if max_macs is not None:
        notes.append(f"warning: the converted model is not faster than the original as a "
                     f"whole ({timing}); it is kept because max_macs={max_macs:g} asks for "
                     "fewer MACs")
        logger.warning(notes[-1], extra=IN_NOTES)
        return seconds
    for name in list(converted):
        _revert(target, name, sites, convs[name], records[name])
        records[name].reason = ("kept: the converted model as a whole was not faster than "
                                f"the original ({timing})")
        converted.remove(name)
    notes.append(f"every conv put back: the converted model as a whole was not faster than "
                 f"the original ({timing}); per-layer gains did not add up")
    logger.warning(notes[-1], extra=IN_NOTES)
    return timer({"original": reference, "converted": target}, example_inputs)


def _revert(target, name, sites, conv, record) -> None:
    """Put the original conv back: its replacement was not measured faster."""
    for alias in [name, *sites.aliases.get(name, [])]:
        replace_module(target, alias, conv)
    record.reason = (f"kept: {record.form} at rank {record.rank} measured "
                     f"{format_seconds(record.time_after)}, not faster than the original "
                     f"{format_seconds(record.time_before)}")
    logger.info("%s: %s", name, record.reason)
    record.status, record.form, record.rank, record.full_rank = "skipped", None, None, None
    record.macs_after = record.params_after = record.weight_error = None
    record.layout = None
    record.time_after = record.time_before


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
        logger.warning("no conv of %s was converted: %s", type(target).__name__, why,
                       extra=IN_NOTES)
    if not report.layers:
        report.notes.append("the model has no nn.Conv2d")
    if before is None:
        report.notes.append("no example input: MACs are per output pixel of each conv")
    return report
