"""Real architectures: torchvision and timm classifiers with random weights.

For each model, at the smallest square input it accepts: at full rank in float64
the converted model's output equals the original's; at budget 1/2 it runs, the
output shape is unchanged and the MACs (counted here by forward hooks) fell. A
handful of small models run by default; every model of the sweep in
``benchmarks/zoo_sweep.py`` is a slow test (its last full run is recorded in
docs/benchmarks/zoo.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import SUMMARY_LINES, assert_close, count_macs

import dwconvert

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("zoo_sweep", ROOT / "benchmarks" / "zoo_sweep.py")
zoo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo)

SUBSET = ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5",
          "timm:resnet10t", "timm:convnext_atto", "timm:mobilenetv2_050"]
TRIED = {"tried": 0, "exact": 0, "budget": 0}

pytestmark = [pytest.mark.usefixtures("single_thread_module"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    SUMMARY_LINES["zoo"] = (f"zoo models: {TRIED['tried']} tried, {TRIED['exact']} exact at "
                            f"full rank, {TRIED['budget']} fewer MACs at budget 0.5")


def check_model(name: str) -> None:
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    model = zoo.build(name)
    params = sum(p.numel() for p in model.parameters())
    if params > zoo.MAX_PARAMS:
        pytest.skip(f"{params / 1e6:.0f}M parameters: float64 copies too large here")
    TRIED["tried"] += 1
    x = zoo.smallest_input(model)

    # Full rank, float64: the same outputs.
    model64, x64 = model.double(), x.double()
    full = dwconvert.convert(model64, form="dw-pw", rank="full")
    assert full.dwconvert_report.converted, full.dwconvert_report.table()
    with torch.no_grad():
        expected, out = zoo.first_tensor(model64(x64)), zoo.first_tensor(full(x64))
    assert_close(out, expected, zoo.EXACT, f"{name} at full rank")
    TRIED["exact"] += 1

    # Budget 1/2, float32: runs, same output shape, fewer MACs.
    model = model.float()
    try:
        small = dwconvert.convert(model, budget=0.5, example_inputs=x, cp_iters=zoo.CP_ITERS,
                                  cp_size_limit=zoo.CP_SIZE_LIMIT)
    except dwconvert.BudgetError:  # 1x1 and depthwise convs dominate: half of the rest
        small = dwconvert.convert(model, budget=0.5, budget_scope="convertible",
                                  example_inputs=x, cp_iters=zoo.CP_ITERS,
                                  cp_size_limit=zoo.CP_SIZE_LIMIT)
    with torch.no_grad():
        expected, out = zoo.first_tensor(model(x)), zoo.first_tensor(small(x))
    assert out.shape == expected.shape and torch.isfinite(out).all()
    before, after = count_macs(model, x), count_macs(small, x)
    assert after < before, (name, before, after)
    assert small.dwconvert_report.macs_after == after
    TRIED["budget"] += 1


@pytest.mark.parametrize("name", SUBSET)
def test_zoo_subset(name):
    check_model(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in zoo.zoo_models() if n not in SUBSET])
def test_zoo_full(name):
    check_model(name)
