"""Folding eval-mode BatchNorm into the conv before it, for inference.

Before: ``... -> Conv2d(M, N, k) -> BatchNorm2d(N) -> ...``
After:  ``... -> Conv2d(M, N, k, bias=True) -> FoldedBatchNorm2d (identity) -> ...``

With ``s = gamma / sqrt(running_var + eps)`` per output channel, the folded conv
has ``W' = W * s`` and ``b' = (b - running_mean) * s + beta`` (``b = 0`` for a
conv without bias, which gets a new bias parameter). The result equals the
unfolded model in eval mode only: the BatchNorm's running statistics are gone,
so a folded model cannot be trained with BatchNorm any more.

A pair is folded only where it is unambiguous in the fx graph: the conv (a plain
``nn.Conv2d``) is called once and its output goes to nothing but the BatchNorm
(a plain ``nn.BatchNorm2d`` in eval mode with running statistics), which is
also called once. Anything else is left as it is, and said why.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from .graph import _ConvLeafTracer, replace_module

logger = logging.getLogger(__name__)


class FoldedBatchNorm2d(nn.Identity):
    """What stands where a BatchNorm2d was folded into the conv ``conv`` before it."""

    def __init__(self, conv: str = "") -> None:
        super().__init__()
        self.conv = conv

    def extra_repr(self) -> str:
        return f"folded into {self.conv!r}"


@dataclass(frozen=True)
class Fold:
    """One BatchNorm folded into one conv, by qualified names."""

    conv: str
    batchnorm: str


@dataclass
class FoldResult:
    """The pairs folded, and the BatchNorms that were not folded with the reason."""

    folds: list[Fold]
    kept: dict[str, str]
    traced: bool = True


def fold_batchnorm(model: nn.Module) -> FoldResult:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a conv, in place."""
    norms = {name for name, m in model.named_modules() if type(m) is nn.BatchNorm2d}
    try:
        graph = _ConvLeafTracer().trace(model)
    except Exception as err:  # untraceable: the pairs cannot be found safely
        reason = f"the model is not symbolically traceable ({type(err).__name__})"
        logger.warning("fold_bn: %s; no BatchNorm folded", reason)
        return FoldResult([], {name: reason for name in sorted(norms)}, traced=False)

    calls = Counter(id(model.get_submodule(node.target)) for node in graph.nodes
                    if node.op == "call_module")
    folds, kept = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or type(model.get_submodule(node.target)) \
                is not nn.BatchNorm2d:
            continue
        bn = model.get_submodule(node.target)
        reason = _why_not(model, node, bn, calls)
        if reason:
            kept[node.target] = reason
            logger.info("fold_bn: not folding %s: %s", node.target, reason)
            continue
        conv_name = node.args[0].target
        fold_into(model.get_submodule(conv_name), bn)
        for alias, module in list(model.named_modules(remove_duplicate=False)):
            if module is bn:
                replace_module(model, alias, FoldedBatchNorm2d(conv_name))
        folds.append(Fold(conv_name, node.target))
        logger.info("folded %s into %s", node.target, conv_name)
    for name in norms - {f.batchnorm for f in folds} - set(kept):
        kept[name] = "never called by forward"
    return FoldResult(folds, kept)


def _why_not(model: nn.Module, node: torch.fx.Node, bn: nn.BatchNorm2d, calls) -> str:
    if bn.training:
        return "in training mode (call model.eval() first)"
    if not bn.track_running_stats or bn.running_mean is None:
        return "has no running statistics"
    if calls[id(bn)] > 1:
        return "called more than once"
    source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not isinstance(source, torch.fx.Node) or source.op != "call_module" \
            or type(model.get_submodule(source.target)) is not nn.Conv2d:
        return "its input is not the output of a plain nn.Conv2d"
    conv = model.get_submodule(source.target)
    if len(source.users) > 1:
        return f"the output of {source.target} is also used elsewhere"
    if calls[id(conv)] > 1:
        return f"{source.target} is called more than once"
    if conv.out_channels != bn.num_features:
        return f"{source.target} has {conv.out_channels} outputs, not {bn.num_features}"
    return ""


def fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``W' = W * s``, ``b' = (b - mean) * s + beta``, computed in float64."""
    with torch.no_grad():
        var = bn.running_var.to(torch.float64)
        scale = (var + bn.eps).rsqrt()  # (N,)
        if bn.affine:
            scale = scale * bn.weight.to(torch.float64)
        shift = -bn.running_mean.to(torch.float64) * scale
        if bn.affine:
            shift = shift + bn.bias.to(torch.float64)
        if conv.bias is not None:
            shift = shift + conv.bias.to(torch.float64) * scale
        weight = conv.weight.to(torch.float64) * scale[:, None, None, None]
        # copy_ keeps the weight's strides, so its memory format survives.
        conv.weight.copy_(weight)
        if conv.bias is None:
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype),
                                     requires_grad=conv.weight.requires_grad)
        else:
            conv.bias.copy_(shift)


def restore_structure(model: nn.Module, folded: dict[str, str]) -> None:
    """Make a freshly built model take a folded state_dict: ``batchnorm name -> conv name``.

    Each BatchNorm becomes a :class:`FoldedBatchNorm2d` and each conv gets a bias
    (values come with the state_dict); no weights are computed.
    """
    for bn_name, conv_name in folded.items():
        conv = model.get_submodule(conv_name)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{conv_name!r} is {type(conv).__name__}, not a Conv2d")
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                                 device=conv.weight.device))
        model.get_submodule(bn_name)  # raises AttributeError if the model has none
        replace_module(model, bn_name, FoldedBatchNorm2d(conv_name))


def folded_layers(model: nn.Module) -> dict[str, str]:
    """``batchnorm name -> conv name`` of every folded BatchNorm in ``model``."""
    return {name: m.conv for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, FoldedBatchNorm2d)}
