"""The factorized modules against float64 references built with torch.nn.functional.

Tier 1: at full rank every form reproduces the conv (stride, padding, padding mode,
dilation, groups, borders included). Tier 2: at truncated ranks the modules cost
the MACs and parameters of the formulas in docs/forms.md and compute exactly the
low-rank kernel they stand for.
"""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
import torch
from conftest import (
    CHANNELS_LAST,
    CONV_CASES,
    FORMS,
    SVD_FORMS,
    ConvCase,
    assert_close,
    case_id,
    cases,
    closed_form_macs,
    closed_form_params,
    exact_rank,
    memory_format,
    original_macs,
    reconstruct_kernel,
    reference_conv,
)
from torch import nn

from dwconvert import CPConv2d, DwPwConv2d, PwDwConv2d
from dwconvert.costs import form_macs, form_params, measure
from dwconvert.factorize import KernelShape, full_rank
from dwconvert.layers import build_empty

MODULES = {"dw-pw": DwPwConv2d, "pw-dw": PwDwConv2d, "cp": CPConv2d}
EXACT = 1e-10  # float64, relative to the output's max
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
]
form_param = pytest.mark.parametrize("form", FORMS)


def _full_module(case: ConvCase, form: str, **build):
    conv = case.build(**build)
    rank = full_rank(form, KernelShape.of(conv.weight, conv.groups))
    return conv, MODULES[form].from_conv(conv, rank)


def _frobenius_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


# Tier 1: full rank is exact


@form_param
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_full_rank_is_exact(case, form):
    conv, module = _full_module(case, form)
    x = case.input()
    ref = reference_conv(conv, x)
    # The reference is checked against nn.Conv2d first, so a wrong reference cannot pass.
    assert_close(conv(x), ref, 1e-12, "nn.Conv2d against the F.pad + F.conv2d reference")
    if case.out_shape is not None:
        assert tuple(ref.shape) == case.out_shape
    with torch.no_grad():
        out = module(x)
    assert_close(out, ref, EXACT, f"{form} at full rank {module.rank}")


@form_param
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_full_rank_is_min_of_both_sides(case, form):
    conv = case.build()
    expected = exact_rank(form, conv)
    assert full_rank(form, KernelShape.of(conv.weight, conv.groups)) == expected
    assert MODULES[form].from_conv(conv, 10**6, cp_iters=1).rank == expected, "clamped"


@pytest.mark.parametrize("form", SVD_FORMS)
@pytest.mark.parametrize("case", cases("C04-256-to-32", "C04-32-to-256", "C04-4-to-32",
                                       "C04-kernel-7x1", "C06-groups2"), ids=case_id)
def test_svd_full_rank_is_tight(case, form):
    # A random kernel has full-rank channel matrices: one rank less is not exact.
    conv = case.build()
    x = case.input()
    rank = exact_rank(form, conv) - 1
    with torch.no_grad():
        out = MODULES[form].from_conv(conv, rank)(x)
    assert _frobenius_error(out, reference_conv(conv, x)) > 1e-3


# Tier 2: truncated ranks


@form_param
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_truncated_macs_and_params_match_formula(case, form):
    conv = case.build()
    x = case.input()
    rank = min(2, exact_rank(form, conv))
    module = MODULES[form].from_conv(conv, rank, cp_iters=5)
    assert module.rank == rank
    with torch.no_grad():
        out, original = module(x), conv(x)
    assert out.shape == original.shape
    hw_in, hw_out = x.shape[-2] * x.shape[-1], out.shape[-2] * out.shape[-1]
    expected = closed_form_macs(form, conv, rank, hw_in, hw_out)
    assert measure(nn.Sequential(module), (x,)).macs == expected
    original = measure(nn.Sequential(conv), (x,))
    assert original.macs == original_macs(conv, hw_out)
    shape = KernelShape.of(conv.weight, conv.groups)
    assert form_macs(form, shape, rank, original.geometries["0"]) == expected
    params = closed_form_params(form, conv, rank)
    assert sum(p.numel() for p in module.parameters()) == params
    assert form_params(form, shape, rank, conv.bias is not None) == params


@form_param
@pytest.mark.parametrize("case", cases("C01-stride2x1-pad1x2", "C03-same-even-dilated-reflect",
                                       "C06-resnext-groups32", "C06-groups2", "C09-circular-pad1x2",
                                       "strided-dilated-grouped-reflect"), ids=case_id)
