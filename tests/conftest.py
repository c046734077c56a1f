"""Shared helpers of the conversion tests: conv configurations and float64 references.

Everything here is computed with ``torch.nn.functional`` and plain tensor algebra,
independently of ``dwconvert``, so the tests can compare the converter against it.
The test modules import these helpers with ``from conftest import ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

FORMS = ("dw-pw", "pw-dw", "cp")
SVD_FORMS = ("dw-pw", "pw-dw")

CHANNELS_LAST = torch.channels_last

# Counts that test modules report at the end of the run (configurations, models tried).
SUMMARY_LINES: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter):
    for line in SUMMARY_LINES.values():
        terminalreporter.write_line(line)


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread.

    On a busy 2-core machine, LAPACK's SVD with two OpenMP threads was measured
    1000 times slower (2.3 s against 2 ms for a 64 x 576 matrix); one thread also
    makes float sums deterministic. Modules opt in with ``pytestmark``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_thread_module():
    """Like ``single_thread``, for a whole module (its module-scoped fixtures too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class ConvCase:
    """One ``nn.Conv2d`` configuration and the input it runs on."""

    id: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    input_shape: tuple = (1, 8, 9, 9)
    out_shape: tuple | None = None

    def build(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Conv2d:
        torch.manual_seed(seed)
        return nn.Conv2d(*self.args, **self.kwargs, dtype=dtype).eval()

    def input(self, dtype: torch.dtype = torch.float64, seed: int = 1,
              batch: int | None = None) -> torch.Tensor:
        shape = self.input_shape if batch is None else (batch, *self.input_shape[1:])
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=dtype)


CONV_CASES = [
    ConvCase("C01-alexnet-stem", (3, 64, 11), dict(stride=4, padding=2),
             (1, 3, 224, 224), (1, 64, 55, 55)),
    ConvCase("C01-stride2x1-pad1x2", (8, 16, 3), dict(stride=(2, 1), padding=(1, 2)),
             (2, 8, 13, 11), (2, 16, 7, 13)),
    ConvCase("C01-no-bias", (8, 16, 3), dict(padding=1, bias=False), (2, 8, 9, 9),
             (2, 16, 9, 9)),
    ConvCase("C02-dilation2", (64, 64, 3), dict(padding=2, dilation=2),
             (1, 64, 32, 32), (1, 64, 32, 32)),
    ConvCase("C03-same-odd", (32, 32, 3), dict(padding="same"), (1, 32, 12, 12),
             (1, 32, 12, 12)),
    ConvCase("C03-same-even", (16, 16, 4), dict(padding="same"), (1, 16, 11, 11),
             (1, 16, 11, 11)),
    ConvCase("C03-same-even-dilated-reflect", (8, 8, (4, 2)),
             dict(padding="same", dilation=(1, 3), padding_mode="reflect"),
             (1, 8, 12, 12), (1, 8, 12, 12)),
    ConvCase("C03-valid", (16, 16, 3), dict(padding="valid"), (1, 16, 10, 10),
             (1, 16, 8, 8)),
    ConvCase("C04-kernel-7x1", (16, 16, (7, 1)), dict(padding=(3, 0)), (1, 16, 14, 10)),
    ConvCase("C04-kernel-1x7", (16, 16, (1, 7)), dict(padding=(0, 3)), (1, 16, 10, 14)),
    ConvCase("C04-256-to-32", (256, 32, 3), dict(padding=1), (1, 256, 8, 8)),
    ConvCase("C04-32-to-256", (32, 256, 3), dict(padding=1), (1, 32, 8, 8)),
    ConvCase("C04-4-to-32", (4, 32, 3), dict(padding=1), (2, 4, 9, 9)),
    ConvCase("C06-resnext-groups32", (128, 128, 3), dict(padding=1, groups=32),
             (1, 128, 8, 8)),
    ConvCase("C06-groups2", (4, 8, 3), dict(groups=2), (2, 4, 9, 9), (2, 8, 7, 7)),
    ConvCase("C09-reflect", (2, 1, 7), dict(padding=3, padding_mode="reflect"),
             (1, 2, 16, 16), (1, 1, 16, 16)),
    ConvCase("C09-replicate", (2, 1, 7), dict(padding=3, padding_mode="replicate"),
             (1, 2, 16, 16), (1, 1, 16, 16)),
    ConvCase("C09-circular-pad1x2", (4, 6, 3), dict(padding=(1, 2), padding_mode="circular"),
             (1, 4, 9, 10), (1, 6, 9, 12)),
    ConvCase("C10-one-input-channel", (1, 8, 5), dict(padding=2), (2, 1, 12, 12)),
    ConvCase("strided-dilated-grouped-reflect", (8, 12, 3),
             dict(stride=2, padding=3, dilation=3, groups=4, padding_mode="reflect"),
             (1, 8, 15, 15), (1, 12, 8, 8)),
]
CASES_BY_ID = {case.id: case for case in CONV_CASES}


def cases(*ids: str) -> list[ConvCase]:
    """The conv cases with these ids, in that order."""
    return [CASES_BY_ID[i] for i in ids]


def case_id(case: ConvCase) -> str:
    return case.id


def explicit_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding of ``conv``, 'same' resolved as PyTorch does."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        (top, bottom), (left, right) = [
            (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
            for d, k in zip(conv.dilation, conv.kernel_size, strict=True)
        ]
        return (left, right, top, bottom)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def reference_conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor | None = None,
                   ) -> torch.Tensor:
    """``conv(x)`` in float64 by ``F.pad`` + ``F.conv2d``; ``weight`` replaces conv's kernel."""
    w = (conv.weight if weight is None else weight).detach().double()
    b = None if conv.bias is None else conv.bias.detach().double()
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x.detach().double(), explicit_padding(conv), mode=mode)
    return F.conv2d(padded, w, b, conv.stride, 0, conv.dilation, conv.groups)


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|out - ref| / max|ref|``, in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).abs().max() / ref.abs().max())


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Same shape, and relative max error within ``tol``; the message gives the error."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    diff = float((out.detach().double() - ref.detach().double()).abs().max())
    err = max_rel_error(out, ref)
    assert err <= tol, f"{what}: relative max error {err:.3g} (max diff {diff:.3g}) > {tol:g}"


