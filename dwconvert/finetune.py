"""Fine-tuning a converted model by distillation from the original, on one process or many.

Steps of :func:`finetune`:

1. join the ``torchrun`` process group if there is one (:mod:`dwconvert.distributed`);
2. build a seeded, sharded sampler over the training data, AdamW or SGD with a linear
   warm-up and cosine decay, and restore everything from the resume file if asked;
3. evaluate the student and the teacher on the held-out data once, for the record;
4. each epoch: train with the distillation loss (:mod:`dwconvert.distill`), give every
   process rank 0's BatchNorm statistics, evaluate, keep the best weights;
5. return the model holding the best weights, and what happened (:class:`FinetuneResult`).

Files (rank 0 only, each written to a temporary file and renamed): ``output`` holds the best
model as a converted checkpoint (:func:`dwconvert.save`), and ``<output stem>.resume.pt``
holds the state of the run (weights, optimizer, schedule, epoch and step, random state)
every ``checkpoint_every`` steps, at each epoch's end and when the run is interrupted. It
is read back with ``weights_only=True`` and removed when the run completes.

Known limits: every process needs the resume file at the same path (multi-node runs need a
shared folder); a model with parameters that some forward passes do not use cannot run
under DistributedDataParallel as set up here; with several processes, BatchNorm statistics
are those of rank 0's shard.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from . import distill, distributed
from .checkpoint import load, save, write_atomically
from .evaluate import split_batch, tally

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.01}
STATE_VERSION = 1


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


@dataclass
class _Progress:
    """Where the run is; all of it goes into the resume file."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed within the current epoch
    best_score: float = -math.inf
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)
    start: dict = field(default_factory=dict)
    loss_sum: float = 0.0  # over the current epoch's completed steps
    images: int = 0
    seconds: float = 0.0


def resume_path(output: str | os.PathLike) -> Path:
    """The resume file kept beside ``output``: ``ft.safetensors`` -> ``ft.resume.pt``."""
    output = Path(output)
    return output.with_name(output.stem + ".resume.pt")


def finetune(
    model: nn.Module,
    teacher: nn.Module,
    data: Dataset | DataLoader,
    *,
    val_data: Dataset | DataLoader | None = None,
    config: FinetuneConfig | None = None,
    output: str | os.PathLike | None = None,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = False,
    **options: Any,
) -> FinetuneResult:
    """Trains a converted model to match the original model it came from.

    The student (``model``) is trained in place. Under ``torchrun`` every process runs this
    same call; gradients are averaged by DistributedDataParallel, each process sees its own
    shard of ``data``, and only rank 0 writes files.

    Args:
        model: the converted model (the student).
        teacher: the original model; it is run in eval mode and never changed.
        data: training images: a Dataset of ``(image, label)`` pairs or of bare images
            (unlabelled data trains on the distillation term alone), or a DataLoader, whose
            dataset, batch size and collate function are used under a seeded sampler.
        val_data: held-out images, evaluated before training and after each epoch; the
            weights of the best epoch (top-1, or agreement with the teacher without labels)
            are kept. Without it the last epoch's weights are kept.
        config: the recipe; ``**options`` override its fields (``epochs=2, lr=3e-4``).
        output: where to keep the best model as a converted checkpoint; enables the
            resume file. None keeps everything in memory.
        arch, arch_kwargs: how :func:`dwconvert.load` rebuilds the architecture, as for
            :func:`dwconvert.save`.
        extra: more JSON-serialisable information for the output's metadata.
        resume: continue the run recorded in ``output``'s resume file.
        overwrite: replace an existing ``output`` when starting a new run.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; None picks CUDA when available.
        progress: show a tqdm progress bar with the loss and images per second.

    Returns:
        The model with its best weights and the per-epoch record.

    Raises:
        ValueError: a config value out of range, or a resume file from another recipe.
        FileExistsError: ``output`` exists, and neither ``overwrite`` nor ``resume``.
        FileNotFoundError: ``resume`` without a resume file.
    """
    config = replace(config or FinetuneConfig(), **options)
    paths = _check_paths(output, resume, overwrite)
    with distributed.start(device) as context:
        run = _Run(model, teacher, data, val_data, config, context, paths,
                   dict(arch=arch, arch_kwargs=arch_kwargs, extra=extra or {}), progress)
        return run.execute(resume)


@dataclass(frozen=True)
class _Paths:
    output: Path
    state: Path