def test_truncated_module_computes_its_low_rank_kernel(case, form):
    conv = case.build()
    x = case.input()
    rank = 2
    module = MODULES[form].from_conv(conv, rank, cp_iters=10)
    kernel = reconstruct_kernel(form, [layer.weight for layer in module.layers()],
                                conv.groups, rank)
    assert kernel.shape == conv.weight.shape
    with torch.no_grad():
        out = module(x)
    assert_close(out, reference_conv(conv, x, weight=kernel), EXACT, f"{form} at rank {rank}")


@pytest.mark.parametrize("form", SVD_FORMS)
@pytest.mark.parametrize("case", cases("C01-stride2x1-pad1x2", "C03-same-even",
                                       "C04-kernel-7x1", "C04-4-to-32", "C06-resnext-groups32",
                                       "C09-reflect"), ids=case_id)
def test_output_error_shrinks_as_rank_grows(case, form):
    conv = case.build()
    x = case.input(batch=4)
    ref = reference_conv(conv, x)
    with torch.no_grad():
        errors = [_frobenius_error(MODULES[form].from_conv(conv, r)(x), ref)
                  for r in range(1, exact_rank(form, conv) + 1)]
    assert all(b <= a for a, b in pairwise(errors)), errors
    assert errors[-1] < EXACT, errors


# Dtype, device and memory format


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)],
                         ids=["float16", "bfloat16"])
@form_param
def test_low_precision_keeps_dtype_and_device(form, dtype, tol, device):
    case = cases("C01-stride2x1-pad1x2")[0]
    conv = case.build(dtype=torch.float32).to(device=device, dtype=dtype)
    rank = exact_rank(form, conv)
    module = MODULES[form].from_conv(conv, rank)
    for name, p in module.named_parameters():
        assert (p.dtype, p.device) == (dtype, conv.weight.device), name
    x = case.input(dtype=torch.float32).to(device=device, dtype=dtype)
    with torch.no_grad():
        out = module(x)
    assert (out.dtype, out.device) == (dtype, x.device)
    assert_close(out, reference_conv(conv, x), tol, f"{form} in {dtype}")


@pytest.mark.parametrize("input_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("weight_format", ["contiguous", "channels_last"])
@form_param
@pytest.mark.parametrize("case", cases("C10-one-input-channel", "C01-no-bias", "C06-groups2"),
                         ids=case_id)
def test_memory_format_follows_the_original(case, form, weight_format, input_format):
    fmt = {"contiguous": torch.contiguous_format, "channels_last": CHANNELS_LAST}
    conv = case.build(dtype=torch.float32).to(memory_format=fmt[weight_format])
    module = MODULES[form].from_conv(conv, exact_rank(form, conv))
    for layer in module.layers():
        assert layer.weight.is_contiguous(memory_format=fmt[weight_format]), layer
    x = case.input(dtype=torch.float32).to(memory_format=fmt[input_format])
    with torch.no_grad():
        expected, out = conv(x), module(x)
    assert memory_format(out) == memory_format(expected), (
        f"output strides {out.stride()}, the original conv gave {expected.stride()}"
    )
    assert_close(out, expected, 1e-5, f"{form}, {weight_format} weights")


# Rebuilding from spec()


@form_param
@pytest.mark.parametrize("case", cases("C01-stride2x1-pad1x2", "C03-same-even",
                                       "C09-reflect", "C06-resnext-groups32", "C01-no-bias"),
                         ids=case_id)
def test_spec_round_trip_reproduces_outputs(case, form):
    conv = case.build()
    module = MODULES[form].from_conv(conv, 2, cp_iters=5)
    spec = json.loads(json.dumps(module.spec()))  # what a checkpoint would store
    rebuilt = build_empty(spec, dtype=torch.float64)
    assert type(rebuilt) is type(module)
    rebuilt.load_state_dict(module.state_dict())  # strict: same keys and shapes
    x = case.input()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), module(x))


@form_param
def test_channels_last_output_when_a_layer_cannot_tell_formats(form):
    # (1, 2, 1, 2): the last layer's weight and input have strides that fit both formats,
    # so only the module itself knows that the original conv returns channels_last.
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 1, bias=False).to(memory_format=CHANNELS_LAST)
    x = torch.randn(1, 2, 1, 2).to(memory_format=CHANNELS_LAST)
    module = MODULES[form].from_conv(conv, 1, cp_iters=2)
    with torch.no_grad():
        expected, out = conv(x), module(x)
    assert memory_format(expected) == "channels_last"
    assert memory_format(out) == "channels_last", out.stride()
