"""Rank choice: from a MAC budget to one rank per layer.

:func:`allocate` minimises the sum of squared per-layer errors under a MAC
budget, given each layer's error at every candidate rank. It upgrades, one step
at a time, the layer whose next option buys the most error reduction per MAC.
A layer may stay unconverted (rank ``None``) where that is the best use of the
budget, or where every rank would cost as much as the original conv.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .costs import Geometry, conv_macs, form_macs
from .factorize import KernelShape


class BudgetError(ValueError):
    """The MAC budget cannot be met by any choice of ranks."""


@dataclass(frozen=True)
class LayerCost:
    """The MAC cost of one convertible conv as a function of rank."""

    name: str
    form: str
    shape: KernelShape
    geometry: Geometry
    full_rank: int

    @property
    def original_macs(self) -> int:
        return conv_macs(self.shape, self.geometry)

    def macs(self, rank: int) -> int:
        return form_macs(self.form, self.shape, rank, self.geometry)

    def max_useful_rank(self) -> int:
        """The highest rank that still costs less than the original (0 if none does)."""
        per_rank = self.macs(1)
        if per_rank >= self.original_macs:
            return 0
        return min(self.full_rank, math.ceil(self.original_macs / per_rank) - 1)

    def rank_for(self, macs: float) -> int | None:
        """The highest useful rank whose cost is at most ``macs`` (``None``: keep the conv)."""
        top = self.max_useful_rank()
        if top == 0:
            return None
        return max(1, min(top, int(macs // self.macs(1))))


def minimum_macs(layers: Sequence[LayerCost]) -> int:
    """The fewest MACs these layers can cost: each at rank 1 or, if cheaper, unchanged."""
    return sum(min(layer.macs(1), layer.original_macs) for layer in layers)


def _cost(layer: LayerCost, rank: int | None) -> int:
    return layer.original_macs if rank is None else layer.macs(rank)


def _check_reachable(layers: Sequence[LayerCost], target: float) -> None:
    lowest = minimum_macs(layers)
    if target < lowest:
        raise BudgetError(
            f"the convertible convs cannot cost fewer than {lowest} MACs, "
            f"but the budget leaves them {int(target)}"
        )


def allocate(
    layers: Sequence[LayerCost],
    errors: dict[str, Sequence[float]],
    target: float,
) -> dict[str, int | None]:
    """Ranks that minimise ``sum(error**2)`` with total MACs at most ``target``.

    Args:
        layers: the convertible convs.
        errors: per layer name, the error at rank 1, 2, ... (index ``r - 1``);
            keeping the original conv has error 0.
        target: the MACs the layers may cost together.

    Each layer starts at rank 1 (or unchanged where no rank is cheaper), then the
    upgrade with the best error reduction per added MAC that still fits is taken,
    until none fits. An upgrade may jump several ranks, or to the original conv.
    """
    _check_reachable(layers, target)

    # options[i]: (cost, squared error) in increasing cost; last is the original conv
    options: list[list[tuple[int, float, int | None]]] = []
    for la in layers:
        top = la.max_useful_rank()
        opts = [(la.macs(r), float(errors[la.name][r - 1]) ** 2, r) for r in range(1, top + 1)]
        opts.append((la.original_macs, 0.0, None))
        options.append(opts)

    position = [0] * len(layers)
    spent = sum(opts[0][0] for opts in options)

    def best_jump(i: int, room: float) -> tuple[float, int] | None:
        cost0, err0, _ = options[i][position[i]]
        best = None
        for j in range(position[i] + 1, len(options[i])):
            cost, err, _ = options[i][j]
            extra = cost - cost0
            if extra > room or err >= err0:
                continue
            gain = (err0 - err) / max(extra, 1)
            if best is None or gain > best[0]:
                best = (gain, j)
        return best

    heap = []
    for i in range(len(layers)):
        jump = best_jump(i, target - spent)
        if jump:
            heapq.heappush(heap, (-jump[0], i, jump[1]))
    while heap:
        _, i, j = heapq.heappop(heap)
        room = target - spent
        extra = options[i][j][0] - options[i][position[i]][0]
        if extra > room:
            # No longer fits: look again for this layer within the room left.
            jump = best_jump(i, room)
            if jump:
                heapq.heappush(heap, (-jump[0], i, jump[1]))
            continue
        position[i] = j
        spent += extra
        jump = best_jump(i, target - spent)
        if jump:
            heapq.heappush(heap, (-jump[0], i, jump[1]))
    return {la.name: options[i][position[i]][2] for i, la in enumerate(layers)}
