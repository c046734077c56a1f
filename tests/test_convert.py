"""The conversion pass: what it changes, what it leaves alone, what it reports.

MACs are counted here with the tests' own forward hooks (``conftest.count_macs``)
and the closed-form formulas of docs/forms.md, never with dwconvert's counters.
The named conversion cases (C05 skips, C11 nested names and zero-conversion
reports, C12 untraceable models) are in test_cases.py.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from conftest import (
    FORMS,
    assert_close,
    closed_form_macs,
    closed_form_params,
    convertible_names,
    count_macs,
    exact_rank,
    original_macs,
    reconstruct_kernel,
    relative_frobenius,
)
from torch import nn

import dwconvert
from dwconvert import BudgetError, FactorizedConv2d

pytestmark = pytest.mark.usefixtures("single_thread")
form_param = pytest.mark.parametrize("form", FORMS)

CONVERTIBLE = {"features.0", "features.3", "features.7"}
UNTOUCHED_PREFIXES = ("features.1.", "features.5.", "features.6.", "classifier.")


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 1),  # pointwise: skipped
            nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise: skipped
            nn.Conv2d(32, 32, 3, padding=1, groups=4),  # grouped: converted
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def small_net(dtype=torch.float64) -> SmallNet:
    torch.manual_seed(0)
    model = SmallNet().to(dtype)
    bn = model.features[1]
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def net_input(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1),
                       dtype=dtype)


def conv_pixels(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, int]]:
    """``(Hin*Win, Hout*Wout)`` of every conv's call, by own hooks."""
    pixels, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def hook(mod, args, out, name=name):
                pixels[name] = (args[0].shape[-2] * args[0].shape[-1],
                                out.shape[-2] * out.shape[-1])
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return pixels


def lowest_reachable_budget(model: nn.Module, form: str, x: torch.Tensor) -> float:
    """Fixed MACs plus each convertible conv at its cheapest, over the model's MACs."""
    total, pixels = count_macs(model, x), conv_pixels(model, x)
    lowest = total
    for name in convertible_names(model):
        conv, (hw_in, hw_out) = model.get_submodule(name), pixels[name]
        original = original_macs(conv, hw_out)
        lowest += min(closed_form_macs(form, conv, 1, hw_in, hw_out), original) - original
    return lowest / total


def records(report) -> dict:
    return {r.name: r for r in report.layers}


def names_value(value, message: str) -> bool:
    """Whether ``repr(value)`` stands in ``message`` as a token of its own."""
    return re.search(rf"(?<![\w.(]){re.escape(repr(value))}(?![\w.\]])", message) is not None


# Copy or in place


@form_param
def test_original_model_is_untouched(form):
    model = small_net()
    state = copy.deepcopy(model.state_dict())
    modules = [(name, id(m)) for name, m in model.named_modules()]
    result = dwconvert.convert(model, form=form, rank=2, cp_iters=5)
    assert result is not model
    assert [(name, id(m)) for name, m in model.named_modules()] == modules
    assert model.state_dict().keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not hasattr(model, "dwconvert_report")


def test_inplace_converts_the_model_itself():
    model = small_net()
    result = dwconvert.convert(model, form="dw-pw", rank=2, inplace=True)
    assert result is model
    assert isinstance(model.features[0], FactorizedConv2d)
    assert model.dwconvert_report is result.dwconvert_report


def test_inplace_report_counts_parameters_before_conversion():
    model = small_net()
    before = sum(p.numel() for p in model.parameters())
    report = dwconvert.convert(model, form="dw-pw", rank=1, inplace=True).dwconvert_report
    after = sum(p.numel() for p in model.parameters())
    assert after != before
    assert (report.params_before, report.params_after) == (before, after)


