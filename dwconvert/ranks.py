"""Rank choice: from a budget or an error tolerance to one (form, rank) per layer.

Each convertible conv gets a list of :class:`Option` s: every (form, rank) that
costs less than the original, with its cost and its error (the relative weight
error, or with calibration data the estimated relative output error), plus the
option of keeping the original conv at error 0. Only Pareto-efficient options
are kept: more cost must buy less error.

* :func:`allocate` minimises the summed squared error under a total cost (and,
  optionally, a second cap on the total MACs when the cost is time). It starts
  every layer at its cheapest option, then repeatedly takes the upgrade with the
  best error reduction per added cost that still fits; an upgrade may jump
  several options, to another form, or back to the original conv.
* :func:`within_tolerance` takes, per layer, the cheapest option whose error is
  at most the tolerance.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .costs import Geometry, conv_macs, conv_params, form_macs, form_params
from .factorize import KernelShape, full_rank

COST_MEASURES = ("macs", "params")


class BudgetError(ValueError):
    """The budget cannot be met by any choice of ranks.

    ``minimum`` is the lowest reachable budget, when known.
    """

    def __init__(self, message: str, minimum: float | None = None) -> None:
        super().__init__(message)
        self.minimum = minimum


@dataclass(frozen=True)
class Option:
    """One way to treat a conv: a form at a rank, or (``form=None``) keep it.

    ``cost`` is in MACs or parameters, or in seconds for ``objective="latency"``;
    ``macs`` is the option's MACs whatever the cost counts (0 where not known).
    """

    form: str | None
    rank: int | None
    cost: float
    error: float
    macs: float = 0.0

    @property
    def keeps_original(self) -> bool:
        return self.form is None


@dataclass(frozen=True)
class LayerCost:
    """The cost of one convertible conv, before and after, in MACs or parameters."""

    name: str
    shape: KernelShape
    geometry: Geometry
    bias: bool

    def original(self, on: str = "macs") -> int:
        if on == "params":
            return conv_params(self.shape, self.bias)
        return conv_macs(self.shape, self.geometry)

    def cost(self, form: str, rank: int, on: str = "macs") -> int:
        if on == "params":
            return form_params(form, self.shape, rank, self.bias)
        return form_macs(form, self.shape, rank, self.geometry)

    def full_rank(self, form: str) -> int:
        """The rank at which ``form`` reproduces this conv exactly."""
        return full_rank(form, self.shape)

    def max_useful_rank(self, form: str, on: str = "macs") -> int:
        """The highest rank of ``form`` that costs less than the original (0 if none)."""
        fixed = self.cost(form, 1, on) - self.cost(form, 2, on) + self.cost(form, 1, on)
        per_rank = self.cost(form, 1, on) - fixed
        if fixed + per_rank >= self.original(on):
            return 0
        return min(self.full_rank(form), math.ceil((self.original(on) - fixed) / per_rank) - 1)


def aligned(layer: LayerCost, form: str, rank: int, multiple: int) -> bool:
    """Whether ``rank`` gives ``form`` an inner width that is a multiple of ``multiple``.

    The inner width is the channel count between the layers of the chain: ``M*r``
    (``dw-pw``), ``N*r`` (``pw-dw``), ``g*R`` (``cp``). Ranks below ``multiple`` count
    as aligned, so that small layers keep their cheap options.
    """
    if multiple <= 1 or rank < multiple:
        return True
    shape = layer.shape
    width = {"dw-pw": shape.in_channels, "pw-dw": shape.out_channels,
             "cp": shape.groups}[form] * rank
    return width % multiple == 0


def options_for(layer: LayerCost, curves: Mapping[str, Sequence[float]],
                on: str = "macs", *, cost: Callable[[str, int], float] | None = None,
                original: float | None = None, rank_multiple: int = 1) -> list[Option]:
    """The Pareto-efficient options of a layer, cheapest first, ending with keeping it.

    Args:
        layer: the conv's cost model.
        curves: per form, the error at rank 1, 2, ... (index ``r - 1``), listed
            up to the highest useful rank.
        on: ``"macs"`` or ``"params"``.
        cost: another cost of ``(form, rank)``, such as measured seconds, with
            ``original`` the cost of keeping the conv; options that cost no less
            than ``original`` are dropped.
        rank_multiple: keep only ranks whose inner width is a multiple of this
            (see :func:`aligned`).
    """
    if cost is None:
        cost, original = (lambda form, rank: layer.cost(form, rank, on)), layer.original(on)
    candidates = [
        Option(form, rank, cost(form, rank), float(error), layer.cost(form, rank, "macs"))
        for form, errors in curves.items()
        for rank, error in enumerate(errors, start=1)
        if aligned(layer, form, rank, rank_multiple)
    ]
    candidates = [o for o in candidates if o.cost < original]
    candidates.sort(key=lambda o: (o.cost, o.error))
    options, best = [], math.inf
    for option in candidates:
        if option.error < best:
            options.append(option)
            best = option.error
    options.append(Option(None, None, original, 0.0, layer.original("macs")))
    return options


def minimum_cost(options: Mapping[str, Sequence[Option]]) -> int:
    """The least total cost: every layer at its cheapest option."""
    return sum(opts[0].cost for opts in options.values())


def allocate(options: Mapping[str, Sequence[Option]], room: float,
             macs_room: float | None = None) -> dict[str, Option]:
    """Options minimising ``sum(error**2)`` with total cost at most ``room``.

    With ``macs_room``, the options' summed ``macs`` must also stay within it: an
    upgrade is taken only if it fits both. (Greedy, like the single budget: the
    upgrades are still ranked by error reduction per added cost.)

    Raises:
        BudgetError: when even the cheapest options cost more than ``room``, or
            have more MACs than ``macs_room``.
    """
    if math.isnan(room) or (macs_room is not None and math.isnan(macs_room)):
        raise ValueError(f"the room to allocate must be a number, got {room} and {macs_room}")
    for name, opts in options.items():
        if not opts or not all(math.isfinite(o.cost) and math.isfinite(o.macs) for o in opts):
            raise ValueError(f"{name}: every layer needs options with finite costs, got {opts}")
    lowest = minimum_cost(options)
    if room < lowest:
        raise BudgetError(
            f"the convertible convs cannot cost less than {lowest}, but the budget leaves "
            f"them {room:.6g}"
        )
    names = list(options)
    position = {name: 0 for name in names}
    spent = lowest
    # Sums of float seconds round: a cost that fits to 1e-9 of the room fits.
    slack = 1e-9 * abs(room)
    macs_spent = sum(opts[0].macs for opts in options.values())
    if macs_room is None:
        macs_room = math.inf
    if macs_spent > macs_room:
        raise BudgetError(
            f"the cheapest options of the convertible convs have {macs_spent:.0f} MACs, but "
            f"the MACs cap leaves them {macs_room:.0f}", minimum=macs_spent)

    def best_jump(name: str, free: float) -> tuple[float, int] | None:
        opts = options[name]
        here = opts[position[name]]
        best = None
        for j in range(position[name] + 1, len(opts)):
            extra = opts[j].cost - here.cost
            if extra > free + slack or opts[j].error >= here.error \
                    or opts[j].macs - here.macs > macs_room - macs_spent:
                continue
            # Error saved per unit of cost, in whatever unit (MACs, seconds); a free
            # upgrade comes first.
            saved = here.error ** 2 - opts[j].error ** 2
            gain = saved / extra if extra > 0 else math.inf
            if best is None or gain > best[0]:
                best = (gain, j)
        return best

    heap: list[tuple[float, int, int]] = []

    def push(index: int) -> None:
        jump = best_jump(names[index], room - spent)
        if jump:
            heapq.heappush(heap, (-jump[0], index, jump[1]))

    for index in range(len(names)):
        push(index)
    while heap:
        _, index, j = heapq.heappop(heap)
        name = names[index]
        if j <= position[name]:  # left behind by a later upgrade of the same layer
            continue
        here, there = options[name][position[name]], options[name][j]
        extra, fewer_macs = there.cost - here.cost, there.macs < here.macs
        if extra <= room - spent + slack and there.macs - here.macs <= macs_room - macs_spent:
            position[name] = j
            spent += extra
            macs_spent += there.macs - here.macs
            if fewer_macs and macs_room < math.inf:  # freed MACs: other upgrades may fit
                for other in range(len(names)):
                    if other != index:
                        push(other)
        push(index)  # look again from the new position, or within the smaller room
    return {name: options[name][position[name]] for name in names}


def within_tolerance(options: Sequence[Option], tolerance: float) -> Option:
    """The cheapest option whose error is at most ``tolerance`` (keeping the conv if none)."""
    for option in options:
        if option.error <= tolerance:
            return option
    return options[-1]


def within_own_budget(options: Sequence[Option], fraction: float) -> Option:
    """The least-error option costing at most ``fraction`` of the original conv.

    Used when there is no example input: without spatial sizes, layers cannot
    share a budget, so each keeps its own fraction.
    """
    limit = fraction * options[-1].cost
    fitting = [o for o in options if o.cost <= limit]
    return min(fitting, key=lambda o: o.error) if fitting else options[0]
