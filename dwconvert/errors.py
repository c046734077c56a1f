"""The wording of errors raised by the code dwconvert runs (a model's forward, torch.load)."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or the name of its type if it has none.

    Errors from PyTorch often run to many lines; one is what fits in a one-line report.
    """
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__