@form_param
def test_result_keeps_class_and_untouched_state(form):
    model = small_net()
    result = dwconvert.convert(model, form=form, rank=1, cp_iters=5)
    assert {r.name for r in result.dwconvert_report.converted} == CONVERTIBLE
    assert type(result) is SmallNet
    original, new = model.state_dict(), result.state_dict()
    untouched = [k for k in original if k.startswith(UNTOUCHED_PREFIXES)]
    assert len(untouched) == 11  # BatchNorm 5, pointwise 2, depthwise 2, Linear 2
    for key in untouched:
        assert torch.equal(new[key], original[key]), key
    replaced = set(new) - set(untouched)
    assert replaced and all(k.split(".conv")[0] in CONVERTIBLE for k in replaced), replaced
    assert isinstance(result.features[1], nn.BatchNorm2d)
    assert isinstance(result.classifier, nn.Linear)


# Ranks


@form_param
def test_full_rank_converts_every_convertible_conv_exactly(form):
    model, x = small_net(), net_input()
    result = dwconvert.convert(model, form=form, rank="full")
    converted = {r.name for r in result.dwconvert_report.converted}
    assert converted == convertible_names(model) == CONVERTIBLE
    for name in converted:
        assert isinstance(result.get_submodule(name), FactorizedConv2d), name
    with torch.no_grad():
        assert_close(result(x), model(x), 1e-10, f"{form} at rank='full'")


@form_param
def test_fixed_rank_records_match_formulas(form):
    model, x = small_net(), net_input()
    result = dwconvert.convert(model, form=form, rank=2, example_inputs=x, cp_iters=20)
    report, pixels = result.dwconvert_report, conv_pixels(model, x)
    assert report.macs_before == count_macs(model, x)
    assert report.macs_after == count_macs(result, x)
    assert report.params_after == sum(p.numel() for p in result.parameters())
    for name in CONVERTIBLE:
        record, conv = records(report)[name], model.get_submodule(name)
        hw_in, hw_out = pixels[name]
        macs = closed_form_macs(form, conv, 2, hw_in, hw_out)
        assert record.macs_before == original_macs(conv, hw_out)
        if macs >= record.macs_before:  # e.g. pw-dw on the strided conv: no saving
            assert record.status == "skipped", record
            continue
        assert record.status == "converted" and record.rank == 2, record
        assert record.macs_after == macs
        assert record.params_after == closed_form_params(form, conv, 2)
        layers = result.get_submodule(name).layers()
        kernel = reconstruct_kernel(form, [m.weight for m in layers], conv.groups, 2)
        assert record.weight_error == pytest.approx(relative_frobenius(conv.weight, kernel))


@form_param
def test_rank_above_full_rank_is_reported_as_requested(form):
    model = nn.Sequential(nn.Conv2d(16, 16, 3))
    result = dwconvert.convert(model, form=form, rank=500, cp_iters=5)
    (record,) = result.dwconvert_report.layers
    assert record.requested_rank == 500, record


@form_param
def test_fixed_rank_that_saves_nothing_says_so(form):
    # Full rank costs more MACs than the conv in every form, so the conv is kept.
    model = nn.Sequential(nn.Conv2d(16, 16, 3))
    result = dwconvert.convert(model, form=form, rank=500, cp_iters=5)
    (record,) = result.dwconvert_report.layers
    assert record.status == "skipped"
    assert "budget" not in record.reason, f"no budget was given: {record.reason!r}"


# Budgets


@pytest.mark.parametrize("budget", [0.6, 0.8])
@form_param
def test_budget_is_met(form, budget):
    model, x = small_net(torch.float32), net_input(torch.float32)
    result = dwconvert.convert(model, form=form, budget=budget, example_inputs=x, cp_iters=20)
    ratio = count_macs(result, x) / count_macs(model, x)
    assert budget - 0.1 < ratio <= budget, result.dwconvert_report.table()
    assert result.dwconvert_report.mac_ratio == pytest.approx(ratio)
    assert result(x).shape == model(x).shape


