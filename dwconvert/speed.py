"""Measured time as the cost of each option of a conv (``objective="latency"``).

For every form a conv can take, a few ranks (at most :data:`TIMED_RANKS`, spread
over the useful ranks allowed by ``rank_multiple``) are built with random weights in
every candidate layout and timed, interleaved with the original conv, at the conv's
real input. The time of the other ranks is interpolated linearly between the timed
ones (the work of every layer of a chain grows linearly with the rank). Options not
faster than the original conv are dropped, so a conv stays as it is when nothing
beats it.

The layouts are timed at the middle rank of each form only, and the other ranks in
the layout that won there, so per conv at most ``forms * (layouts + TIMED_RANKS - 1) +
1`` modules are timed (3 x (4 + 2) + 1 = 19), in two interleaved runs.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .latency import ModuleTimer
from .layers import FORM_CLASSES
from .layouts import arrangements, is_channels_last

logger = logging.getLogger(__name__)

TIMED_RANKS = 3
ORIGINAL = "original"


def timed_ranks(allowed: Sequence[int], count: int = TIMED_RANKS) -> list[int]:
    """Up to ``count`` of the ``allowed`` ranks (ascending), evenly spread, ends included."""
    if len(allowed) <= count:
        return list(allowed)
    last = len(allowed) - 1
    return sorted({allowed[round(i * last / (count - 1))] for i in range(count)})


@dataclass
class LayerTimes:
    """Measured seconds of one conv and of its candidates.

    ``points[form]`` lists ``(rank, seconds, layout)`` of the timed ranks, rank
    ascending, each at its fastest layout.
    """

    original: float
    points: dict[str, list[tuple[int, float, str]]] = field(default_factory=dict)

    def time(self, form: str, rank: int) -> float:
        """Seconds of ``form`` at ``rank``, interpolated between the timed ranks."""
        points = self.points[form]
        ranks = [p[0] for p in points]
        i = bisect.bisect_left(ranks, rank)
        if i < len(ranks) and ranks[i] == rank:
            return points[i][1]
        if len(points) == 1:
            return points[0][1]
        i = min(max(i, 1), len(points) - 1)
        lo, hi = points[i - 1], points[i]
        return max(0.0, lo[1] + (hi[1] - lo[1]) * (rank - lo[0]) / (hi[0] - lo[0]))

    def layout(self, form: str, rank: int) -> str:
        """The fastest layout at the timed rank nearest ``rank``."""
        return min(self.points[form], key=lambda p: abs(p[0] - rank))[2]


def time_layer(conv: nn.Conv2d, inputs: Sequence[torch.Tensor],
               allowed: Mapping[str, Sequence[int]], timer: ModuleTimer) -> LayerTimes:
    """Time ``conv`` and a few of the ``allowed`` ranks (ascending) of each form.

    Two interleaved runs: every candidate layout of each form at its middle timed
    rank, with the original conv; then the other timed ranks in the layout that won.
    """
    channels_last = is_channels_last(inputs[0])
    ranks = {form: timed_ranks(r) for form, r in allowed.items() if r}
    middle = {form: r[len(r) // 2] for form, r in ranks.items()}
    contenders: dict[str, nn.Module] = {ORIGINAL: conv}
    for form, rank in middle.items():
        module = FORM_CLASSES[form].empty_like(conv, rank).eval()
        for layout, twin in arrangements(module, channels_last).items():
            contenders[f"{form}|{rank}|{layout}"] = twin
    seconds = timer(contenders, inputs)
    times = LayerTimes(original=seconds.pop(ORIGINAL))
    best: dict[str, tuple[float, str]] = {}
    for key, value in seconds.items():
        form, _, layout = key.split("|")
        if form not in best or value < best[form][0]:
            best[form] = (value, layout)
    others: dict[str, nn.Module] = {}
    for form, layout in ((f, b[1]) for f, b in best.items()):
        for rank in ranks[form]:
            if rank != middle[form]:
                module = FORM_CLASSES[form].empty_like(conv, rank, layout=layout).eval()
                others[f"{form}|{rank}|{layout}"] = module
    found = {f"{form}|{middle[form]}|{b[1]}": b[0] for form, b in best.items()}
    if others:
        found.update(timer(others, inputs))
    for key, value in sorted(found.items(), key=lambda kv: int(kv[0].split("|")[1])):
        form, rank, layout = key.split("|")
        times.points.setdefault(form, []).append((int(rank), value, layout))
    return times
