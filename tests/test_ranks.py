"""Budget allocation (dwconvert.ranks.allocate) with one budget and with a MACs cap.

Options are written out by hand or drawn at random; every check is arithmetic on
the options themselves.
"""

from __future__ import annotations

import random

import pytest

from dwconvert.ranks import BudgetError, Option, allocate


def option(cost: float, error: float, macs: float) -> Option:
    return Option("dw-pw", 1, cost, error, macs)


def keep(cost: float, macs: float) -> Option:
    return Option(None, None, cost, 0.0, macs)


def test_the_macs_cap_moves_the_choice_to_the_option_with_fewer_macs():
    # Layer a: a fast option with many MACs, or a slower one with few.
    options = {"a": [option(1.0, 0.9, 50.0), option(2.0, 0.5, 90.0), keep(10.0, 100.0)],
               "b": [option(1.0, 0.9, 10.0), option(3.0, 0.2, 30.0), keep(10.0, 100.0)]}
    free = allocate(options, room=5.0)
    assert free["a"].error == 0.5 and free["b"].error == 0.2  # costs 2 + 3 = 5
    capped = allocate(options, room=5.0, macs_room=90.0)
    # 90 + 30 = 120 MACs does not fit; b's upgrade (0.81 - 0.04 for 20 MACs) does.
    assert capped["a"].error == 0.9 and capped["b"].error == 0.2
    assert capped["a"].macs + capped["b"].macs <= 90.0


def test_a_cap_below_the_cheapest_options_is_refused_with_their_macs():
    options = {"a": [option(1.0, 0.9, 50.0), keep(10.0, 100.0)]}
    with pytest.raises(BudgetError, match="MACs cap") as err:
        allocate(options, room=5.0, macs_room=40.0)
    assert err.value.minimum == 50.0


@pytest.mark.parametrize("seed", range(20))
def test_random_allocations_fit_both_rooms_and_no_upgrade_is_left(seed):
    rng = random.Random(seed)
    options = {}
    for layer in range(rng.randint(1, 6)):
        costs = sorted(rng.uniform(0.1, 5.0) for _ in range(rng.randint(1, 5)))
        errors = sorted((rng.uniform(0.05, 1.0) for _ in costs), reverse=True)
        opts = [option(c, e, rng.uniform(1.0, 50.0)) for c, e in zip(costs, errors)]
        options[f"l{layer}"] = opts + [keep(6.0, 60.0)]
    lowest_cost = sum(opts[0].cost for opts in options.values())
    lowest_macs = sum(opts[0].macs for opts in options.values())
    room = lowest_cost + rng.uniform(0, 10)
    macs_room = lowest_macs + rng.uniform(0, 100)
    chosen = allocate(options, room, macs_room)
    cost = sum(o.cost for o in chosen.values())
    macs = sum(o.macs for o in chosen.values())
    assert cost <= room + 1e-9 and macs <= macs_room + 1e-9
    for name, opts in options.items():
        here = chosen[name]
        for other in opts:
            if other.error < here.error:
                fits = (cost - here.cost + other.cost <= room + 1e-9
                        and macs - here.macs + other.macs <= macs_room + 1e-9)
                assert not fits, f"{name}: a better option still fits both rooms"


def test_the_choice_does_not_depend_on_the_unit_of_cost():
    # Seconds are far below 1: the error saved must still be divided by them.
    for scale in (1.0, 1e-3, 1e-9):
        options = {"a": [option(1 * scale, 1.0, 0), keep(2 * scale, 0)],
                   "c": [option(1 * scale, 1.0, 0), keep(2 * scale, 0)],
                   "b": [option(1 * scale, 1.1, 0), keep(3 * scale, 0)]}
        chosen = allocate(options, room=5 * scale)
        # Restoring a and c (2 units, 2.0 error^2 saved) beats restoring b (2 units, 1.21).
        assert chosen["a"].keeps_original and chosen["c"].keeps_original, scale
        assert not chosen["b"].keeps_original, scale


@pytest.mark.parametrize("room, macs_room, cost", [
    (float("nan"), None, 1.0), (5.0, float("nan"), 1.0), (5.0, None, float("nan")),
    (float("inf"), None, float("inf"))])
def test_nan_and_infinite_inputs_are_refused(room, macs_room, cost):
    with pytest.raises(ValueError):
        allocate({"a": [option(cost, 0.5, 1.0), keep(10.0, 2.0)]}, room, macs_room)


def test_a_layer_without_options_is_refused():
    with pytest.raises(ValueError, match="finite costs"):
        allocate({"a": []}, 5.0)
