"""Switching models to eval mode and back, module by module."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode; on exit restore every submodule's own flag.

    ``model.train(flag)`` would set all submodules alike and so undo, say, a
    BatchNorm that the user froze in a model that is otherwise training.
    """
    saved = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training
