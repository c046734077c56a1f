"""Named conversion cases C01-C13: small inputs that other converters got wrong.

Each test names its case: C01 strides and asymmetric padding, C02 dilation, C03
string padding, C04 non-square kernels and rank bounds, C05 depthwise convs left
alone, C06 grouped convs, C07 conv + BatchNorm, C08 half precision, C09 padding
modes, C10 channels_last, C11 nested names, C12 untraceable models, C13 ONNX
export checked in onnxruntime. All go through ``convert()``.

Exactness of the single-conv cases at full rank (C01-C04, C06, C09, C10) is tested
layer by layer in test_layers.py under the same ids (``test_full_rank_is_exact[C01-...]``);
here each case checks what the case says a correct converter does beyond that.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import (
    CHANNELS_LAST,
    FORMS,
    assert_close,
    case_id,
    cases,
    exact_rank,
    memory_format,
)
from torch import nn

import dwconvert
from dwconvert import FactorizedConv2d

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
]
form_param = pytest.mark.parametrize("form", FORMS)


def convert_conv(conv: nn.Conv2d, form: str, rank="full", **options):
    """Convert a one-conv model; returns the model and its new module."""
    result = dwconvert.convert(nn.Sequential(conv), form=form, rank=rank, cp_iters=10,
                               **options)
    module = result[0]
    assert isinstance(module, FactorizedConv2d), result.dwconvert_report.table()
    return result, module


def check_spatial_factor(conv: nn.Conv2d, module: FactorizedConv2d) -> None:
    """Stride, padding, dilation and padding mode on the kxk layer only; bias on the last."""
    layers = module.layers()
    spatial = [layer for layer in layers if layer.kernel_size != (1, 1)]
    assert len(spatial) == 1, layers
    (kxk,) = spatial
    assert kxk.kernel_size == conv.kernel_size
    assert (kxk.stride, kxk.padding, kxk.dilation, kxk.padding_mode) == (
        conv.stride, conv.padding, conv.dilation, conv.padding_mode)
    for layer in layers:
        if layer is not kxk:
            assert (layer.stride, layer.padding, layer.dilation, layer.padding_mode) == (
                (1, 1), (0, 0), (1, 1), "zeros"), layer
    assert all(layer.bias is None for layer in layers[:-1])
    assert (layers[-1].bias is None) == (conv.bias is None)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@form_param
@pytest.mark.parametrize("case", cases("C01-alexnet-stem", "C01-stride2x1-pad1x2",
                                       "C01-no-bias"), ids=case_id)
def test_c01_stride_and_padding_only_on_the_spatial_factor(case, form):
    conv = case.build()
    result, module = convert_conv(conv, form)
    check_spatial_factor(conv, module)
    assert tuple(run(result, case.input()).shape) == case.out_shape


@form_param
def test_c02_dilation_only_on_the_spatial_factor(form):
    (case,) = cases("C02-dilation2")
    conv = case.build()
    result, module = convert_conv(conv, form, rank=2)
    check_spatial_factor(conv, module)
    assert tuple(run(result, case.input()).shape) == (1, 64, 32, 32)


@form_param
@pytest.mark.parametrize("case", cases("C03-same-odd", "C03-same-even",
                                       "C03-same-even-dilated-reflect", "C03-valid"),
                         ids=case_id)
def test_c03_string_padding_kept_on_the_spatial_factor(case, form):
    conv = case.build()
    result, module = convert_conv(conv, form, rank=2)
    check_spatial_factor(conv, module)
    assert tuple(run(result, case.input()).shape) == case.out_shape


@form_param
def test_c03_strided_conv_with_explicit_asymmetric_padding_is_exact(form):
    # TF-style 'same' on a strided conv: pad right/bottom by one, then a valid conv.
    torch.manual_seed(0)
    model = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(16, 24, 3, stride=2))
    model = model.double().eval()
    x = torch.randn(1, 16, 12, 12, dtype=torch.float64)
    result = dwconvert.convert(model, form=form, rank="full")
    assert isinstance(result[0], nn.ZeroPad2d) and isinstance(result[1], FactorizedConv2d)
    out = run(result, x)
    assert out.shape == (1, 24, 6, 6)
    assert_close(out, run(model, x), 1e-10, f"padded strided conv, {form}")


@form_param
@pytest.mark.parametrize("case", cases("C04-256-to-32", "C04-32-to-256", "C04-kernel-7x1",
                                       "C04-kernel-1x7", "C04-4-to-32"), ids=case_id)
def test_c04_rank_bounds_are_the_min_of_both_sides(case, form):
    conv = case.build()
    result, _ = convert_conv(conv, form)
    (record,) = result.dwconvert_report.layers
    assert record.full_rank == record.rank == exact_rank(form, conv), record


@pytest.mark.parametrize("conv, word", [
    (nn.Conv2d(8, 64, 3, groups=8), "depthwise"),
    (nn.Conv2d(32, 32, 3, groups=32), "depthwise"),
    (nn.Conv2d(16, 32, 1), "1x1"),
], ids=["depthwise-multiplier-8", "depthwise-multiplier-1", "pointwise"])
def test_c05_depthwise_and_pointwise_convs_are_skipped_with_the_reason(conv, word):
    model = nn.Sequential(conv)
    result = dwconvert.convert(model, form="cp", rank=4)
    (record,) = result.dwconvert_report.layers
    assert record.status == "skipped" and word in record.reason, record
    assert type(result[0]) is nn.Conv2d
    assert torch.equal(result[0].weight, conv.weight)


@form_param
def test_c05_converting_twice_decomposes_nothing_again(form):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, groups=4)).eval()
    once = dwconvert.convert(model, form=form, rank=2, cp_iters=10)
    twice = dwconvert.convert(once, form=form, rank=2)
    report = twice.dwconvert_report
    assert len(report.layers) == sum(len(m.layers()) for m in (once[0], once[2]))
    assert not report.converted, report.table()
    assert all(r.reason for r in report.layers), report.table()
    x = torch.randn(1, 8, 10, 10)
    assert torch.equal(run(twice, x), run(once, x))


@form_param
@pytest.mark.parametrize("case", cases("C06-groups2", "C06-resnext-groups32"), ids=case_id)
def test_c06_groups_never_mix(case, form):
    conv = case.build()
    result, module = convert_conv(conv, form, rank=1)
    for layer in module.layers():
        if layer.kernel_size == (1, 1):
            assert layer.groups == conv.groups, "the 1x1 layers keep the groups"
    x = case.input()
    mg, ng = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    poked = x.clone()
    poked[:, :mg] += 1.0  # change only the first group's input channels
    diff = (run(result, poked) - run(result, x)).abs().amax(dim=(0, 2, 3))
    assert diff[:ng].min() > 1e-6, "the first group's outputs see their inputs"
    assert diff[ng:].max() < 1e-12, f"other groups changed by {diff[ng:].max():.3g}"


def conv_bn(conv: nn.Conv2d) -> nn.Sequential:
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(conv.out_channels)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.25, 4)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return nn.Sequential(conv, bn, nn.ReLU()).double().eval()


@form_param
@pytest.mark.parametrize("conv", [
    nn.Conv2d(8, 16, 3, padding=1, bias=False),
    nn.Conv2d(8, 16, 3, padding=1, bias=True),
    nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False),
], ids=["bias-false", "bias-true", "grouped"])
def test_c07_conv_then_batchnorm_exact_with_batchnorm_kept(conv, form):
    # Without fold_bn, BN stays a module after the converted conv (folding: test_fold.py).
    model = conv_bn(conv)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    result = dwconvert.convert(model, form=form, rank="full")
    assert isinstance(result[0], FactorizedConv2d)
    assert isinstance(result[1], nn.BatchNorm2d)
    for key, value in model[1].state_dict().items():
        assert torch.equal(result[1].state_dict()[key], value), key
    assert_close(run(result, x), run(model, x), 1e-10, f"conv + BN, {form}")


def three_conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=4),
    ).eval()


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)],
                         ids=["float16", "bfloat16"])
@form_param
def test_c08_low_precision_model_converts_in_its_dtype(form, dtype, tol):
    model = three_conv_net().to(dtype)
    x = torch.randn(1, 3, 16, 16).to(dtype)
    result = dwconvert.convert(model, form=form, rank="full")
    assert len(result.dwconvert_report.converted) == 3
    for name, p in result.named_parameters():
        assert p.dtype == dtype, name
    out = run(result, x)
    assert out.dtype == dtype
    reference = run(three_conv_net().double(), x.double())
    assert_close(out, reference, tol, f"{form} in {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_c08_low_precision_model_converts_under_a_budget(dtype):
    model = three_conv_net().to(dtype)
    x = torch.randn(1, 3, 16, 16).to(dtype)
    result = dwconvert.convert(model, form="cp", budget=0.5, example_inputs=x, cp_iters=20)
    out = run(result, x)
    assert out.dtype == dtype and out.shape == run(model, x).shape
    assert all(p.dtype == dtype for p in result.parameters())
    assert result.dwconvert_report.mac_ratio <= 0.5


@form_param
@pytest.mark.parametrize("case", cases("C09-reflect", "C09-replicate"), ids=case_id)
def test_c09_padding_mode_on_the_spatial_factor_borders_exact(case, form):
    conv = case.build()
    result, module = convert_conv(conv, form)
    check_spatial_factor(conv, module)
    x = case.input()
    expected, out = run(nn.Sequential(conv), x), run(result, x)
    zero_padded = nn.functional.conv2d(x, conv.weight, conv.bias, padding=3)
    border = (slice(None), slice(None), slice(0, 3))  # the top 3 rows see the padding
    # The border rows depend on the padding mode, so matching them is a real check.
    assert (zero_padded[border] - expected[border]).abs().max() > 1e-3
    assert_close(out[border], expected[border], 1e-10, f"{case.id} border rows, {form}")


def one_channel_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1)).eval()


@pytest.mark.parametrize("input_format", ["channels_last", "contiguous"])
@form_param
def test_c10_channels_last_model_keeps_output_format(form, input_format):
    model = one_channel_net().to(memory_format=CHANNELS_LAST)
    x = torch.randn(2, 1, 12, 12)
    if input_format == "channels_last":
        x = x.to(memory_format=CHANNELS_LAST)
    result = dwconvert.convert(model, form=form, rank="full")
    expected, out = run(model, x), run(result, x)
    assert memory_format(out) == memory_format(expected), (out.stride(), expected.stride())
    assert_close(out, expected, 1e-5, f"channels_last {form}")


class FlattenByView(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = one_channel_net()

    def forward(self, x):
        y = self.body(x)
        return y.view(y.size(0), -1)  # fails on a tensor that is not contiguous


@form_param
def test_c10_contiguous_model_output_still_views(form):
    model = FlattenByView().eval()
    x = torch.randn(2, 1, 12, 12)
    result = dwconvert.convert(model, form=form, rank="full")
    assert_close(run(result, x), run(model, x), 1e-5, f"view after {form}")


class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn1(self.conv1(x))))


class NestedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(Block(16), Block(16))

    def forward(self, x):
        return self.layer1(self.features(x))


NESTED = {"features.0", "features.3", "layer1.0.conv1", "layer1.0.conv2",
          "layer1.1.conv1", "layer1.1.conv2"}


def test_c11_nested_convs_found_by_type_and_counted():
    model = NestedNet().eval()
    report = dwconvert.convert(model, form="dw-pw", rank=1).dwconvert_report
    assert {r.name for r in report.layers} == NESTED
    assert {r.name for r in report.converted} == NESTED
    assert "converted 6 of 6 convs" in report.summary()
    table = report.table()
    assert all(name in table for name in NESTED), table


def test_c11_zero_conversions_say_why(caplog):
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, groups=8))
    with caplog.at_level(logging.WARNING, logger="dwconvert"):
        report = dwconvert.convert(model, form="dw-pw", rank=2).dwconvert_report
    assert not report.converted and len(report.layers) == 2
    summary = report.summary()
    assert "converted 0 of 2 convs" in summary
    assert "no conv was converted" in summary
    assert any("no conv" in r.getMessage() for r in caplog.records), caplog.text
    for record in report.layers:  # the summary itself says why, not only the table
        assert record.reason and record.reason in summary, (record.reason, summary)


class BranchOnValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 5, padding=2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return self.conv2(self.conv1(x))
        return self.conv3(self.conv1(x))


@form_param
def test_c12_untraceable_model_falls_back_and_converts(form):
    torch.manual_seed(0)
    model = BranchOnValue().double().eval()
    result = dwconvert.convert(model, form=form, rank="full")
    report = result.dwconvert_report
    assert report.traced is False
    assert {r.name for r in report.converted} == {"conv1", "conv2", "conv3"}
    assert "not traceable" in report.summary()
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64).abs()
    for sign in (1, -1):  # both branches
        assert_close(run(result, sign * x), run(model, sign * x), 1e-10, f"branch {sign}")


def test_c12_timm_regnety_features_only_converts():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("regnety_002", pretrained=False, features_only=True)
    model = model.double().eval()
    result = dwconvert.convert(model, form="dw-pw", rank="full")
    assert result.dwconvert_report.converted
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    for out, expected in zip(run(result, x), run(model, x), strict=True):
        assert_close(out, expected, 1e-9, "regnety_002 feature map")


def onnx_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


@pytest.mark.filterwarnings("ignore:Constant folding", "ignore::DeprecationWarning")
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@form_param
def test_c13_onnx_export_matches_onnxruntime(form, exporter, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    x = torch.randn(1, 3, 16, 16)
    result = dwconvert.convert(onnx_net(), form=form, budget=0.5, example_inputs=x, cp_iters=20)
    assert result.dwconvert_report.converted
    path = tmp_path / "converted.onnx"
    torch.onnx.export(result, (x,), str(path), dynamo=exporter == "dynamo")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_close(torch.from_numpy(out), run(result, x), 1e-4, f"onnxruntime, {form}")
