"""Convert one model at a series of budgets and measure what each conversion gives.

For every budget the model is converted, its MACs and parameters are counted,
its top-1 accuracy is measured when labelled data is given, and its latency is
measured as the median of repeated batch-1 forward passes. The original model
is measured in the same run, on the same input, the models taking turns pass by
pass, so that the latency ratios compare like with like.

Latency is wall-clock time on the machine and threads of the run: it says how
the conversions rank there, not on another target.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

from .convert import convert
from .costs import measure
from .evaluate import evaluate
from .latency import synchronizer, time_interleaved
from .modes import eval_mode
from .progress import progress
from .ranks import BudgetError
from .report import format_count, markdown

logger = logging.getLogger(__name__)

CSV_FIELDS = ("model", "budget", "macs", "mac_ratio", "params", "param_ratio", "converted",
              "top1", "latency_ms", "latency_ratio", "pareto_top1", "pareto_latency")


@dataclass
class SweepPoint:
    """One model of a sweep: the original (``budget`` None) or a conversion.

    Attributes:
        model: ``"original"`` or ``"budget 0.25"``.
        budget: the budget of the conversion (``None`` for the original).
        macs / params: MACs per image at the example input, and parameters.
        mac_ratio / param_ratio: the same, as fractions of the original.
        converted: convs converted.
        top1: top-1 accuracy (0..1) on the data, ``None`` without data.
        latency_ms: median time of a batch-1 forward pass, in milliseconds.
        latency_ratio: ``latency_ms`` over the original's.
        pareto_top1: on the front of MACs against top-1 (no other point has fewer
            or equal MACs and a higher or equal top-1, one of them strictly).
        pareto_latency: on the front of MACs against latency.
    """

    model: str
    budget: float | None
    macs: int
    params: int
    mac_ratio: float
    param_ratio: float
    converted: int
    latency_ms: float
    latency_ratio: float = 1.0
    top1: float | None = None
    pareto_top1: bool = False
    pareto_latency: bool = False


@dataclass
class SweepResult:
    """The points of a sweep, the original first."""

    points: list[SweepPoint]
    data: str | None = None
    repeats: int = 0
    threads: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def original(self) -> SweepPoint:
        return self.points[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per point with the CSV fields."""
        return [{name: getattr(point, name) for name in CSV_FIELDS} for point in self.points]

    def table(self, tablefmt: str = "simple") -> str:
        rows = []
        for p in self.points:
            front = ", ".join(n for n, on in (("top-1", p.pareto_top1),
                                              ("latency", p.pareto_latency)) if on)
            rows.append([p.model, format_count(p.macs), f"{p.mac_ratio:.3f}",
                         format_count(p.params), str(p.converted),
                         "" if p.top1 is None else f"{100 * p.top1:.2f}%",
                         f"{p.latency_ms:.3f}", f"{p.latency_ratio:.2f}", front])
        headers = ["model", "MACs", "MAC ratio", "params", "converted", "top-1",
                   "latency ms", "latency ratio", "Pareto front"]
        if all(p.top1 is None for p in self.points):
            headers.remove("top-1")
            rows = [row[:5] + row[6:] for row in rows]
        return tabulate(rows, headers=headers, disable_numparse=True, tablefmt=tablefmt)

    def summary(self) -> str:
        lines = [f"latency: median of {self.repeats} batch-1 forward passes on "
                 f"{self.threads} thread(s), the models taking turns, original included"]
        if self.data:
            lines.append(f"top-1 on {self.data}")
        lines.extend(self.notes)
        return "\n".join(lines)

    def to_markdown(self) -> str:
        return markdown("Sweep", self.table("github"), self.summary())

    def __str__(self) -> str:
        return self.table() + "\n\n" + self.summary()


def median_latencies(models: Sequence[nn.Module], example_inputs: tuple, *,
                     repeats: int = 50, warmup: int = 5) -> list[float]:
    """Median wall-clock seconds of ``model(*example_inputs)`` for each model.

    The models take turns, one forward pass each per round, so that a change in
    the machine's load during the measurement touches all of them alike.
    """
    calls = {index: (lambda m=m: m(*example_inputs)) for index, m in enumerate(models)}
    with eval_mode(*models):
        seconds = time_interleaved(calls, warmup=warmup, repeats=repeats,
                                   sync=synchronizer(example_inputs))
    return [seconds[index] for index in range(len(models))]


