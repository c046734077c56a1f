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

import contextlib
import copy
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from . import distill, distributed, resume
from .checkpoint import load, save
from .evaluate import split_batch, tally
from .files import OutputExists
from .resume import resume_path
from .training import (
    EpochRecord,
    FinetuneConfig,
    FinetuneResult,
    amp_dtype,
    build_optimizer,
    build_schedule,
)

logger = logging.getLogger(__name__)


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
        OutputExists: (a ``FileExistsError``) ``output`` exists, and neither ``overwrite``
            nor ``resume``.
        FileNotFoundError: ``resume`` without a resume file.
    """
    config = replace(config or FinetuneConfig(), **options)
    paths = _check_paths(output, resume, overwrite)
    with distributed.start(device) as context, _terminate_as_interrupt():
        run = _Run(model, teacher, data, val_data, config, context, paths,
                   dict(arch=arch, arch_kwargs=arch_kwargs, extra=extra or {}), progress)
        return run.execute(resume)


@dataclass(frozen=True)
class _Paths:
    output: Path
    state: Path
    new: bool  # output did not exist and must not be replaced by another's file


def _check_paths(output, resume: bool, overwrite: bool) -> _Paths | None:
    if output is None:
        if resume:
            raise ValueError("resume=True needs the output= of the run to resume")
        return None
    paths = _Paths(Path(output), resume_path(output),
                   new=not resume and not overwrite and not Path(output).exists())
    if resume and not paths.state.is_file():
        raise FileNotFoundError(
            f"no resume file {str(paths.state)!r}: the run never started, or it completed "
            f"(then {str(paths.output)!r} holds its result); start again without resume"
        )
    if not resume and paths.output.exists() and not overwrite:
        raise OutputExists(paths.output, resume=paths.state.is_file())
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
        # Replaced freely once this run has written it (or when asked to).
        self._output_is_ours = paths is None or not paths.new
        self.saving = saving  # arch, arch_kwargs and extra metadata of the output
        self.show_progress = progress and context.is_main
        self.train_set, self.collate, self.batch_size = _unwrap(data, config.batch_size)
        self.val = None if val_data is None else _shard_loader(val_data, context, config)
        self.steps_per_epoch = math.ceil(
            len(_sampler(self.train_set, context, config.seed)) / self.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError("the training data is empty")
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_schedule(self.optimizer, config,
                                        self.steps_per_epoch * config.epochs)
        self.amp_dtype = amp_dtype(config, context.device)
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
                    self._rng_at_step = _rng_state(self.context.device)
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
                        self._rng_at_step = _rng_state(self.context.device)
                        self._save_state()
            except KeyboardInterrupt:
                # The weights are those of the last completed step, unless the interrupt
                # came in the few instructions between the optimizer's step and the count.
                self._interrupted()
                raise
            finally:
                bar.close()
        self._rng_at_step = _rng_state(self.context.device)
        self._save_state()  # an interrupt during evaluation then loses no training

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
                 arch_kwargs=self.saving["arch_kwargs"], overwrite=self._output_is_ours,
                 extra={**self.saving["extra"], "finetune": finetuned})
            self._output_is_ours = True
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

    def _settings(self) -> dict[str, Any]:
        """The recipe, and what else fixes the schedule: a resumed run must match it."""
        return {**asdict(self.config),
                "training_images": len(self.train_set), "batch_size": self.batch_size,
                "held_out_images": None if self.val is None else len(self.val.dataset),
                "steps_per_epoch": self.steps_per_epoch, "device_type": self.context.device.type,
                "amp_dtype": str(self.amp_dtype)}

    def _state(self) -> dict[str, Any]:
        return {
            "config": self._settings(),
            "world_size": self.context.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": getattr(self, "_rng_at_step", _rng_state(self.context.device)),
            "progress": asdict(self.progress),
        }

    def _save_state(self) -> None:
        if self.paths is None or not self.context.is_main:
            return
        resume.write_state(self.paths.state, self._state())
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
        state = resume.read_state(self.paths.state, self._settings(),
                                  self.context.world_size, self.context.device)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"the run in {str(self.paths.state)!r} does not fit this model "
                             f"({first}); resume with the same converted model") from None
        self.progress = _Progress(**state["progress"])
        self._saved_rng = state["rng"]
        logger.info("resuming at epoch %d, step %d", self.progress.epoch + 1,
                    self.progress.step)

    def _restore_rng(self) -> None:
        if self.context.is_main and hasattr(self, "_saved_rng"):
            torch.set_rng_state(self._saved_rng["cpu"].cpu())
            if "cuda" in self._saved_rng and self.context.device.type == "cuda":
                torch.cuda.set_rng_state(self._saved_rng["cuda"].cpu(), self.context.device)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (torchrun stopping its workers, a batch system's preemption) acts as Ctrl-C,
    so the run writes its resume file before it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