def _check_paths(output, resume: bool, overwrite: bool) -> _Paths | None:
    if output is None:
        if resume:
            raise ValueError("resume=True needs the output= of the run to resume")
        return None
    paths = _Paths(Path(output), resume_path(output))
    if resume and not paths.state.is_file():
        raise FileNotFoundError(
            f"no resume file {str(paths.state)!r}: the run never started, or it completed "
            f"(then {str(paths.output)!r} holds its result); start again without resume"
        )
    if not resume and paths.output.exists() and not overwrite:
        raise FileExistsError(f"{str(paths.output)!r} exists; pass overwrite=True (CLI: --force) "
                              "to replace it, or resume=True (--resume) to continue its run")
    return paths


class _Run:
    """One fine-tuning run on this process."""

    def __init__(self, model, teacher, data, val_data, config: FinetuneConfig,
                 context: distributed.Context, paths: _Paths | None, saving: dict[str, Any],
                 progress: bool) -> None:
        self.model = model.to(context.device)
        self.teacher = teacher.to(context.device).eval()
        self.config = config
        self.context = context
        self.paths = paths
        self.saving = saving  # arch, arch_kwargs and extra metadata of the output
        self.show_progress = progress and context.is_main
        self.train_set, self.collate, self.batch_size = _unwrap(data, config.batch_size)
        self.val = None if val_data is None else _shard_loader(val_data, context, config)
        self.steps_per_epoch = math.ceil(
            len(_sampler(self.train_set, context, config.seed)) / self.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError("the training data is empty")
        self.optimizer = _optimizer(model, config)
        self.scheduler = _schedule(self.optimizer, config, self.steps_per_epoch * config.epochs)
        self.amp_dtype = _amp_dtype(config, context.device)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and context.device.type == "cuda")
        self.progress = _Progress()
        self.layers = distill.matched_layers(model, teacher) if config.feature_weight else []
        if config.feature_weight and not self.layers:
            raise ValueError("feature_weight > 0, but the student has no converted layer with "
                             "the same name in the teacher; set feature_weight=0")

    # -- the run --------------------------------------------------------------------------

    def execute(self, resume: bool) -> FinetuneResult:
        if resume:
            self._load_state()
        if not self.progress.start and self.val is not None:
            self.progress.start = self._evaluate(with_teacher=True)
            logger.info("before fine-tuning: top-1 %.2f%%, teacher %.2f%%, agreement %.2f%%",
                        100 * self.progress.start["top1"], 100 * self.progress.start["teacher"],
                        100 * self.progress.start["agreement"])
        torch.manual_seed(self.config.seed + self.context.rank)
        if resume:
            self._restore_rng()
        trainee = self.model
        if self.context.distributed:
            ids = [self.context.device.index] if self.context.device.type == "cuda" else None
            trainee = DistributedDataParallel(self.model, device_ids=ids)
        best_state = None
        while self.progress.epoch < self.config.epochs:
            self._train_epoch(trainee)
            distributed.broadcast_buffers(self.context, self.model)
            record = self._finish_epoch()
            if self._is_best(record):
                best_state = self._keep_best(record)
            self.progress.epoch += 1
            self.progress.step = 0
            self.progress.loss_sum = self.progress.images = self.progress.seconds = 0.0
            self._save_state()
        return self._result(best_state)

    def _train_epoch(self, trainee: nn.Module) -> None:
        epoch, first = self.progress.epoch, self.progress.step
        loader = self._train_loader(epoch, first)
        self._train_mode()
        bar = tqdm(total=self.steps_per_epoch, initial=first, disable=not self.show_progress,
                   desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="step")
        started = time.perf_counter() - self.progress.seconds
        with distill.recording([s for _, s, _ in self.layers]) as mine, \
                distill.recording([t for _, _, t in self.layers]) as theirs:
            batches = iter(loader)
            try:
                for _ in range(first, self.steps_per_epoch):
                    self._rng_at_step = torch.get_rng_state()
                    terms, count = self._step(trainee, next(batches), mine, theirs)
                    self.progress.step += 1
                    self.progress.loss_sum += terms.total * count
                    self.progress.images += count
                    self.progress.seconds = time.perf_counter() - started
                    bar.update(1)
                    bar.set_postfix(loss=f"{terms.total:.4f}",
                                    img_s=f"{self.progress.images / self.progress.seconds:.0f}")
                    if self.progress.step % self.config.checkpoint_every == 0 and \
                            self.progress.step < self.steps_per_epoch:
                        self._rng_at_step = torch.get_rng_state()
                        self._save_state()
            except KeyboardInterrupt:
                # The weights are those of the last completed step, unless the interrupt
                # came in the few instructions between the optimizer's step and the count.
                self._interrupted()
                raise
            finally:
                bar.close()
        self._rng_at_step = torch.get_rng_state()

    def _step(self, trainee, batch, mine, theirs) -> tuple[distill.LossTerms, int]:
        inputs, labels = split_batch(batch)
        inputs = inputs.to(self.context.device, dtype=_float_dtype(self.model))
        config = self.config
        with torch.autocast(self.context.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            with torch.no_grad():
                teacher_logits = self.teacher(inputs)
            logits = trainee(inputs)
            kd = distill.kd_loss(logits, teacher_logits, config.temperature)
            loss = config.kd_weight * kd
            ce = feature = None
            if labels is not None and config.ce_weight:
                labels = torch.as_tensor(labels).to(self.context.device).view(-1)
                ce = nn.functional.cross_entropy(logits.float(), labels)
                loss = loss + config.ce_weight * ce
            if config.feature_weight:
                feature = distill.feature_loss(mine.outputs, theirs.outputs)
                loss = loss + config.feature_weight * feature
        mine.clear()
        theirs.clear()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if config.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), config.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        terms = distill.LossTerms(*(None if t is None else float(t.detach())
                                    for t in (loss, kd, ce, feature)))
        return terms, inputs.shape[0]

    def _finish_epoch(self) -> EpochRecord:
        progress = self.progress
        loss, images, seconds = distributed.sum_across(
            self.context, [progress.loss_sum, progress.images, progress.seconds])
        seconds /= self.context.world_size
        scores = self._evaluate(with_teacher=False)
        record = EpochRecord(epoch=progress.epoch + 1, train_loss=loss / max(images, 1),
                             val_top1=scores.get("top1", math.nan),
                             val_agreement=scores.get("agreement", math.nan),
                             seconds=seconds, images_per_second=images / max(seconds, 1e-9))
        progress.history.append(asdict(record))
        logger.info("epoch %d/%d: loss %.4f, held-out top-1 %.2f%%, agreement %.2f%%, "
                    "%.1f s (%.0f images/s)", record.epoch, self.config.epochs,
                    record.train_loss, 100 * record.val_top1, 100 * record.val_agreement,
                    record.seconds, record.images_per_second)
        return record

    def _is_best(self, record: EpochRecord) -> bool:
        if self.val is None:
            return True  # nothing to choose by: keep the latest
        score = record.val_top1 if not math.isnan(record.val_top1) else record.val_agreement
        return score > self.progress.best_score

    def _keep_best(self, record: EpochRecord) -> dict[str, torch.Tensor]:
        if self.val is not None:
            self.progress.best_score = (record.val_top1 if not math.isnan(record.val_top1)
                                        else record.val_agreement)
        self.progress.best_epoch = record.epoch
        if self.paths is not None and self.context.is_main:
            finetuned = {"epoch": record.epoch, "record": asdict(record),
                         "config": asdict(self.config)}
            save(self.model, self.paths.output, arch=self.saving["arch"],
                 arch_kwargs=self.saving["arch_kwargs"], overwrite=True,
                 extra={**self.saving["extra"], "finetune": finetuned})
            logger.info("kept epoch %d in %s", record.epoch, self.paths.output)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _result(self, best_state) -> FinetuneResult:
        if best_state is not None:
            self.model.load_state_dict(best_state)
        elif self.progress.best_epoch is not None and self.paths is not None:
            # Resumed after the best epoch: its weights are in the output file.
            best = load(self.paths.output, model=copy.deepcopy(self.teacher))
            self.model.load_state_dict(best.state_dict())
        self.model.eval()
        distributed.barrier(self.context)
        if self.paths is not None and self.context.is_main and self.paths.state.exists():
            self.paths.state.unlink()
        start = self.progress.start
        return FinetuneResult(
            model=self.model,
            history=[EpochRecord(**r) for r in self.progress.history],
            best_epoch=self.progress.best_epoch,
            start_top1=start.get("top1", math.nan),
            start_agreement=start.get("agreement", math.nan),
            teacher_top1=start.get("teacher", math.nan),
            world_size=self.context.world_size,
        )

    # -- pieces ---------------------------------------------------------------------------

    def _train_loader(self, epoch: int, first_step: int) -> DataLoader:
        sampler = _sampler(self.train_set, self.context, self.config.seed)
        sampler.set_epoch(epoch)
        indices = list(sampler)[first_step * self.batch_size:]
        # Its own generator, so that starting the loader leaves the global random state alone
        # (a resumed run then draws the same dropout masks).
        return DataLoader(self.train_set, batch_size=self.batch_size,
                          sampler=_Indices(indices), collate_fn=self.collate,
                          generator=torch.Generator().manual_seed(self.config.seed))

    def _train_mode(self) -> None:
        self.model.train()
        if self.config.freeze_bn:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _evaluate(self, with_teacher: bool) -> dict[str, float]:
        """Top-1 of the student (and teacher) and their agreement, over all shards."""
        if self.val is None:
            return {}
        tallies = tally([self.model, self.teacher], self.val, self.context.device,
                        progress=False, description="evaluate")
        count, labelled, mine, theirs, agreeing = distributed.sum_across(
            self.context, [tallies.count, tallies.labelled, *tallies.correct, tallies.agreeing])
        scores = {"top1": mine / labelled if labelled else math.nan,
                  "agreement": agreeing / max(count, 1)}
        if with_teacher:
            scores["teacher"] = theirs / labelled if labelled else math.nan
        return scores

    def _state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "world_size": self.context.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": getattr(self, "_rng_at_step", torch.get_rng_state()),
            "progress": asdict(self.progress),
        }

    def _save_state(self) -> None:
        if self.paths is None or not self.context.is_main:
            return
        state = self._state()
        write_atomically(self.paths.state, lambda tmp: torch.save(state, tmp))
        logger.debug("resume state at epoch %d step %d in %s", self.progress.epoch,
                     self.progress.step, self.paths.state)

    def _interrupted(self) -> None:
        if self.paths is not None:
            self._save_state()
            if self.context.is_main:
                logger.warning("interrupted at epoch %d, step %d of %d; continue with "
                               "resume=True (CLI: --resume)", self.progress.epoch + 1,
                               self.progress.step, self.steps_per_epoch)

    def _load_state(self) -> None:
        state = torch.load(self.paths.state, map_location=self.context.device,
                           weights_only=True)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{str(self.paths.state)!r} is not a resume file of this dwconvert")
        saved = state["config"]
        changed = [f.name for f in fields(FinetuneConfig)
                   if saved.get(f.name) != getattr(self.config, f.name)]
        if changed:
            raise ValueError(
                f"the run in {str(self.paths.state)!r} used other settings ("
                + ", ".join(f"{n}={saved.get(n)!r}, now {getattr(self.config, n)!r}"
                            for n in changed) + "); resume with the same settings")
        if state["world_size"] != self.context.world_size:
            raise ValueError(f"the run in {str(self.paths.state)!r} had {state['world_size']} "
                             f"processes, this one {self.context.world_size}; resume with the "
                             "same number")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = _Progress(**state["progress"])
        self._saved_rng = state["rng"]
        logger.info("resuming at epoch %d, step %d", self.progress.epoch + 1,
                    self.progress.step)

    def _restore_rng(self) -> None:
        if self.context.is_main and hasattr(self, "_saved_rng"):
            torch.set_rng_state(self._saved_rng.cpu())


