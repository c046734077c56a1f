"""MACs and parameter counts: closed-form for each form, measured for whole models.

A MAC is one multiply-accumulate per image. Model MACs count ``nn.Conv2d`` and
``nn.Linear`` layers only (pooling, normalisation and activations are left out),
measured with forward hooks at ``example_inputs`` so that every call of a shared
layer counts.
"""

from __future__ import annotations

import contextlib

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from .factorize import KernelShape
from .modes import eval_mode


@dataclass(frozen=True)
class Geometry:
    """Pixels a conv reads and writes in one forward pass, summed over its calls.

    ``in_pixels`` is ``Hin*Win`` and ``out_pixels`` is ``Hout*Wout`` of each call,
    added up over every call of the conv (a shared conv may run several times).
    """

    in_pixels: int
    out_pixels: int

    @classmethod
    def per_output_pixel(cls, stride: tuple[int, int]) -> Geometry:
        """The geometry of one output pixel, used when no example input is known."""
        return cls(in_pixels=stride[0] * stride[1], out_pixels=1)


def conv_macs(shape: KernelShape, geometry: Geometry) -> int:
    """MACs of the original conv: ``Hout*Wout * N * Mg * k2``."""
    return geometry.out_pixels * shape.out_channels * shape.in_per_group * shape.k2


def conv_params(shape: KernelShape, bias: bool) -> int:
    return shape.out_channels * shape.in_per_group * shape.k2 + (shape.out_channels if bias else 0)


def form_macs(form: str, shape: KernelShape, rank: int, geometry: Geometry) -> int:
    """MACs of a factorized form at ``rank``, per the formulas of each form.

    ``dw-pw``: ``Hout*Wout * (M*r*k2 + N*Mg*r)``.
    ``pw-dw``: ``Hin*Win * N*r*Mg + Hout*Wout * N*r*k2``.
    ``cp``: ``Hin*Win * R*M + Hout*Wout * R*(g*k2 + N)``.
    """
    m, n, g, k2, mg = (shape.in_channels, shape.out_channels, shape.groups, shape.k2,
                       shape.in_per_group)
    hw_in, hw_out = geometry.in_pixels, geometry.out_pixels
    if form == "dw-pw":
        macs = hw_out * (m * rank * k2 + n * mg * rank)
    elif form == "pw-dw":
        macs = hw_in * n * rank * mg + hw_out * n * rank * k2
    elif form == "cp":
        macs = hw_in * rank * m + hw_out * rank * (g * k2 + n)
    else:
        raise ValueError(f"unknown form {form!r}")
    return macs


def form_params(form: str, shape: KernelShape, rank: int, bias: bool) -> int:
    """Parameters of a factorized form at ``rank``, bias included."""
    m, n, g, k2, mg = (shape.in_channels, shape.out_channels, shape.groups, shape.k2,
                       shape.in_per_group)
    if form == "dw-pw":
        weights = m * rank * k2 + n * mg * rank
    elif form == "pw-dw":
        weights = n * rank * mg + n * rank * k2
    elif form == "cp":
        weights = rank * (m + g * k2 + n)
    else:
        raise ValueError(f"unknown form {form!r}")
    return weights + (n if bias else 0)


@dataclass
class ModelCost:
    """Measured MACs (``nn.Conv2d`` and ``nn.Linear``) and parameters of a model."""

    macs: int
    params: int
    geometries: dict[str, Geometry]


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    per_image = output[0].numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_image * (module.in_channels // module.groups) * kh * kw
    return per_image * module.in_features


@contextlib.contextmanager
def _plain_layouts(model: nn.Module):
    """Factorized modules run their plain chain of convs meanwhile, so that hooks see it.

    The other layouts call ``torch.matmul`` or ``F.conv2d`` directly (same numbers,
    same work), which module hooks would miss.
    """
    layouts = {m: m.layout for m in model.modules()
               if hasattr(m, "set_layout") and getattr(m, "layout", "plain") != "plain"}
    for module in layouts:
        module.set_layout("plain")
    try:
        yield
    finally:
        for module, layout in layouts.items():
            module.set_layout(layout)


def measure(model: nn.Module, example_inputs: tuple) -> ModelCost:
    """Run ``model`` once on ``example_inputs`` and count MACs per image.

    Returns the model's MACs and parameters, and the geometry of every conv
    module by qualified name (each alias of a shared module gets the same entry).
    """
    macs = 0
    pixels: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # id -> [in, out]

    def hook(module, inputs, output):
        nonlocal macs
        macs += _layer_macs(module, output)
        if isinstance(module, nn.Conv2d):
            seen = pixels[id(module)]
            seen[0] += inputs[0].shape[-2] * inputs[0].shape[-1]
            seen[1] += output.shape[-2] * output.shape[-1]

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with eval_mode(model), _plain_layouts(model), torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()

    geometries = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in pixels:
            geometries[name] = Geometry(*pixels[id(module)])
    params = sum(p.numel() for p in model.parameters())
    return ModelCost(macs=macs, params=params, geometries=geometries)
