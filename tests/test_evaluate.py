"""Tests of dwconvert.evaluate with models whose predictions are known in advance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dwconvert.evaluate import Comparison, Evaluation, compare_models, evaluate

CLASSES = 4


class ReadsClass(nn.Module):
    """Predicts the class written in input feature ``column`` (one-hot logits)."""

    def __init__(self, column: int) -> None:
        super().__init__()
        self.column = column
        self.child = nn.Dropout(0.5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        assert not self.training and not self.child.training
        assert not torch.is_grad_enabled()
        classes = inputs[:, self.column].long()
        return nn.functional.one_hot(classes, CLASSES).float()


def _data(count: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with two predicted-class columns, and labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    guess_a = torch.where(torch.rand(count, generator=generator) < 0.7, labels,
                          torch.randint(0, CLASSES, (count,), generator=generator))
    guess_b = torch.where(torch.rand(count, generator=generator) < 0.5, labels,
                          torch.randint(0, CLASSES, (count,), generator=generator))
    return torch.stack([guess_a, guess_b], dim=1).float(), labels


def _batches(inputs: torch.Tensor, labels: torch.Tensor | None, size: int = 8) -> list:
    """Splits data into (inputs, labels) batches, or bare input batches."""
    chunks = zip(inputs.split(size), labels.split(size)) if labels is not None else None
    return list(chunks) if chunks is not None else list(inputs.split(size))


def test_evaluate_exact_accuracy() -> None:
    inputs, labels = _data()
    result = evaluate(ReadsClass(0), _batches(inputs, labels))
    expected = (inputs[:, 0].long() == labels).sum().item() / 50
    assert isinstance(result, Evaluation)
    assert result.count == 50
    assert result.top1 == expected
    assert 0.5 < result.top1 < 1.0


def test_evaluate_with_a_dataloader() -> None:
    inputs, labels = _data(count=33)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, labels), batch_size=10
    )
    result = evaluate(ReadsClass(1), loader, progress=True)
    expected = (inputs[:, 1].long() == labels).sum().item() / 33
    assert result == Evaluation(top1=pytest.approx(expected), count=33)


def test_compare_models_exact_accuracy_and_agreement() -> None:
    inputs, labels = _data(count=61, seed=2)
    comparison = compare_models(ReadsClass(0), ReadsClass(1), _batches(inputs, labels, 16))
    a, b = inputs[:, 0].long(), inputs[:, 1].long()
    assert isinstance(comparison, Comparison)
    assert comparison.original.top1 == pytest.approx((a == labels).sum().item() / 61)
    assert comparison.converted.top1 == pytest.approx((b == labels).sum().item() / 61)
    assert comparison.agreement == pytest.approx((a == b).sum().item() / 61)
    assert comparison.original.count == comparison.converted.count == 61


def test_identical_models_agree_fully() -> None:
    inputs, labels = _data()
    model = ReadsClass(0)
    comparison = compare_models(model, model, _batches(inputs, labels))
    assert comparison.agreement == 1.0
    assert comparison.original == comparison.converted


def test_unlabelled_batches_give_nan_top1_but_agreement() -> None:
    inputs, _ = _data(count=20)
    unlabelled = _batches(inputs, None)
    assert isinstance(unlabelled[0], torch.Tensor)
    result = evaluate(ReadsClass(0), unlabelled)
    assert math.isnan(result.top1) and result.count == 20
    comparison = compare_models(ReadsClass(0), ReadsClass(1), unlabelled)
    assert math.isnan(comparison.original.top1) and math.isnan(comparison.converted.top1)
    expected = (inputs[:, 0] == inputs[:, 1]).float().mean().item()
    assert comparison.agreement == pytest.approx(expected)


def test_training_mode_is_restored() -> None:
    inputs, labels = _data()
    training, frozen = ReadsClass(0), ReadsClass(1)
    frozen.eval()
    frozen.child.train()
    compare_models(training, frozen, _batches(inputs, labels))
    assert training.training and training.child.training
    assert not frozen.training and frozen.child.training


def test_training_mode_restored_after_an_error() -> None:
    model = ReadsClass(0)
    with pytest.raises(ValueError, match="logits"):
        evaluate(model, [torch.zeros(2, 2, 3)])
    assert model.training


def test_empty_loader() -> None:
    result = evaluate(ReadsClass(0), [])
    assert result.count == 0 and math.isnan(result.top1)
