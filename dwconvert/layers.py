"""The modules that replace a standard ``nn.Conv2d``.

Each factorized module is a chain of plain ``nn.Conv2d`` layers: only the layer
with the ``kh x kw`` kernel carries the original stride, padding, dilation and
padding mode; the 1x1 layers keep stride 1 and no padding. The bias, if any, sits
on the last layer. Because the first layer of a chain has no bias, zero-padding
before or after it gives the same result, so placing the padding on the spatial
layer is exact for every padding mode.

Every module can be built empty from its :meth:`~FactorizedConv2d.spec` (to load a
saved checkpoint) or filled from a trained conv with ``from_conv``.

A module's ``layout`` says how its forward runs the same weights (see
docs/latency.md); every layout computes the same numbers, only the memory traffic
differs. Layouts are ``"plain"`` or ``+``-joined options:

* ``channels_last``: run the chain in channels_last memory format and return a
  contiguous (NCHW) output, for models that run NCHW.
* ``matmul``: each 1x1 layer with ``groups=1`` as a matrix product over NCHW
  memory, ``(N, C) @ (B, C, H*W)``, instead of a convolution.
* ``repeat`` (``dw-pw``): the depthwise conv with channel multiplier ``r`` as a
  multiplier-1 depthwise conv over the input channels repeated ``r`` times each
  (``repeat_interleave``); the kernels are the same tensor.
* ``dwsum`` (``pw-dw``): the grouped ``k x k`` conv (``r`` inputs per output) as a
  depthwise conv over ``N*r`` channels followed by a sum over each run of ``r``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import factorize


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


PLAIN = "plain"
LAYOUT_OPTIONS = {
    "dw-pw": ("channels_last", "matmul", "repeat"),
    "pw-dw": ("channels_last", "matmul", "dwsum"),
    "cp": ("channels_last", "matmul"),
}


def layout_options(form: str, layout: str) -> frozenset[str]:
    """The options of ``layout`` (``"a+b"``), checked against ``form``."""
    if layout == PLAIN:
        return frozenset()
    options = frozenset(layout.split("+")) if isinstance(layout, str) else frozenset({None})
    allowed = LAYOUT_OPTIONS[form]
    unknown = sorted(str(o) for o in options - set(allowed))
    if unknown or not options:
        raise ValueError(f"layout {layout!r} is not valid for {form}: use 'plain' or a "
                         f"'+'-joined subset of {', '.join(allowed)}")
    if {"channels_last", "matmul"} <= options:
        raise ValueError(f"layout {layout!r}: matmul reads NCHW memory and cannot be "
                         "combined with channels_last")
    return options


def _spatial_forward(layer: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, groups: int,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """``layer``'s convolution (same stride, padding, dilation) with another kernel view."""
    padding = layer.padding
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    return F.conv2d(x, weight, bias, layer.stride, padding, layer.dilation, groups)


