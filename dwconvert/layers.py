"""The modules that replace a standard ``nn.Conv2d``.

Each factorized module is a chain of plain ``nn.Conv2d`` layers: only the layer
with the ``kh x kw`` kernel carries the original stride, padding, dilation and
padding mode; the 1x1 layers keep stride 1 and no padding. The bias, if any, sits
on the last layer. Because the first layer of a chain has no bias, zero-padding
before or after it gives the same result, so placing the padding on the spatial
layer is exact for every padding mode.

Every module can be built empty from its :meth:`~FactorizedConv2d.spec` (to load a
saved checkpoint) or filled from a trained conv with ``from_conv``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import factorize
from .factorize import KernelShape


def conv_spec(conv: nn.Conv2d) -> dict[str, Any]:
    """The constructor arguments of ``conv`` as JSON-friendly values."""
    padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(conv.kernel_size),
        "stride": list(conv.stride),
        "padding": padding,
        "dilation": list(conv.dilation),
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def _canonical_strides(shape, channels_last: bool) -> tuple[int, ...]:
    n, c, h, w = shape
    return (h * w * c, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)


def _is_channels_last(weight: torch.Tensor) -> bool:
    # Size-1 dims make is_contiguous() ambiguous, and .contiguous() then keeps the
    # strides as they are; compare with the canonical strides of each format.
    strides = weight.stride()
    return (strides == _canonical_strides(weight.shape, True)
            and strides != _canonical_strides(weight.shape, False))


def _as_channels_last(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with the canonical channels_last strides, even for size-1 dims."""
    out = torch.empty_strided(t.shape, _canonical_strides(t.shape, True), dtype=t.dtype,
                              device=t.device)
    return out.copy_(t)


class FactorizedConv2d(nn.Module):
    """Base class: a chain of convs standing in for one ``Conv2d``.

    Subclasses set ``form`` and build their layers in ``__init__`` from the
    original conv's arguments plus ``rank``.
    """

    form: str = ""

    def __init__(self, rank: int, *, channels_last: bool = False, out_bias: bool = False,
                 **conv_args: Any) -> None:
        super().__init__()
        self.rank = rank
        # The last layer gets a bias if the original had one, or if asked (a refit on
        # calibration data can then correct the output's mean).
        self.out_bias = out_bias or conv_args["bias"]
        # A conv with channels_last weights returns channels_last outputs whatever its
        # input; the 1x1 and depthwise weights of a chain cannot say so by their strides.
        self.channels_last = channels_last
        self.conv_args = dict(conv_args)
        self.in_channels = conv_args["in_channels"]
        self.out_channels = conv_args["out_channels"]
        self.kernel_size = tuple(conv_args["kernel_size"])
        self.stride = tuple(conv_args["stride"])
        self.groups = conv_args["groups"]

    def spec(self) -> dict[str, Any]:
        """What is needed to rebuild this module empty: form, rank and conv arguments."""
        spec = {"form": self.form, "rank": self.rank, "conv": dict(self.conv_args)}
        if self.channels_last:
            spec["channels_last"] = True
        if self.out_bias and not self.conv_args["bias"]:
            spec["out_bias"] = True
        return spec

    def _spatial(self, in_channels, out_channels, groups, bias, device, dtype) -> nn.Conv2d:
        a = self.conv_args
        padding = a["padding"] if isinstance(a["padding"], str) else tuple(a["padding"])
        return nn.Conv2d(
            in_channels,
            out_channels,
            tuple(a["kernel_size"]),
            stride=tuple(a["stride"]),
            padding=padding,
            dilation=tuple(a["dilation"]),
            groups=groups,
            bias=bias,
            padding_mode=a["padding_mode"],
            device=device,
            dtype=dtype,
        )

    @staticmethod
    def _pointwise(in_channels, out_channels, groups, bias, device, dtype) -> nn.Conv2d:
        return nn.Conv2d(
            in_channels, out_channels, 1, groups=groups, bias=bias, device=device, dtype=dtype
        )

    def layers(self) -> list[nn.Conv2d]:
        """The convs of the chain, in the order they run."""
        return list(self.children())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for layer in self.children():
            x = layer(x)
        if self.channels_last:
            # A layer whose shape makes both formats the same strides can drop it.
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def extra_repr(self) -> str:
        return f"form={self.form!r}, rank={self.rank}"

    def _load(self, conv: nn.Conv2d, weights: list[torch.Tensor]) -> None:
        """Copy factor weights (float64) and the original bias into the layers."""
        layers = self.layers()
        channels_last = _is_channels_last(conv.weight)
        with torch.no_grad():
            for layer, w in zip(layers, weights):
                assert layer.weight.shape == w.shape, (layer.weight.shape, w.shape)
                value = w.to(dtype=layer.weight.dtype, device=layer.weight.device)
                if channels_last:
                    value = _as_channels_last(value)
                layer.weight = nn.Parameter(value, requires_grad=conv.weight.requires_grad)
            if conv.bias is not None:
                layers[-1].bias.copy_(conv.bias)
            elif layers[-1].bias is not None:
                layers[-1].bias.zero_()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, **options: Any) -> FactorizedConv2d:
        """Factorize a trained ``conv`` at ``rank`` (clamped to the form's full rank).

        ``options`` go to :func:`dwconvert.factorize.decompose` (``cp_iters``, ``seed``).
        """
        decomposition = factorize.decompose(cls.form, conv.weight, conv.groups, rank, **options)
        return cls.from_decomposition(conv, decomposition)

    @classmethod
    def from_decomposition(cls, conv: nn.Conv2d, decomposition: factorize.Decomposition, *,
                           out_bias: bool = False) -> FactorizedConv2d:
        """Build the module for ``conv`` from factor weights computed beforehand.

        ``out_bias`` gives the last layer a (zero) bias even if ``conv`` has none.
        """
        if decomposition.form != cls.form:
            raise ValueError(f"a {decomposition.form!r} decomposition cannot fill {cls.__name__}")
        module = cls.empty_like(conv, decomposition.rank, out_bias=out_bias)
        module._load(conv, list(decomposition.weights))
        return module

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, rank: int, *, out_bias: bool = False
                   ) -> FactorizedConv2d:
        """An unfilled module of this form for ``conv`` at ``rank``, same dtype and device."""
        return cls(
            rank,
            **conv_spec(conv),
            channels_last=_is_channels_last(conv.weight),
            out_bias=out_bias,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )


class DwPwConv2d(FactorizedConv2d):
    """Depthwise (channel multiplier ``rank``) then pointwise: per-input-channel SVD.

    Before: ``Conv2d(M, N, k, groups=g)``.
    After: ``Conv2d(M, M*r, k, groups=M)`` -> ``Conv2d(M*r, N, 1, groups=g)``.
    """

    form = "dw-pw"

    def __init__(self, rank: int, *, channels_last: bool = False, out_bias: bool = False,
                 device=None, dtype=None, **conv_args: Any) -> None:
        super().__init__(rank, channels_last=channels_last, out_bias=out_bias, **conv_args)
        m, n, g = self.in_channels, self.out_channels, self.groups
        bias = self.out_bias
        self.conv_dw = self._spatial(m, m * rank, m, False, device, dtype)
        self.conv_pw = self._pointwise(m * rank, n, g, bias, device, dtype)



class PwDwConv2d(FactorizedConv2d):
    """Pointwise then grouped spatial conv: per-output-channel SVD.

    Before: ``Conv2d(M, N, k, groups=g)``.
    After: ``Conv2d(M, N*r, 1, groups=g)`` -> ``Conv2d(N*r, N, k, groups=N)``.
    The pointwise layer runs at the input resolution.
    """

    form = "pw-dw"

    def __init__(self, rank: int, *, channels_last: bool = False, out_bias: bool = False,
                 device=None, dtype=None, **conv_args: Any) -> None:
        super().__init__(rank, channels_last=channels_last, out_bias=out_bias, **conv_args)
        m, n, g = self.in_channels, self.out_channels, self.groups
        bias = self.out_bias
        self.conv_pw = self._pointwise(m, n * rank, g, False, device, dtype)
        self.conv_dw = self._spatial(n * rank, n, n, bias, device, dtype)



class CPConv2d(FactorizedConv2d):
    """Pointwise, depthwise, pointwise: a CP decomposition of the kernel.

    Before: ``Conv2d(M, N, k, groups=g)``.
    After: ``Conv2d(M, g*R, 1, groups=g)`` -> ``Conv2d(g*R, g*R, k, groups=g*R)``
    -> ``Conv2d(g*R, N, 1, groups=g)``, where ``R`` (``rank``) is per group.
    """

    form = "cp"

    def __init__(self, rank: int, *, channels_last: bool = False, out_bias: bool = False,
                 device=None, dtype=None, **conv_args: Any) -> None:
        super().__init__(rank, channels_last=channels_last, out_bias=out_bias, **conv_args)
        m, n, g = self.in_channels, self.out_channels, self.groups
        bias = self.out_bias
        width = g * rank
        self.conv_pw_in = self._pointwise(m, width, g, False, device, dtype)
        self.conv_dw = self._spatial(width, width, width, False, device, dtype)
        self.conv_pw_out = self._pointwise(width, n, g, bias, device, dtype)



FORM_CLASSES: dict[str, type[FactorizedConv2d]] = {
    cls.form: cls for cls in (DwPwConv2d, PwDwConv2d, CPConv2d)
}


def build_empty(spec: dict[str, Any], *, device=None, dtype=None) -> FactorizedConv2d:
    """Rebuild an unfilled module from :meth:`FactorizedConv2d.spec`."""
    cls = FORM_CLASSES[spec["form"]]
    return cls(spec["rank"], channels_last=spec.get("channels_last", False),
               out_bias=spec.get("out_bias", False), device=device, dtype=dtype, **spec["conv"])