def convertible(conv: nn.Conv2d) -> bool:
    """Whether a conv is a standard one: not 1x1 and not depthwise (groups == in_channels)."""
    depthwise = conv.groups == conv.in_channels and conv.in_channels > 1
    return conv.kernel_size != (1, 1) and not depthwise


def convertible_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if type(m) is nn.Conv2d and convertible(m)}


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """MACs per image of one ``nn.Conv2d`` or ``nn.Linear`` call, from its output."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output[0].numel() * module.in_channels // module.groups * kh * kw
    return output[0].numel() * module.in_features


def count_macs(model: nn.Module, *inputs: torch.Tensor) -> int:
    """MACs per image of ``model``'s ``nn.Conv2d`` and ``nn.Linear`` calls, by own hooks."""
    total = 0

    def hook(module, args, output):
        nonlocal total
        total += layer_macs(module, output)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


def original_macs(conv: nn.Conv2d, hw_out: int) -> int:
    """MACs per image of a standard conv: ``Hout*Wout * N * Mg * kh*kw``."""
    kh, kw = conv.kernel_size
    return hw_out * conv.out_channels * conv.in_channels // conv.groups * kh * kw


def closed_form_macs(form: str, conv: nn.Conv2d, rank: int, hw_in: int, hw_out: int) -> int:
    """MACs per image of a factorized conv, by the formulas of docs/forms.md."""
    n, m, g = conv.out_channels, conv.in_channels, conv.groups
    mg, k2 = m // g, conv.kernel_size[0] * conv.kernel_size[1]
    if form == "dw-pw":  # depthwise (multiplier r), then pointwise with g groups
        return hw_out * (m * rank * k2 + n * mg * rank)
    if form == "pw-dw":  # pointwise at the input resolution, then N groups of r channels
        return hw_in * n * rank * mg + hw_out * n * rank * k2
    # cp: pointwise-in at the input resolution, depthwise g*R, pointwise-out
    return hw_in * rank * m + hw_out * rank * (g * k2 + n)


def closed_form_params(form: str, conv: nn.Conv2d, rank: int) -> int:
    n, m, g = conv.out_channels, conv.in_channels, conv.groups
    mg, k2 = m // g, conv.kernel_size[0] * conv.kernel_size[1]
    bias = n if conv.bias is not None else 0
    if form == "dw-pw":
        return m * rank * k2 + n * mg * rank + bias
    if form == "pw-dw":
        return n * rank * mg + n * rank * k2 + bias
    return rank * m + g * rank * k2 + n * rank + bias


def exact_rank(form: str, conv: nn.Conv2d) -> int:
    """The rank at which a form is exact: the min of both sides, per group."""
    g = conv.groups
    mg, ng = conv.in_channels // g, conv.out_channels // g
    k2 = conv.kernel_size[0] * conv.kernel_size[1]
    return {"dw-pw": min(ng, k2), "pw-dw": min(mg, k2),
            "cp": min(mg * k2, ng * k2, ng * mg)}[form]


def reconstruct_kernel(form: str, weights, groups: int, rank: int) -> torch.Tensor:
    """The ``(N, Mg, kh, kw)`` kernel that a chain of factor convs computes.

    Read from conv semantics alone: ``weights`` are the chain's conv weights in the
    order they run, with the groups each form's layers use.
    """
    w = [t.detach().double() for t in weights]
    if form == "dw-pw":
        dw, pw = w  # (M*r, 1, kh, kw) with M groups, (N, Mg*r, 1, 1) with g groups
        kh, kw = dw.shape[-2:]
        n, mg = pw.shape[0], pw.shape[1] // rank
        dw = dw.reshape(groups, mg, rank, kh, kw)
        pw = pw.reshape(groups, n // groups, mg, rank)
        return torch.einsum("gnmr,gmrhw->gnmhw", pw, dw).reshape(n, mg, kh, kw)
    if form == "pw-dw":
        pw, dw = w  # (N*r, Mg, 1, 1) with g groups, (N, r, kh, kw) with N groups
        n = dw.shape[0]
        return torch.einsum("njm,njhw->nmhw", pw.reshape(n, rank, -1), dw)
    pw_in, dw, pw_out = w  # (g*R, Mg, 1, 1) g groups, (g*R, 1, kh, kw), (N, R, 1, 1) g groups
    n, kh, kw = pw_out.shape[0], *dw.shape[-2:]
    a = pw_out.reshape(groups, n // groups, rank)
    b = pw_in.reshape(groups, rank, -1)
    c = dw.reshape(groups, rank, kh, kw)
    return torch.einsum("gnr,grm,grhw->gnmhw", a, b, c).reshape(n, -1, kh, kw)


def relative_frobenius(weight: torch.Tensor, approx: torch.Tensor) -> float:
    w = weight.detach().double()
    return float((w - approx.reshape(w.shape)).norm() / w.norm())


def memory_format(t: torch.Tensor) -> str:
    """``'contiguous'``, ``'channels_last'`` or ``'other'`` (for unambiguous shapes)."""
    if t.is_contiguous():
        return "contiguous"
    if t.is_contiguous(memory_format=CHANNELS_LAST):
        return "channels_last"
    return "other"