def _pointwise_forward(layer: nn.Conv2d, x: torch.Tensor, matmul: bool) -> torch.Tensor:
    """A 1x1 layer, as a matrix product ``(N, C) @ (B, C, H*W)`` when ``matmul``."""
    if not matmul or layer.groups != 1:
        return layer(x)
    b, c, h, w = x.shape
    weight = layer.weight.reshape(layer.out_channels, c)
    flat = x.reshape(b, c, h * w)
    if layer.bias is None:
        out = torch.matmul(weight, flat)
    else:
        out = torch.baddbmm(layer.bias.view(1, -1, 1), weight.expand(b, -1, -1), flat)
    return out.view(b, layer.out_channels, h, w)


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
                 layout: str = PLAIN, **conv_args: Any) -> None:
        super().__init__()
        self.rank = rank
        self.layout = layout
        self._options = layout_options(self.form, layout)
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
        if self.layout != PLAIN:
            spec["layout"] = self.layout
        return spec

    def set_layout(self, layout: str) -> None:
        """Run the same weights in another layout (see the module docstring)."""
        self._options = layout_options(self.form, layout)
        # One name per layout: its options in the order of LAYOUT_OPTIONS.
        self.layout = "+".join(o for o in LAYOUT_OPTIONS[self.form] if o in self._options) \
            or PLAIN
        fmt = torch.channels_last if self.channels_last or "channels_last" in self._options \
            else torch.contiguous_format
        with torch.no_grad():
            for layer in self.layers():
                if not layer.weight.is_contiguous(memory_format=fmt):
                    strided = _as_channels_last(layer.weight) if fmt == torch.channels_last \
                        else layer.weight.contiguous()
                    layer.weight = nn.Parameter(strided, requires_grad=layer.weight.requires_grad)

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
        if not self._options:
            for layer in self.children():
                x = layer(x)
        elif "channels_last" in self._options and not self.channels_last:
            return self._arranged(x.contiguous(memory_format=torch.channels_last)).contiguous()
        else:
            x = self._arranged(x)
        if self.channels_last:
            # A layer whose shape makes both formats the same strides can drop it.
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _arranged(self, x: torch.Tensor) -> torch.Tensor:
        """The chain run with this module's layout options; each form defines it."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        layout = "" if self.layout == PLAIN else f", layout={self.layout!r}"
        return f"form={self.form!r}, rank={self.rank}{layout}"

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
        if self.layout != PLAIN:
            self.set_layout(self.layout)

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
    def empty_like(cls, conv: nn.Conv2d, rank: int, *, out_bias: bool = False,
                   layout: str = PLAIN) -> FactorizedConv2d:
        """An unfilled module of this form for ``conv`` at ``rank``, same dtype and device."""
        return cls(
            rank,
            **conv_spec(conv),
            channels_last=_is_channels_last(conv.weight),
            out_bias=out_bias,
            layout=layout,
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
                 layout: str = PLAIN, device=None, dtype=None, **conv_args: Any) -> None:
        super().__init__(rank, channels_last=channels_last, out_bias=out_bias, layout=layout,
                         **conv_args)
        m, n, g = self.in_channels, self.out_channels, self.groups
        bias = self.out_bias
        self.conv_dw = self._spatial(m, m * rank, m, False, device, dtype)
        self.conv_pw = self._pointwise(m * rank, n, g, bias, device, dtype)
        if layout != PLAIN:
            self.set_layout(layout)

    def _arranged(self, x: torch.Tensor) -> torch.Tensor:
        if "repeat" in self._options and self.rank > 1:
            # (B, M, H, W) -> (B, M*r, H, W), channel m*r + j = input channel m: the order
            # of the multiplier-r kernel's outputs, so its weight serves unchanged.
            dw = self.conv_dw
            x = _spatial_forward(dw, x.repeat_interleave(self.rank, dim=1), dw.weight,
                                 dw.out_channels, dw.bias)
        else:
            x = self.conv_dw(x)
        return _pointwise_forward(self.conv_pw, x, "matmul" in self._options
                                  and not self.channels_last)



class PwDwConv2d(FactorizedConv2d):
    """Pointwise then grouped spatial conv: per-output-channel SVD.

    Before: ``Conv2d(M, N, k, groups=g)``.
    After: ``Conv2d(M, N*r, 1, groups=g)`` -> ``Conv2d(N*r, N, k, groups=N)``.
    The pointwise layer runs at the input resolution.
    """

    form = "pw-dw"

    def __init__(self, rank: int, *, channels_last: bool = False, out_bias: bool = False,
                 layout: str = PLAIN, device=None, dtype=None, **conv_args: Any) -> None:
        super().__init__(rank, channels_last=channels_last, out_bias=out_bias, layout=layout,
                         **conv_args)
        m, n, g = self.in_channels, self.out_channels, self.groups
        bias = self.out_bias
        self.conv_pw = self._pointwise(m, n * rank, g, False, device, dtype)
        self.conv_dw = self._spatial(n * rank, n, n, bias, device, dtype)
        if layout != PLAIN:
            self.set_layout(layout)

    def _arranged(self, x: torch.Tensor) -> torch.Tensor:
        x = _pointwise_forward(self.conv_pw, x, "matmul" in self._options
                               and not self.channels_last)
        if "dwsum" not in self._options or self.rank == 1:
            return self.conv_dw(x)
        # (B, N*r, H, W) -> depthwise -> (B, N, r, H', W') -> sum over r: the grouped
        # kernel (N, r, kh, kw) seen as N*r single-channel kernels.
        dw = self.conv_dw
        y = _spatial_forward(dw, x, dw.weight.reshape(-1, 1, *dw.kernel_size), dw.in_channels,
                             None)
        y = y.unflatten(1, (self.out_channels, self.rank)).sum(2)
        return y if dw.bias is None else y + dw.bias.view(1, -1, 1, 1)



class CPConv2d(FactorizedConv2d):
    """Pointwise, depthwise, pointwise: a CP decomposition of the kernel.

    Before: ``Conv2d(M, N, k, groups=g)``.
    After: ``Conv2d(M, g*R, 1, groups=g)`` -> ``Conv2d(g*R, g*R, k, groups=g*R)``
    -> ``Conv2d(g*R, N, 1, groups=g)``, where ``R`` (``rank``) is per group.
    """

    form = "cp"

    def __init__(self, rank: int, *, channels_last: bool = False, out_bias: bool = False,
                 layout: str = PLAIN, device=None, dtype=None, **conv_args: Any) -> None:
        super().__init__(rank, channels_last=channels_last, out_bias=out_bias, layout=layout,
                         **conv_args)
        m, n, g = self.in_channels, self.out_channels, self.groups
        bias = self.out_bias
        width = g * rank
        self.conv_pw_in = self._pointwise(m, width, g, False, device, dtype)
        self.conv_dw = self._spatial(width, width, width, False, device, dtype)
        self.conv_pw_out = self._pointwise(width, n, g, bias, device, dtype)
        if layout != PLAIN:
            self.set_layout(layout)

    def _arranged(self, x: torch.Tensor) -> torch.Tensor:
        matmul = "matmul" in self._options and not self.channels_last
        x = _pointwise_forward(self.conv_pw_in, x, matmul)
        return _pointwise_forward(self.conv_pw_out, self.conv_dw(x), matmul)



FORM_CLASSES: dict[str, type[FactorizedConv2d]] = {
    cls.form: cls for cls in (DwPwConv2d, PwDwConv2d, CPConv2d)
}


def build_empty(spec: dict[str, Any], *, device=None, dtype=None) -> FactorizedConv2d:
    """Rebuild an unfilled module from :meth:`FactorizedConv2d.spec`."""
    cls = FORM_CLASSES[spec["form"]]
    return cls(spec["rank"], channels_last=spec.get("channels_last", False),
               out_bias=spec.get("out_bias", False), layout=spec.get("layout", PLAIN),
               device=device, dtype=dtype, **spec["conv"])