@form_param
def test_budget_below_reachable_raises_naming_the_lowest(form):
    model, x = small_net(torch.float32), net_input(torch.float32)
    lowest = lowest_reachable_budget(model, form, x)
    with pytest.raises(BudgetError) as info:
        dwconvert.convert(model, form=form, budget=lowest * 0.9, example_inputs=x, cp_iters=5)
    named = re.search(r"lowest reachable budget is ([0-9.]+)", str(info.value))
    assert named, str(info.value)
    assert float(named.group(1)) == pytest.approx(lowest, abs=1e-4)
    result = dwconvert.convert(model, form=form, budget=lowest + 0.01, example_inputs=x,
                               cp_iters=5)
    assert count_macs(result, x) / count_macs(model, x) <= lowest + 0.01


@pytest.mark.parametrize("form", ["dw-pw", "pw-dw"])
def test_budget_without_example_inputs_applies_to_each_conv(form):
    # Per output pixel: a stride-s conv's pointwise-first layer reads s*s input pixels.
    model = small_net()
    report = dwconvert.convert(model, form=form, budget=0.5).dwconvert_report
    assert report.macs_before is None
    for name in CONVERTIBLE:
        record, conv = records(report)[name], model.get_submodule(name)
        hw_in = conv.stride[0] * conv.stride[1]
        costs = [closed_form_macs(form, conv, r, hw_in, 1)
                 for r in range(1, exact_rank(form, conv) + 1)]
        fitting = [r for r, c in enumerate(costs, 1) if c <= 0.5 * record.macs_before]
        assert record.status == "converted", record
        # The highest rank within the layer's budget, or rank 1 where none fits.
        assert record.rank == max(fitting, default=1), (record, costs)


# Bad input


@pytest.mark.parametrize("kwargs, value", [
    (dict(form="dw-pw", budget=0), 0),
    (dict(form="dw-pw", budget=1.5), 1.5),
    (dict(form="dw-pw", budget=math.nan), math.nan),
    (dict(form="dw-pw", budget=-0.25), -0.25),
    (dict(form="dw-pw", budget="0.5"), "0.5"),
    (dict(form="dw-pw", rank=0), 0),
    (dict(form="dw-pw", rank=-2), -2),
    (dict(form="dw-pw", rank=2.5), 2.5),
    (dict(form="dw-pw", rank="half"), "half"),
    (dict(form="svd", rank=2), "svd"),
], ids=["budget-0", "budget-1.5", "budget-nan", "budget-negative", "budget-str", "rank-0",
        "rank-negative", "rank-float", "rank-str", "form-unknown"])
def test_invalid_arguments_raise_naming_the_value(kwargs, value):
    with pytest.raises(ValueError) as info:
        dwconvert.convert(small_net(), **kwargs)
    assert names_value(value, str(info.value)), str(info.value)


def test_rank_and_budget_together_raise():
    with pytest.raises(ValueError, match="budget"):
        dwconvert.convert(small_net(), form="dw-pw", rank=2, budget=0.5)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_weights_raise_naming_the_layer(bad):
    model = small_net()
    with torch.no_grad():
        model.features[3].weight[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"features\.3\b"):
        dwconvert.convert(model, form="dw-pw", rank=2)


def test_bare_conv_raises_with_the_per_layer_way():
    with pytest.raises(ValueError, match="from_conv"):
        dwconvert.convert(nn.Conv2d(4, 4, 3), form="dw-pw", rank=2)


# Sharing, exclusion, odd modules


class SharedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.alias = self.block  # the same module under a second name

    def forward(self, x):
        return self.alias(torch.relu(self.block(self.stem(x))))


@form_param
def test_shared_conv_is_converted_once_and_stays_shared(form):
    torch.manual_seed(0)
    model, x = SharedConvNet().double().eval(), net_input()
    result = dwconvert.convert(model, form=form, rank="full", example_inputs=x)
    report = result.dwconvert_report
    assert len(report.layers) == 2 and len(report.converted) == 2
    assert result.block is result.alias and isinstance(result.block, FactorizedConv2d)
    (shared,) = [r for r in report.layers if r.name in ("block", "alias")]
    assert shared.macs_before == 2 * original_macs(model.block, 32 * 32), "two calls"
    assert report.macs_before == count_macs(model, x)
    with torch.no_grad():
        assert_close(result(x), model(x), 1e-10, f"shared conv, {form}")