def median_latency(model: nn.Module, example_inputs: tuple, *, repeats: int = 50,
                   warmup: int = 5) -> float:
    """Median wall-clock seconds of ``model(*example_inputs)`` over ``repeats`` runs."""
    return median_latencies([model], example_inputs, repeats=repeats, warmup=warmup)[0]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For points ``(cost, loss)``, whether each is on the front (both lower is better).

    A point is on the front when no other point has a cost and a loss at most
    its own, one of them strictly lower.
    """
    return [not any(c <= cost and l <= loss and (c < cost or l < loss) for c, l in points)
            for cost, loss in points]


def sweep(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    budgets: Sequence[float],
    *,
    data: Iterable[Any] | None = None,
    data_name: str | None = None,
    repeats: int = 50,
    warmup: int = 5,
    keep_models: bool = False,
    **convert_options: Any,
) -> tuple[SweepResult, dict[float, nn.Module]]:
    """Convert ``model`` at each budget and measure MACs, accuracy and latency.

    Args:
        model: the trained network (not changed).
        example_inputs: a batch-1 input (or tuple of forward arguments): MACs and
            latency are measured on it.
        budgets: fractions of the model's cost to keep, each in (0, 1].
        data: labelled batches ``(images, labels)`` for top-1 accuracy, or None.
        data_name: how to name ``data`` in the summary.
        repeats: timed forward passes per model; the median is reported.
        warmup: untimed forward passes before them.
        keep_models: return the converted models too (otherwise the dict is empty).
        **convert_options: passed to :func:`dwconvert.convert` (``form``,
            ``calibration``, ``budget_on``, ...).

    Returns:
        The :class:`SweepResult` and, with ``keep_models``, each converted model by
        budget. A budget below what the model can reach is left out with a note.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    before = measure(model, example_inputs)
    result = SweepResult(points=[], data=data_name if data is not None else None,
                         repeats=repeats, threads=torch.get_num_threads())
    models: dict[float, nn.Module] = {}
    candidates: list[tuple[str, float | None, nn.Module, int]] = [("original", None, model, 0)]
    for budget in progress(budgets, "converting", unit="budget"):
        try:
            converted = convert(model, budget=budget, example_inputs=example_inputs,
                                **convert_options)
        except BudgetError as err:
            result.notes.append(f"budget {budget:g} left out: {err}")
            logger.warning("budget %g left out: %s", budget, err)
            continue
        candidates.append((f"budget {budget:g}", budget, converted,
                           len(converted.dwconvert_report.converted)))
        if keep_models:
            models[budget] = converted

    latencies = median_latencies([c[2] for c in candidates], example_inputs, repeats=repeats,
                                 warmup=warmup)
    for (label, budget, candidate, count), seconds in zip(
            progress(candidates, "evaluating", unit="model"), latencies):
        cost = measure(candidate, example_inputs)
        point = SweepPoint(model=label, budget=budget, macs=cost.macs, params=cost.params,
                           mac_ratio=cost.macs / before.macs if before.macs else float("nan"),
                           param_ratio=cost.params / before.params,
                           converted=count, latency_ms=1e3 * seconds)
        if data is not None:
            point.top1 = evaluate(candidate, data).top1
        logger.info("%s: MACs %s, latency %.3f ms%s", label, format_count(cost.macs),
                    point.latency_ms, "" if point.top1 is None else f", top-1 {point.top1:.4f}")
        result.points.append(point)

    base = result.original.latency_ms
    for point in result.points:
        point.latency_ratio = point.latency_ms / base if base else float("nan")
    if data is not None:
        fronts = pareto_front([(p.macs, -p.top1) for p in result.points])
        for point, on in zip(result.points, fronts):
            point.pareto_top1 = on
    for point, on in zip(result.points, pareto_front([(p.macs, p.latency_ms)
                                                        for p in result.points])):
        point.pareto_latency = on
    return result, models
