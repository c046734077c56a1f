"""Finding the convs of a model, and swapping modules in place.

The convs are found by tracing the model with ``torch.fx.symbolic_trace``: every
``call_module`` node whose target is an ``nn.Conv2d`` is a conv that the forward
pass really uses, in the order it runs. A model that cannot be traced falls back
to ``named_modules()``; each ``nn.Conv2d`` found there is taken, and the fallback
is logged.

Replacement always swaps the submodule at its qualified name in the user's own
model (never in a ``GraphModule``), so the model keeps its class, its ``forward``
and the state_dict keys of every layer that is not replaced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.fx
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class ConvSites:
    """The ``nn.Conv2d`` modules of a model, by qualified name in forward order.

    Attributes:
        names: one name per distinct conv module (the first name it was called by).
        aliases: for each name, every other name under which the same module sits.
        unused: convs that exist in the model but are never called by its forward.
        traced: whether the names come from a successful fx trace.
        trace_error: the reason tracing failed, when it did.
    """

    names: list[str]
    aliases: dict[str, list[str]] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    traced: bool = True
    trace_error: str | None = None


class _ConvLeafTracer(torch.fx.Tracer):
    """fx's tracer, but every ``nn.Conv2d`` (subclasses too) is a leaf call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, module_qualified_name)


def _conv_names_by_module(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Conv2d) and name:
            names.setdefault(id(module), []).append(name)
    return names


def find_convs(model: nn.Module) -> ConvSites:
    """Locate the convs of ``model``, by fx trace or, failing that, by module type."""
    by_module = _conv_names_by_module(model)
    if isinstance(model, nn.Conv2d):
        raise ValueError(
            "the model is a bare nn.Conv2d; convert it with "
            "dwconvert.layers.<Form>.from_conv(conv, rank) or wrap it in nn.Sequential"
        )

    try:
        graph = _ConvLeafTracer().trace(model)
    except Exception as err:  # any failure to trace means: use the fallback
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        logger.warning(
            "model %s is not symbolically traceable (%s); replacing its Conv2d modules "
            "in place, found by type", type(model).__name__, reason,
        )
        names = [aliases[0] for aliases in by_module.values()]
        return ConvSites(names=names, aliases=_aliases(by_module), traced=False,
                         trace_error=reason)

    called: list[str] = []
    called_ids: set[int] = set()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(node.target)
        if isinstance(module, nn.Conv2d) and id(module) not in called_ids:
            called_ids.add(id(module))
            called.append(node.target)
    # The first name fx used for a module may differ from named_modules()'s first.
    aliases = {}
    for name in called:
        others = [n for n in by_module[id(model.get_submodule(name))] if n != name]
        if others:
            aliases[name] = others
    unused = [names[0] for mid, names in by_module.items() if mid not in called_ids]
    return ConvSites(names=called, aliases=aliases, unused=unused)


def _aliases(by_module: dict[int, list[str]]) -> dict[str, list[str]]:
    return {names[0]: names[1:] for names in by_module.values() if len(names) > 1}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at qualified ``name`` (e.g. ``layer1.0.conv1``) to ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
