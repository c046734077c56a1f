"""What a fine-tuning run is made of: its settings, the optimiser and schedule they build,
and the records it returns."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.01}


@dataclass(frozen=True)
class FinetuneConfig:
    """What a fine-tuning run does; every field has a default that works untuned.

    Attributes:
        epochs: passes over the training data.
        batch_size: images per step and process (a DataLoader's own batch size wins).
        optimizer: ``adamw`` or ``sgd`` (with Nesterov momentum).
        lr: peak learning rate; None for 1e-3 (adamw) or 0.01 (sgd).
        weight_decay: decoupled for adamw, L2 for sgd.
        momentum: sgd momentum.
        warmup: fraction of all steps over which the learning rate rises linearly from 0;
            it then falls to 0 along a cosine.
        temperature: softmax temperature of the distillation term.
        kd_weight: weight of the distillation term.
        ce_weight: weight of the cross-entropy term, used only for batches with labels.
        feature_weight: weight of matching each converted layer's output to the
            teacher's at the same place; 0 turns it off.
        freeze_bn: keep BatchNorm running statistics as they are (affine weights still
            train); otherwise they follow the training batches.
        clip_grad_norm: largest gradient norm; None for no clipping.
        seed: seeds the data order and the random state, so runs repeat.
        amp: mixed precision (bfloat16 where supported, else float16 with loss scaling);
            None for on with CUDA, off on CPU.
        checkpoint_every: steps between resume-file writes (with an ``output``).
        eval_batch_size: images per evaluation batch.
    """

    epochs: int = 1
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup: float = 0.05
    temperature: float = 2.0
    kd_weight: float = 1.0
    ce_weight: float = 0.5
    feature_weight: float = 0.0
    freeze_bn: bool = False
    clip_grad_norm: float | None = 1.0
    seed: int = 0
    amp: bool | None = None
    checkpoint_every: int = 100
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        checks = [
            ("epochs", self.epochs >= 1, "at least 1"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("optimizer", self.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
            ("lr", self.lr is None or self.lr > 0, "positive"),
            ("weight_decay", self.weight_decay >= 0, "at least 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("warmup", 0 <= self.warmup < 1, "a fraction in [0, 1)"),
            ("temperature", self.temperature > 0, "positive"),
            ("kd_weight", self.kd_weight >= 0, "at least 0"),
            ("ce_weight", self.ce_weight >= 0, "at least 0"),
            ("feature_weight", self.feature_weight >= 0, "at least 0"),
            ("clip_grad_norm", self.clip_grad_norm is None or self.clip_grad_norm > 0,
             "positive or None"),
            ("checkpoint_every", self.checkpoint_every >= 1, "at least 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, "at least 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"fine-tuning {name}={getattr(self, name)!r} should be "
                                 f"{expected}")
        if self.kd_weight == self.ce_weight == self.feature_weight == 0:
            raise ValueError("kd_weight, ce_weight and feature_weight are all 0: nothing to "
                             "learn from; keep kd_weight > 0")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: mean training loss, held-out accuracy, and time.

    ``val_top1`` is NaN without labelled held-out data; ``val_agreement`` is the fraction of
    held-out images on which student and teacher predict the same class.
    """

    epoch: int
    train_loss: float
    val_top1: float
    val_agreement: float
    seconds: float
    images_per_second: float


@dataclass
class FinetuneResult:
    """The outcome of :func:`finetune`.

    Attributes:
        model: the fine-tuned model (the caller's own module), holding the best weights,
            in eval mode.
        history: one record per epoch, resumed epochs included.
        best_epoch: the epoch whose weights ``model`` holds (1-based), or None if no epoch
            ran.
        start_top1, start_agreement: the student before fine-tuning, on the held-out data.
        teacher_top1: the teacher on the held-out data.
        world_size: number of processes that trained.
    """

    model: nn.Module
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None
    start_top1: float = math.nan
    start_agreement: float = math.nan
    teacher_top1: float = math.nan
    world_size: int = 1

    @property
    def best(self) -> EpochRecord | None:
        return next((r for r in self.history if r.epoch == self.best_epoch), None)


def build_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.peak_lr, momentum=config.momentum,
                               nesterov=config.momentum > 0, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.peak_lr, weight_decay=config.weight_decay)


def build_schedule(optimizer, config: FinetuneConfig, total_steps: int):
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to 0."""
    warmup_steps = int(config.warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def amp_dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    enabled = config.amp if config.amp is not None else device.type == "cuda"
    if not enabled:
        return None
    if device.type != "cuda":
        logger.warning("mixed precision is only used on CUDA; training in full precision")
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
