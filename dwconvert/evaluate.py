"""Top-1 accuracy of a classifier, and agreement between an original and a converted model."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .modes import eval_mode
from .progress import progress as progress_bar


@dataclass(frozen=True)
class Evaluation:
    """Accuracy of one model on a data set.

    Attributes:
        top1: fraction (0..1) of labelled images whose top-1 prediction is the label; NaN if
            the data had no labels.
        count: number of images evaluated.
    """

    top1: float
    count: int


@dataclass(frozen=True)
class Comparison:
    """Accuracy of an original and a converted model on the same images.

    Attributes:
        original: evaluation of the original model.
        converted: evaluation of the converted model.
        agreement: fraction (0..1) of images where both models make the same top-1 prediction.
    """

    original: Evaluation
    converted: Evaluation
    agreement: float


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> Evaluation:
    """Measures a classifier's top-1 accuracy.

    The model is moved to ``device`` (and left there) and run in eval mode under
    :func:`torch.inference_mode`; its previous training mode is restored afterwards.

    Args:
        model: a module mapping an image batch to logits of shape (batch, classes).
        loader: yields ``(images, labels)`` pairs, or bare image batches without labels.
        device: where to run the model.
        progress: show a progress bar; by default, as :func:`dwconvert.progress.set_progress`
            says (on a terminal only).

    Returns:
        Top-1 accuracy and image count.
    """
    tallies = tally([model], loader, device, progress, "evaluate")
    return Evaluation(_fraction(tallies.correct[0], tallies.labelled), tallies.count)


def compare_models(
    original: nn.Module,
    converted: nn.Module,
    loader: Iterable[Any],
    *,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> Comparison:
    """Evaluates two models and their top-1 agreement in one pass over the data.

    Both models are moved to ``device`` and run as in :func:`evaluate`.

    Args:
        original: the model before conversion.
        converted: the model after conversion.
        loader: yields ``(images, labels)`` pairs, or bare image batches without labels.
        device: where to run the models.
        progress: show a progress bar; by default, as :func:`dwconvert.progress.set_progress`
            says (on a terminal only).

    Returns:
        Both evaluations and the fraction of images on which their predictions agree.
    """
    tallies = tally([original, converted], loader, device, progress, "compare")
    return Comparison(
        original=Evaluation(_fraction(tallies.correct[0], tallies.labelled), tallies.count),
        converted=Evaluation(_fraction(tallies.correct[1], tallies.labelled), tallies.count),
        agreement=_fraction(tallies.agreeing, tallies.count),
    )


@dataclass
class Tallies:
    """Running counts over the batches: images, labelled images, correct per model, agreeing."""

    count: int
    labelled: int
    correct: list[int]
    agreeing: int


def tally(
    models: list[nn.Module],
    loader: Iterable[Any],
    device: str | torch.device,
    progress: bool | None,
    description: str,
) -> Tallies:
    """Runs every model on every batch and counts correct and agreeing predictions."""
    tallies = Tallies(count=0, labelled=0, correct=[0] * len(models), agreeing=0)
    models = [model.to(device) for model in models]
    batches = progress_bar(loader, description, unit="batch") if progress is None else \
        tqdm(loader, desc=description, unit="batch", disable=not progress)
    with eval_mode(*models), torch.inference_mode():
        for batch in batches:
            inputs, labels = split_batch(batch)
            inputs = inputs.to(device)
            predictions = [_predict(model, inputs) for model in models]
            tallies.count += inputs.shape[0]
            if len(predictions) > 1:
                tallies.agreeing += int((predictions[0] == predictions[1]).sum())
            if labels is not None:
                labels = torch.as_tensor(labels).to(device).view(-1)
                tallies.labelled += labels.shape[0]
                for index, predicted in enumerate(predictions):
                    tallies.correct[index] += int((predicted == labels).sum())
    return tallies


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Separates a loader item into inputs and labels (None if it has no labels)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) >= 2 else None)
    raise TypeError(
        f"loader item of type {type(batch).__name__}: expected a tensor or (inputs, labels)"
    )


def _predict(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Returns the top-1 class index per image (inputs cast to the model's precision)."""
    param = next(model.parameters(), None)
    if param is not None and param.is_floating_point() and inputs.is_floating_point():
        inputs = inputs.to(param.dtype)
    logits = model(inputs)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model output {shape}: expected logits of shape (batch, classes)")
    return logits.argmax(dim=1)


def _fraction(part: int, whole: int) -> float:
    """Returns part / whole, or NaN when whole is zero."""
    return part / whole if whole else math.nan
