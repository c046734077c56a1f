"""Progress bars for the steps that can take more than a few seconds.

Every long loop of dwconvert (factorizing layer by layer, calibration passes,
evaluation) goes through :func:`progress`. Bars are drawn on stderr, only when
stderr is a terminal, unless :func:`set_progress` says otherwise: the command
line turns them off with ``--quiet`` and on with ``--progress``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")

_enabled: bool | None = None  # None: draw bars when stderr is a terminal


def set_progress(enabled: bool | None) -> None:
    """Show progress bars always (``True``), never (``False``), or on a terminal (``None``)."""
    global _enabled
    _enabled = enabled


def progress_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return sys.stderr is not None and sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, *, total: int | None = None,
             unit: str = "it") -> Iterable[T]:
    """``iterable``, with a bar named ``desc`` while it is consumed (when bars are on)."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr,
                disable=not progress_enabled(), dynamic_ncols=True)


@contextlib.contextmanager
def logging_above_bars() -> Iterator[None]:
    """Route log lines that go to the terminal through tqdm, so they do not break a bar.

    Only the root logger's handlers that write to stdout or stderr are replaced;
    where there are none (logging configured elsewhere), nothing changes.
    """
    console = any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
                  for h in logging.getLogger().handlers)
    if not console:
        yield
        return
    with logging_redirect_tqdm():
        yield