@pytest.mark.parametrize("exclude, kept", [
    (["features.0"], {"features.0"}),
    (["features.*"], CONVERTIBLE),
    (["*.7", "features.0"], {"features.0", "features.7"}),
    (["classifier", "features.1"], set()),
], ids=["exact-name", "glob-all", "two-patterns", "no-conv-matches"])
def test_exclude_patterns_keep_those_convs(exclude, kept):
    model = small_net()
    result = dwconvert.convert(model, form="dw-pw", rank=2, exclude=exclude)
    by_name = records(result.dwconvert_report)
    assert {r.name for r in result.dwconvert_report.converted} == CONVERTIBLE - kept
    for name in kept:
        assert "exclude" in by_name[name].reason, by_name[name]
        conv = result.get_submodule(name)
        assert type(conv) is nn.Conv2d
        assert torch.equal(conv.weight, model.get_submodule(name).weight)


class MyConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (weight standardisation, as in some zoos)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class PlainSubclassConv(nn.Conv2d):
    """A Conv2d subclass that only renames the class: it computes what a Conv2d does."""


def test_conv2d_subclass_without_own_forward_is_converted_exactly():
    model = nn.Sequential(PlainSubclassConv(4, 8, 3), nn.ReLU()).double()
    x = torch.randn(1, 4, 12, 12, dtype=torch.float64)
    converted = dwconvert.convert(model, form="dw-pw", rank="full", example_inputs=x)
    assert records(converted.dwconvert_report)["0"].status == "converted"
    assert torch.allclose(converted(x), model(x), atol=1e-12)


def test_conv2d_subclass_is_skipped_with_its_own_reason():
    model = nn.Sequential(MyConv(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    x = torch.randn(1, 4, 12, 12)
    report = dwconvert.convert(model, form="dw-pw", rank=2, example_inputs=x).dwconvert_report
    record = records(report)["0"]
    assert record.status == "skipped"
    assert "subclass" in record.reason, record
    assert record.macs_before == original_macs(model[0], 10 * 10), "the subclass conv runs"


class UnusedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Conv2d(4, 8, 3)
        self.spare = nn.Conv2d(4, 8, 3)

    def forward(self, x):
        return self.used(x)


def test_conv_never_called_is_reported_and_kept():
    model = UnusedConvNet()
    result = dwconvert.convert(model, form="dw-pw", rank=2)
    by_name = records(result.dwconvert_report)
    assert by_name["used"].status == "converted"
    assert by_name["spare"].status == "skipped" and "never called" in by_name["spare"].reason
    assert type(result.spare) is nn.Conv2d


def _two_random_convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1)).eval()


def test_data_free_conversion_warns_of_convs_that_lost_most_of_their_kernel():
    model, x = _two_random_convs(), torch.randn(1, 8, 10, 10)
    # A random 3x3 kernel at rank 1 of dw-pw keeps a small part of it.
    lossy = dwconvert.convert(model, form="dw-pw", rank=1, example_inputs=x)
    report = lossy.dwconvert_report
    errors = {r.name: r.weight_error for r in report.layers if r.weight_error is not None}
    high = [name for name, error in errors.items() if error > 0.75]
    assert high, errors  # the setting has to be lossy for the test to mean anything
    warnings = [n for n in report.notes if "relative weight error above 0.75" in n]
    worst = max(high, key=errors.get)
    assert len(warnings) == 1 and f"{worst}: {errors[worst]:.3f}" in warnings[0]
    assert warnings[0].startswith(f"warning: {len(high)} converted conv")

    exact = dwconvert.convert(model, form="dw-pw", rank="full", example_inputs=x)
    assert not any("weight error above" in n for n in exact.dwconvert_report.notes)
    # With calibration data the output is refitted, and the kernel error says less.
    calibrated = dwconvert.convert(model, form="dw-pw", rank=1, example_inputs=x,
                                   calibration=[torch.randn(4, 8, 10, 10)])
    assert not any("weight error above" in n for n in calibrated.dwconvert_report.notes)
