"""Whole torchvision architectures (random weights, built offline) through convert().

Tier 1: at rank="full" every form reproduces the float64 model. Tier 2: at a MAC
budget of one half the model runs, keeps its output shape and costs fewer MACs.
Marked slow: CP at full rank on resnet18 and vgg11 (about 3 minutes each on one
thread, nearly all of it in the weight-error reconstruction of the 4608-wide CP of
their 512-channel convs) and CP under a budget (minutes: ALS error curves).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import FORMS, assert_close, convertible_names, count_macs, layer_macs
from torch import nn

import dwconvert

pytestmark = pytest.mark.usefixtures("single_thread")

MODELS = ("resnet18", "vgg11", "densenet121", "googlenet")
SLOW = {("resnet18", "cp"), ("vgg11", "cp")}
SIZE = 32  # the smallest input all four accept (vgg11 and densenet121 pool 5 times)
# At 32x32 vgg11's classifier holds half the MACs; at 64x64 a budget of 0.5 is reachable.
BUDGET_SIZE = 64


def build(name: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if name == "googlenet":
        model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    else:
        model = getattr(torchvision.models, name)(weights=None)
    model = model.to(dtype).eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        # googlenet's 0.01-std init leaves logits that are all bias: compare the network.
        head.bias.zero_()
    return model


def image(dtype: torch.dtype, size: int = SIZE) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1),
                       dtype=dtype)


def fixed_fraction(model: nn.Module, x: torch.Tensor) -> float:
    """The share of the MACs in layers that are never converted (1x1, depthwise, Linear)."""
    convertible = 0

    def hook(conv, args, output):
        nonlocal convertible
        convertible += layer_macs(conv, output)

    handles = [model.get_submodule(name).register_forward_hook(hook)
               for name in convertible_names(model)]
    total = count_macs(model, x)  # the same forward pass runs the hooks above
    for handle in handles:
        handle.remove()
    return 1 - convertible / total


def _params(forms):
    return [pytest.param(name, form, id=f"{name}-{form}",
                         marks=[pytest.mark.slow] if (name, form) in SLOW else [])
            for name in MODELS for form in forms]


@pytest.mark.parametrize("name, form", _params(FORMS))
def test_full_rank_reproduces_the_model(name, form):
    model, x = build(name, torch.float64), image(torch.float64)
    result = dwconvert.convert(model, form=form, rank="full")
    report = result.dwconvert_report
    assert {r.name for r in report.converted} == convertible_names(model)
    assert report.converted, "every architecture here has 3x3 or larger convs"
    with torch.no_grad():
        expected, out = model(x), result(x)
    assert expected.abs().max() > 0
    assert_close(out, expected, 1e-9, f"{name} converted to {form} at full rank")


HALF_BUDGET_MODELS = ("resnet18", "vgg11", "googlenet")


@pytest.mark.parametrize("form", ["dw-pw", "pw-dw"])
@pytest.mark.parametrize("name", HALF_BUDGET_MODELS)
def test_half_budget_runs_and_saves_macs(name, form):
    model, x = build(name, torch.float32), image(torch.float32, BUDGET_SIZE)
    result = dwconvert.convert(model, form=form, budget=0.5, example_inputs=x)
    with torch.no_grad():
        assert result(x).shape == model(x).shape
    before, after = count_macs(model, x), count_macs(result, x)
    assert after <= 0.5 * before, result.dwconvert_report.summary()
    assert result.dwconvert_report.macs_after == after


@pytest.mark.parametrize("form", ["dw-pw", "pw-dw"])
def test_densenet_half_budget_is_out_of_reach(form):
    # Most of densenet121's MACs are in its 1x1 convs, which are never converted.
    model, x = build("densenet121", torch.float32), image(torch.float32, BUDGET_SIZE)
    fixed = fixed_fraction(model, x)
    assert fixed > 0.5
    with pytest.raises(dwconvert.BudgetError, match="lowest reachable budget"):
        dwconvert.convert(model, form=form, budget=0.5, example_inputs=x)
    result = dwconvert.convert(model, form=form, budget=fixed + 0.15, example_inputs=x)
    assert count_macs(result, x) <= (fixed + 0.15) * count_macs(model, x)


@pytest.mark.slow
def test_half_budget_with_cp_runs_and_saves_macs():
    # 1.5-3 minutes on googlenet; resnet18 took over 12 (ALS error curves of 512-wide convs).
    model, x = build("googlenet", torch.float32), image(torch.float32, BUDGET_SIZE)
    result = dwconvert.convert(model, form="cp", budget=0.5, example_inputs=x, cp_iters=25)
    with torch.no_grad():
        assert result(x).shape == model(x).shape
    assert count_macs(result, x) <= 0.5 * count_macs(model, x)