class _Indices(Sampler[int]):
    """Yields a fixed list of indices (one epoch's shard, less what was already done)."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _sampler(dataset: Dataset, context: distributed.Context, seed: int) -> DistributedSampler:
    # One process is a world of one: the same seeded order either way.
    return DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank,
                              shuffle=True, seed=seed)


def _unwrap(data: Dataset | DataLoader, batch_size: int):
    """(dataset, collate function, batch size) of a Dataset or a DataLoader."""
    if isinstance(data, DataLoader):
        if data.batch_size is None:
            raise ValueError("the training DataLoader has batch_size=None; give it a batch size "
                             "or pass its dataset")
        return data.dataset, data.collate_fn, data.batch_size
    return data, default_collate, batch_size


def _shard_loader(data: Dataset | DataLoader, context: distributed.Context,
                  config: FinetuneConfig) -> DataLoader:
    """This process's share of the held-out data: every world_size-th image, in order."""
    dataset, collate, _ = _unwrap(data, config.eval_batch_size)
    shard = Subset(dataset, range(context.rank, len(dataset), context.world_size))
    return DataLoader(shard, batch_size=config.eval_batch_size, collate_fn=collate)


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.peak_lr, momentum=config.momentum,
                               nesterov=config.momentum > 0, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.peak_lr, weight_decay=config.weight_decay)


def _schedule(optimizer, config: FinetuneConfig, total_steps: int):
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to 0."""
    warmup_steps = int(config.warmup * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _amp_dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    enabled = config.amp if config.amp is not None else device.type == "cuda"
    if not enabled:
        return None
    if device.type != "cuda":
        logger.warning("mixed precision is only used on CUDA; training in full precision")
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
