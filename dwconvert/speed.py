"""Measured time as the cost of each option of a conv (``objective="latency"``).

For every form a conv can take, a few ranks (at most :data:`TIMED_RANKS`, spread
over the useful range) are built with random weights in every candidate layout
and timed, interleaved with the original conv, at the conv's real input. The time
of the other ranks is interpolated linearly between the timed ones (the work of
every layer of a chain grows linearly with the rank). Options not faster than the
original conv are dropped, so a conv stays as it is when nothing beats it.

So per conv at most ``forms * TIMED_RANKS * layouts + 1`` modules are timed (3 x 3 x
4 + 1 = 37), in one interleaved run.
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


def timed_ranks(top: int, count: int = TIMED_RANKS) -> list[int]:
    """Up to ``count`` ranks from 1 to ``top``, evenly spread, both ends included."""
    if top <= 1 or count <= 1:
        return [1]
    return sorted({1 + round(i * (top - 1) / (count - 1)) for i in range(count)})


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


def time_layer(conv: nn.Conv2d, inputs: Sequence[torch.Tensor], tops: Mapping[str, int],
               timer: ModuleTimer) -> LayerTimes:
    """Time ``conv`` and its candidates up to rank ``tops[form]`` of each form."""
    channels_last = is_channels_last(inputs[0])
    contenders: dict[str, nn.Module] = {ORIGINAL: conv}
    for form, top in tops.items():
        for rank in timed_ranks(top):
            module = FORM_CLASSES[form].empty_like(conv, rank).eval()
            for layout, twin in arrangements(module, channels_last).items():
                contenders[f"{form}|{rank}|{layout}"] = twin
    seconds = timer(contenders, inputs)
    times = LayerTimes(original=seconds[ORIGINAL])
    best: dict[tuple[str, int], tuple[float, str]] = {}
    for key, value in seconds.items():
        if key == ORIGINAL:
            continue
        form, rank, layout = key.split("|")
        if (form, int(rank)) not in best or value < best[form, int(rank)][0]:
            best[form, int(rank)] = (value, layout)
    for (form, rank), (value, layout) in sorted(best.items()):
        times.points.setdefault(form, []).append((rank, value, layout))
    return times
