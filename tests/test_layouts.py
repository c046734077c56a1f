"""Every layout of every form computes what the plain chain computes: float64 references.

A layout changes how a factorized module walks memory, never its numbers. Each is
checked against ``F.conv2d`` on the kernel its factor weights stand for (read from
conv semantics in conftest), at full and at truncated rank, on every conv case,
with NCHW and channels_last inputs; BatchNorm folding against the unfolded model.
"""

from __future__ import annotations

from itertools import combinations

import pytest
import torch
from conftest import (
    CHANNELS_LAST,
    CONV_CASES,
    FORMS,
    assert_close,
    case_id,
    cases,
    exact_rank,
    reconstruct_kernel,
    reference_conv,
)
from torch import nn

import dwconvert
from dwconvert.layers import FORM_CLASSES, LAYOUT_OPTIONS, build_empty
from dwconvert.layouts import (
    candidate_layouts,
    choose_layout,
    choose_layouts,
    fold_batchnorm,
    set_layouts,
)

EXACT = 1e-10

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
]


def all_layouts(form: str) -> list[str]:
    """Every valid layout of ``form``: plain and each allowed combination of options."""
    options = LAYOUT_OPTIONS[form]
    combos = ["+".join(c) for k in range(1, len(options) + 1) for c in combinations(options, k)
              if not {"channels_last", "matmul"} <= set(c)]
    return ["plain", *combos]


def test_all_layouts_lists_the_candidates():
    for form in FORMS:
        for channels_last in (False, True):
            assert set(candidate_layouts(form, channels_last)) <= set(all_layouts(form))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_every_layout_is_exact_at_full_rank(case, form):
    conv = case.build()
    module = FORM_CLASSES[form].from_conv(conv, exact_rank(form, conv))
    x = case.input()
    ref = reference_conv(conv, x)
    for layout in all_layouts(form):
        module.set_layout(layout)
        with torch.no_grad():
            out = module(x)
            out_cl = module(x.contiguous(memory_format=CHANNELS_LAST))
        assert out.shape == ref.shape
        assert_close(out, ref, EXACT, f"{form} layout {layout}")
        assert_close(out_cl, ref, EXACT, f"{form} layout {layout}, channels_last input")
        if "channels_last" in layout:
            assert out.is_contiguous(), "an NCHW model gets NCHW back"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", cases("C01-no-bias", "C02-dilation2", "C06-groups2",
                                       "C09-circular-pad1x2", "strided-dilated-grouped-reflect"),
                         ids=case_id)
def test_every_layout_computes_the_truncated_kernel(case, form):
    conv = case.build()
    rank = max(2, exact_rank(form, conv) // 2)  # r > 1, so repeat and dwsum do something
    module = FORM_CLASSES[form].from_conv(conv, rank, cp_iters=5)
    kernel = reconstruct_kernel(form, [layer.weight for layer in module.layers()], conv.groups,
                                module.rank)
    x = case.input()
    ref = reference_conv(conv, x, weight=kernel)
    for layout in all_layouts(form):
        module.set_layout(layout)
        with torch.no_grad():
            assert_close(module(x), ref, EXACT, f"{form} rank {module.rank} layout {layout}")


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.mark.parametrize("form", FORMS)
def test_layout_survives_spec_and_checkpoint(form, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 10, 10)
    small = dwconvert.convert(TwoConvs().eval(), form=form, rank=2, cp_iters=5)
    layout = all_layouts(form)[-1]
    set_layouts(small, layout)
    assert small.conv1.spec()["layout"] == layout
    assert build_empty(small.conv1.spec()).layout == layout
    dwconvert.save(small, tmp_path / "m.safetensors", arch=f"{__name__}:TwoConvs")
    loaded = dwconvert.load(tmp_path / "m.safetensors")
    assert loaded.conv1.layout == loaded.conv2.layout == layout
    with torch.no_grad():
        assert_close(loaded(x), small(x), 1e-6, f"{form} {layout} after save/load")


def test_bad_layouts_are_refused():
    conv = nn.Conv2d(4, 8, 3)
    with pytest.raises(ValueError, match="not valid for cp"):
        FORM_CLASSES["cp"].empty_like(conv, 2).set_layout("repeat")
    with pytest.raises(ValueError, match="cannot be combined"):
        FORM_CLASSES["dw-pw"].empty_like(conv, 2).set_layout("channels_last+matmul")
    with pytest.raises(ValueError, match="layout"):
        dwconvert.convert(nn.Sequential(conv), form="auto", budget=0.5, layout="dwsum",
                          example_inputs=torch.randn(1, 4, 8, 8))


def fake_timer(favourite: str):
    """A deterministic timer: ``favourite`` takes 1 s, every other layout 2 s."""
    def timer(modules, inputs):
        return {name: 1.0 if getattr(m, "layout", None) == favourite else 2.0
                for name, m in modules.items()}
    return timer


@pytest.mark.parametrize("form", FORMS)
def test_choose_layout_keeps_the_fastest(form):
    module = FORM_CLASSES[form].empty_like(nn.Conv2d(8, 8, 3, padding=1), 2)
    x = torch.randn(1, 8, 6, 6)
    favourite = candidate_layouts(form, False)[-1]
    times = choose_layout(module, (x,), fake_timer(favourite))
    assert set(times) == set(candidate_layouts(form, False))
    assert module.layout == favourite
    model = nn.Sequential(module, nn.ReLU())
    cl = candidate_layouts(form, True)[-1]
    chosen = choose_layouts(model.to(memory_format=CHANNELS_LAST),
                            x.contiguous(memory_format=CHANNELS_LAST), fake_timer(cl))
    assert set(chosen["0"]) == set(candidate_layouts(form, True)) and module.layout == cl


@pytest.mark.parametrize("form", FORMS)
def test_fold_batchnorm_matches_the_unfolded_model(form):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16, affine=False),
    ).double()
    for m in model.modules():  # non-trivial statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-1, 1)
    model.eval()
    small = dwconvert.convert(model, form=form, rank=2, cp_iters=5).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = small(x)
        assert fold_batchnorm(small) == 3
        assert not any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
        assert_close(small(x), expected, EXACT, f"{form} with BatchNorm folded")
        plain = model.eval()
        expected = plain(x)
        assert fold_batchnorm(plain) == 3
        assert_close(plain(x), expected, EXACT, "plain convs with BatchNorm folded")


def test_fold_batchnorm_leaves_shared_and_branching_convs():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv's output is used twice: no fold

    model = Branch().eval()
    assert fold_batchnorm(model) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)
