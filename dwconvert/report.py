"""Records of what a conversion did, and their formatting for people.

The conversion pass returns records; nothing here computes anything but sums,
so the numbers stay testable and the CLI only formats them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tabulate import tabulate

from .latency import format_seconds

# ``extra`` of a log record whose message is also one of the report's notes, so that a
# caller that prints the summary can leave the record out (see ``cli.common``).
IN_NOTES = {"dwconvert_in_notes": True}


@dataclass
class LayerRecord:
    """One conv of the model and what happened to it.

    Attributes:
        name: qualified module name, e.g. ``layer1.0.conv1``.
        status: ``"converted"`` or ``"skipped"``.
        form: the factorized form used (``None`` when skipped).
        rank: the rank used; for ``cp`` it is per group.
        full_rank: the rank at which the form is exact.
        requested_rank: the rank asked for, when it was clamped to ``full_rank``.
        macs_before / macs_after: MACs per image (per output pixel when the
            conversion had no example input).
        params_before / params_after: parameters, bias included.
        weight_error: relative kernel error ``||W - W_r|| / ||W||``.
        output_error: relative error of the layer's output on the calibration
            data, ``||y_converted - y_original|| / ||y_original - mean||``, after
            the refit on the inputs the converted network produces (``None``
            without calibration data).
        reason: why the layer was skipped, or a note on its conversion.
        convertible: whether the conv could be converted at all (not 1x1, not
            depthwise, not excluded); a convertible conv may still be kept.
        time_before / time_after: measured seconds per call of the original conv
            and of what replaced it, at its input from the example inputs (``None``
            when nothing was timed).
        layout: the layout of the factorized module (see docs/latency.md).
    """

    name: str
    status: str
    macs_before: int
    params_before: int
    macs_after: int | None = None
    params_after: int | None = None
    form: str | None = None
    rank: int | None = None
    full_rank: int | None = None
    requested_rank: int | None = None
    weight_error: float | None = None
    output_error: float | None = None
    reason: str = ""
    convertible: bool = False
    time_before: float | None = None
    time_after: float | None = None
    layout: str | None = None

    @property
    def converted(self) -> bool:
        return self.status == "converted"

    @property
    def time_rose(self) -> bool:
        """Converted with fewer MACs, yet measured slower than the original conv."""
        return (self.converted and self.time_before is not None and self.time_after is not None
                and self.macs_after is not None and self.macs_after < self.macs_before
                and self.time_after > self.time_before)


@dataclass
class ConversionReport:
    """Every conv's record plus whole-model totals.

    Model MACs count ``nn.Conv2d`` and ``nn.Linear`` layers at the example input
    (``None`` when the conversion had none); parameters count the whole model.
    """

    layers: list[LayerRecord]
    traced: bool
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    budget: float | None = None
    budget_on: str = "macs"
    budget_scope: str = "model"
    notes: list[str] = field(default_factory=list)
    objective: str = "macs"
    speedup_target: float | None = None
    max_macs: float | None = None
    time_before: float | None = None
    time_after: float | None = None

    @property
    def converted(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.converted]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if not r.converted]

    @property
    def mac_ratio(self) -> float | None:
        """Model MACs after / before."""
        if not self.macs_before:
            return None
        return self.macs_after / self.macs_before

    @property
    def conv_mac_ratio(self) -> float | None:
        """MACs after / before of the convertible convs alone."""
        chosen = [r for r in self.layers if r.convertible]
        before = sum(r.macs_before for r in chosen)
        if not before:
            return None
        return sum(r.macs_after if r.converted else r.macs_before for r in chosen) / before

    @property
    def speedup(self) -> float | None:
        """Measured model time before / after (``None`` when not timed)."""
        if not self.time_before or not self.time_after:
            return None
        return self.time_before / self.time_after

    @property
    def param_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else math.nan

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mac_ratio"] = self.mac_ratio
        data["conv_mac_ratio"] = self.conv_mac_ratio
        data["param_ratio"] = self.param_ratio
        data["speedup"] = self.speedup
        return data

    def table(self, tablefmt: str = "simple") -> str:
        """The per-layer table, one row per conv (``tablefmt`` as in tabulate)."""
        rows = []
        for r in self.layers:
            rank = "" if r.rank is None else f"{r.rank}/{r.full_rank}"
            if r.requested_rank is not None:
                rank += f" (asked {r.requested_rank})"
            rows.append([
                r.name,
                r.form or "-",
                rank,
                format_count(r.macs_before),
                format_count(r.macs_after if r.converted else r.macs_before),
                format_count(r.params_before),
                format_count(r.params_after if r.converted else r.params_before),
                "" if r.weight_error is None else f"{r.weight_error:.3f}",
                "" if r.output_error is None else f"{r.output_error:.3f}",
                format_seconds(r.time_before),
                format_seconds(r.time_after),
                r.layout or "",
                r.reason,
            ])
        headers = ["layer", "form", "rank", "MACs", "MACs after", "params", "params after",
                   "weight err", "output err", "time", "time after", "layout", "note"]
        unused = []
        if all(r.output_error is None for r in self.layers):
            unused.append(headers.index("output err"))
        if all(r.time_before is None for r in self.layers):
            unused += [headers.index(h) for h in ("time", "time after", "layout")]
        keep = [i for i in range(len(headers)) if i not in unused]
        headers = [headers[i] for i in keep]
        rows = [[row[i] for i in keep] for row in rows]
        return tabulate(rows, headers=headers, disable_numparse=True, tablefmt=tablefmt)

    def to_markdown(self) -> str:
        """The table and the totals as a Markdown document."""
        return markdown("Conversion report", self.table("github"), self.summary())

    def summary(self) -> str:
        """Totals in a few lines: layers converted, model MACs and parameters."""
        lines = [
            f"converted {len(self.converted)} of {len(self.layers)} convs"
            + ("" if self.traced else " (model not traceable: modules replaced in place)"),
        ]
        budget = ""
        if self.budget is not None:
            scope = " of the convertible convs" if self.budget_scope == "convertible" else ""
            budget = f", budget {self.budget:.3f}{scope}"
        if self.macs_before:
            conv = self.conv_mac_ratio
            lines.append(
                f"model MACs {format_count(self.macs_before)} -> {format_count(self.macs_after)} "
                f"({self.mac_ratio:.3f} of the original"
                + (f"; convertible convs {conv:.3f}" if conv is not None else "")
                + (budget if self.budget_on == "macs" and self.objective == "macs" else "")
                + (f", at most {self.max_macs:.3f}" if self.max_macs is not None else "") + ")"
            )
        lines.append(
            f"parameters {format_count(self.params_before)} -> {format_count(self.params_after)} "
            f"({self.param_ratio:.3f} of the original"
            + (budget if self.budget_on == "params" else "") + ")"
        )
        if self.speedup is not None:
            target = "" if self.speedup_target is None else \
                f", target {self.speedup_target:.2f}x"
            if self.objective == "latency" and self.speedup_target is None \
                    and self.budget is not None and self.budget < 1:
                target = f", budget {self.budget:.3f} of the time"
            pace = f"{self.speedup:.2f}x faster" if self.speedup >= 1 else \
                f"{1 / self.speedup:.2f}x slower"
            lines.append(f"measured time {format_seconds(self.time_before)} -> "
                         f"{format_seconds(self.time_after)} ({pace}"
                         f"{target}; objective {self.objective})")
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table() + "\n\n" + self.summary()


def format_count(value: int | None) -> str:
    """``1234567`` -> ``'1.23M'``: counts as people read them."""
    if value is None:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def markdown(title: str, table: str, summary: str) -> str:
    """A Markdown document: a title, a GitHub table, and the summary lines as a list."""
    items = "\n".join(f"- {line}" for line in summary.splitlines() if line)
    return f"# {title}\n\n{table}\n\n{items}\n"


REPORT_SUFFIXES = (".json", ".md")


def render(report: Any, suffix: str) -> str:
    """``report`` (anything with ``to_dict`` and ``to_markdown``) as JSON or Markdown.

    Raises:
        ValueError: ``suffix`` is neither ``.json`` nor ``.md``.
    """
    if suffix == ".json":
        return json.dumps(report.to_dict(), indent=2, allow_nan=True) + "\n"
    if suffix == ".md":
        return report.to_markdown()
    raise ValueError(f"report suffix {suffix!r}: expected .json (records) or .md (tables)")
