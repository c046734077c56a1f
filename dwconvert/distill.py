"""Distillation losses: a converted student learns from the original model, its teacher.

For logits ``s`` (student) and ``t`` (teacher) of shape (batch, classes) and temperature
``T``::

    kd   = T^2 * KL(softmax(t / T) || softmax(s / T))         (mean over the batch)
    ce   = cross-entropy(s, labels)                            (only when labels exist)
    feat = mean over matched layers of ||f_s - f_t||^2 / ||f_t||^2
    loss = kd_weight * kd + ce_weight * ce + feature_weight * feat

``T^2`` keeps the gradient of ``kd`` on the scale of ``ce`` whatever ``T``. ``feat`` compares
the output of each converted layer with the output of the original conv it replaced, at
the same place in the teacher, so every replacement gets its own signal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fold import FoldedBatchNorm2d
from .layers import FactorizedConv2d


@dataclass(frozen=True)
class LossTerms:
    """The parts of one batch's loss (detached floats, for logging)."""

    total: float
    kd: float
    ce: float | None
    feature: float | None


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch; logits (B, K)."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def matched_layers(student: nn.Module, teacher: nn.Module) -> list[tuple[str, nn.Module,
                                                                         nn.Module]]:
    """Each converted layer of ``student`` with the teacher's module that gives its output.

    That is the teacher's conv of the same name, or, where a BatchNorm was folded into the
    conv (``fold_bn=True``), the teacher's BatchNorm after it.
    """
    teacher_modules = dict(teacher.named_modules())
    folded = {module.conv: name for name, module in student.named_modules()
              if isinstance(module, FoldedBatchNorm2d)}
    pairs = []
    for name, module in student.named_modules():
        target = folded.get(name, name)
        if isinstance(module, FactorizedConv2d) and target in teacher_modules:
            pairs.append((name, module, teacher_modules[target]))
    return pairs


class FeatureRecorder:
    """Keeps the output of given modules during one forward pass (forward hooks)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        self._handles = [module.register_forward_hook(self._hook(index))
                         for index, module in enumerate(modules)]

    def _hook(self, index: int):
        def record(_module, _inputs, output):
            self.outputs[index] = output
        return record

    def clear(self) -> None:
        self.outputs = [None] * len(self.outputs)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@contextlib.contextmanager
def recording(modules: list[nn.Module]) -> Iterator[FeatureRecorder]:
    recorder = FeatureRecorder(modules)
    try:
        yield recorder
    finally:
        recorder.remove()


def feature_loss(student: list[torch.Tensor | None],
                 teacher: list[torch.Tensor | None]) -> torch.Tensor:
    """Mean over layers of the relative squared error ``||f_s - f_t||^2 / ||f_t||^2``."""
    terms = []
    for mine, target in zip(student, teacher):
        if mine is None or target is None:  # a layer the forward pass did not reach
            continue
        target = target.detach().float()
        energy = target.pow(2).sum().clamp_min(1e-12)
        terms.append((mine.float() - target).pow(2).sum() / energy)
    if not terms:
        raise ValueError("feature matching found no converted layer that ran in both models; "
                         "set feature_weight=0")
    return torch.stack(terms).mean()
