"""Choosing, per factorized layer, the layout that runs fastest, and folding BatchNorm.

A layout (see :mod:`dwconvert.layers`) changes how a module's forward walks memory,
never its numbers. Which one is fastest depends on the shape, the batch, the
memory format and the runtime, so it is measured: :func:`choose_layout` times each
candidate on the layer's real input and keeps the fastest.

Candidates for an NCHW input: ``plain``, ``channels_last``, ``matmul`` and, for the
forms with a multiplier-``r`` or ``r``-input spatial conv, ``matmul+repeat``
(``dw-pw``) or ``matmul+dwsum`` (``pw-dw``). For a channels_last input (a model
that runs channels_last) ``plain`` and ``repeat`` / ``dwsum``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .fold import fold_into
from .latency import MedianTimer, ModuleTimer, capture_inputs
from .layers import PLAIN, FactorizedConv2d

logger = logging.getLogger(__name__)

_SPATIAL_OPTION = {"dw-pw": "repeat", "pw-dw": "dwsum"}


def candidate_layouts(form: str, channels_last_input: bool) -> list[str]:
    """The layouts worth timing for ``form`` at an input in this memory format."""
    spatial = _SPATIAL_OPTION.get(form)
    if channels_last_input:
        return [PLAIN] + ([spatial] if spatial else [])
    return [PLAIN, "channels_last", "matmul"] + ([f"matmul+{spatial}"] if spatial else [])


def is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous()


def arrangements(module: FactorizedConv2d, channels_last_input: bool
                 ) -> dict[str, FactorizedConv2d]:
    """Copies of ``module``, one per candidate layout (sharing no state with it)."""
    copies = {}
    for layout in candidate_layouts(module.form, channels_last_input):
        twin = copy.deepcopy(module)
        twin.set_layout(layout)
        copies[layout] = twin
    return copies


def choose_layout(module: FactorizedConv2d, inputs: Sequence[torch.Tensor],
                  timer: ModuleTimer | None = None) -> dict[str, float]:
    """Set ``module`` to its fastest layout at ``inputs``; returns seconds per layout.

    The candidates are timed interleaved, so that other load on the machine
    slows them alike.
    """
    timer = timer or MedianTimer()
    times = timer(arrangements(module, is_channels_last(inputs[0])), inputs)
    best = min(times, key=times.get)
    module.set_layout(best)
    return times


def factorized_modules(model: nn.Module) -> dict[str, FactorizedConv2d]:
    """Every factorized module of ``model`` by qualified name (shared ones once)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FactorizedConv2d)}


def choose_layouts(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
                   timer: ModuleTimer | None = None) -> dict[str, dict[str, float]]:
    """Give every factorized module of ``model`` its fastest layout at ``example_inputs``.

    Use the batch size and memory format the model will run at: a model that runs
    channels_last should be converted to it (``model.to(memory_format=...)``) and
    given a channels_last example. Returns, per module, the seconds of each layout.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    modules = factorized_modules(model)
    for module in modules.values():
        module.set_layout(PLAIN)  # each layer is timed at the input the plain chain gives it
    inputs = capture_inputs(model, modules, example_inputs)
    chosen = {}
    for name, module in modules.items():
        if name not in inputs:
            continue
        chosen[name] = choose_layout(module, inputs[name], timer)
        logger.info("%s: layout %s (%s)", name, module.layout,
                    ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in chosen[name].items()))
    return chosen


def set_layouts(model: nn.Module, layout: str | Mapping[str, str] = PLAIN) -> None:
    """Set one layout for every factorized module, or per qualified name."""
    for name, module in factorized_modules(model).items():
        if isinstance(layout, str):
            module.set_layout(layout)
        elif name in layout:
            module.set_layout(layout[name])


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, (nn.Conv2d, FactorizedConv2d, nn.BatchNorm2d)) or \
            super().is_leaf_module(m, name)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each eval-mode BatchNorm2d that only follows a conv into that conv (in place).

    The conv is a plain ``nn.Conv2d`` or a factorized module, whose last 1x1 (or
    ``pw-dw``'s spatial layer) takes the scale and shift. Folded BatchNorms become
    ``nn.Identity``. For inference only: training the result no longer
    normalises. Returns how many were folded; a model fx cannot trace is left as is.
    """
    try:
        graph = _LeafTracer().trace(model)
    except Exception as err:  # fx cannot trace every model; folding is an optimisation
        logger.warning("not folding BatchNorm: %s cannot be traced (%s)",
                       type(model).__name__, err)
        return 0
    uses: dict[str, int] = {}
    calls: dict[str, int] = {}  # a module called at several sites cannot take one fold
    for node in graph.nodes:
        for arg in node.all_input_nodes:
            uses[arg.name] = uses.get(arg.name, 0) + 1
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1:
            continue
        norm = model.get_submodule(node.target)
        source = node.args[0]
        if not isinstance(norm, nn.BatchNorm2d) or norm.training or norm.running_var is None \
                or not isinstance(source, torch.fx.Node) or source.op != "call_module" \
                or uses.get(source.name) != 1 or calls[source.target] != 1 \
                or calls[node.target] != 1:
            continue
        conv = model.get_submodule(source.target)
        if isinstance(conv, FactorizedConv2d):
            last = conv.layers()[-1]
            conv.out_bias = True
        elif type(conv) is nn.Conv2d:
            last = conv
        else:
            continue
        fold_into(last, norm)
        parent, _, child = node.target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
        folded += 1
    return folded
