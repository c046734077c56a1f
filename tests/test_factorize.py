"""The weight maths: reported errors against errors recomputed independently.

SVD errors are recomputed with numpy from the per-channel matrices of the design
notes; every form's error is recomputed from the kernel that its returned conv
weights compute (read with conv semantics in ``conftest.reconstruct_kernel``).
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from conftest import FORMS, SVD_FORMS, reconstruct_kernel, relative_frobenius

from dwconvert import factorize
from dwconvert.factorize import KernelShape

pytestmark = pytest.mark.usefixtures("single_thread")

# (id, weight shape (N, Mg, kh, kw), groups)
KERNELS = [
    ("16x16x3x3", (16, 16, 3, 3), 1),
    ("32x8x3x3", (32, 8, 3, 3), 1),
    ("6x10x1x5", (6, 10, 1, 5), 1),
    ("grouped-8x2x3x3-g4", (8, 2, 3, 3), 4),
    ("grouped-12x6x3x2-g2", (12, 6, 3, 2), 2),
]
kernel_param = pytest.mark.parametrize("shape, groups", [k[1:] for k in KERNELS],
                                       ids=[k[0] for k in KERNELS])


def _kernel(shape, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _numpy_singular_values(form: str, weight: torch.Tensor, groups: int) -> np.ndarray:
    """Singular values of every per-channel matrix, ``(C, q)``, from numpy alone."""
    w = weight.numpy()
    n, mg, kh, kw = w.shape
    per_group = w.reshape(groups, n // groups, mg, kh * kw)
    if form == "dw-pw":  # per input channel: its (Ng, k2) slice
        mats = [per_group[g, :, m, :] for g in range(groups) for m in range(mg)]
    else:  # pw-dw, per output channel: its (Mg, k2) slice
        mats = [w[i].reshape(mg, kh * kw) for i in range(n)]
    return np.stack([np.linalg.svd(mat, compute_uv=False) for mat in mats])


@pytest.mark.parametrize("form", FORMS)
@kernel_param
def test_reported_error_is_the_error_of_the_returned_weights(form, shape, groups):
    weight = _kernel(shape)
    result = factorize.decompose(form, weight, groups, 2, cp_iters=50)
    assert result.rank == 2
    assert all(w.dtype == torch.float64 for w in result.weights)
    approx = reconstruct_kernel(form, result.weights, groups, result.rank)
    expected = relative_frobenius(weight, approx)
    assert 0 < expected < 1, "rank 2 is truncated: the error lies strictly between 0 and 1"
    assert result.error == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("form", SVD_FORMS)
@kernel_param
def test_svd_error_is_the_discarded_energy(form, shape, groups):
    weight = _kernel(shape, seed=1)
    s2 = _numpy_singular_values(form, weight, groups) ** 2
    total = s2.sum()
    curve = factorize.svd_truncation_errors(form, weight, groups)
    for rank in range(1, s2.shape[1] + 1):
        expected = math.sqrt(s2[:, rank:].sum() / total)
        got = factorize.decompose(form, weight, groups, rank).error
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), f"rank {rank}"
        assert float(curve[rank - 1]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert expected == pytest.approx(0, abs=1e-12), "the last rank is the full rank"


# (id, shape, groups): each of the three exact constructions is the cheapest once
EXACT_KERNELS = [
    ("per-input-tap-16x2x3x3", (16, 2, 3, 3), 1),
    ("per-output-tap-2x16x3x3", (2, 16, 3, 3), 1),
    ("per-channel-pair-2x2x3x3", (2, 2, 3, 3), 1),
    ("grouped-8x3x3x3-g2", (8, 3, 3, 3), 2),
    ("grouped-resnext-128x4x3x3-g32", (128, 4, 3, 3), 32),
]


@pytest.mark.parametrize("shape, groups", [k[1:] for k in EXACT_KERNELS],
                         ids=[k[0] for k in EXACT_KERNELS])
def test_cp_exact_reproduces_the_kernel(shape, groups):
    weight = _kernel(shape, seed=2)
    n, mg, kh, kw = shape
    ng, k2 = n // groups, kh * kw
    factors = factorize.cp_exact(weight, groups)
    assert factors.rank == min(mg * k2, ng * k2, ng * mg)
    assert factors.rank == factorize.full_rank("cp", KernelShape.of(weight, groups))
    approx = torch.einsum("gnr,gmr,gsr->gnms", factors.a, factors.b, factors.c)
    diff = float((approx.reshape(shape) - weight).abs().max())
    assert diff < 1e-12, f"max diff {diff:.3g}"


@pytest.mark.parametrize("shape, groups", [k[1:] for k in EXACT_KERNELS],
                         ids=[k[0] for k in EXACT_KERNELS])
def test_cp_at_full_rank_has_zero_error(shape, groups):
    weight = _kernel(shape, seed=3)
    result = factorize.decompose("cp", weight, groups, 10**6)
    assert result.rank == factorize.full_rank("cp", KernelShape.of(weight, groups))
    approx = reconstruct_kernel("cp", result.weights, groups, result.rank)
    assert relative_frobenius(weight, approx) < 1e-12
    assert result.error == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("shape, groups", [((16, 16, 3, 3), 1), ((16, 4, 3, 3), 4)],
                         ids=["16x16x3x3", "grouped-16x4x3x3-g4"])
def test_cp_error_falls_as_rank_grows(shape, groups):
    weight = _kernel(shape, seed=4)
    errors = [factorize.decompose("cp", weight, groups, r, cp_iters=100).error
              for r in (1, 4, 12, 24)]
    assert all(b < a for a, b in pairwise(errors)), errors


@pytest.mark.parametrize("form", FORMS)
def test_rank_is_clamped_to_full_rank(form):
    weight = _kernel((6, 4, 3, 3))
    full = factorize.full_rank(form, KernelShape.of(weight, 1))
    assert full == {"dw-pw": 6, "pw-dw": 4, "cp": 24}[form]  # min of both sides
    assert factorize.decompose(form, weight, 1, 10**6).rank == full


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_below_one_raises_naming_it(rank):
    with pytest.raises(ValueError, match=rf"got {rank}\b"):
        factorize.decompose("dw-pw", _kernel((4, 4, 3, 3)), 1, rank)


def test_unknown_form_raises_naming_it():
    with pytest.raises(ValueError, match="'svd'"):
        factorize.decompose("svd", _kernel((4, 4, 3, 3)), 1, 2)
    with pytest.raises(ValueError, match="'tucker'"):
        factorize.full_rank("tucker", KernelShape.of(_kernel((4, 4, 3, 3)), 1))
