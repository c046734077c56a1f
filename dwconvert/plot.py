"""The figure of a sweep: accuracy and latency against MACs, Pareto fronts marked.

Needs matplotlib (``pip install 'dwconvert[plot]'``); nothing else in dwconvert does.
"""

from __future__ import annotations

import os
from pathlib import Path

from .files import write_atomically
from .sweep import SweepResult

INSTALL_HINT = "plots need matplotlib: pip install 'dwconvert[plot]' (or matplotlib>=3.7)"


def require_matplotlib():
    """The pyplot module on a file-only backend, or an ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    matplotlib.use("Agg")  # write files; never open a window
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(result: SweepResult, path: str | os.PathLike, title: str | None = None, *,
               overwrite: bool = True) -> Path:
    """Draw ``result`` to ``path`` (PNG by suffix), atomically.

    With ``overwrite=False`` an existing ``path`` raises ``FileExistsError``.

    Left: top-1 against MACs (when the sweep had data). Right: latency against
    MACs. Points on each panel's Pareto front are joined by a line; the original
    is drawn as a star.
    """
    plt = require_matplotlib()
    with_top1 = result.original.top1 is not None
    panels = 2 if with_top1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    axes = axes[0]
    specs = [("latency_ms", "pareto_latency", "latency of a batch-1 forward (ms)")]
    if with_top1:
        specs.insert(0, ("top1", "pareto_top1", "top-1 accuracy (%)"))
    for ax, (field, front, label) in zip(axes, specs):
        scale = 100 if field == "top1" else 1
        xs = [p.macs / 1e6 for p in result.points]
        ys = [scale * getattr(p, field) for p in result.points]
        # Rings over the star, so that a conversion that kept everything stays visible.
        ax.scatter(xs[:1], ys[:1], marker="*", s=200, color="tab:red", zorder=3,
                   label="original")
        ax.scatter(xs[1:], ys[1:], facecolors="none", edgecolors="tab:blue", linewidths=1.5,
                   zorder=4, label="converted")
        for p, x, y in zip(result.points, xs, ys):
            # A conversion that kept everything sits on the original: label it below.
            below = p.budget is not None and (x, y) == (xs[0], ys[0])
            ax.annotate("original" if p.budget is None else f"{p.budget:g}", (x, y),
                        textcoords="offset points", xytext=(6, -12 if below else 4),
                        fontsize=8)
        on = sorted((x, y) for p, x, y in zip(result.points, xs, ys) if getattr(p, front))
        ax.plot([x for x, _ in on], [y for _, y in on], color="tab:green", linestyle="--",
                zorder=2, label="Pareto front")
        ax.margins(x=0.15, y=0.1)  # room for the labels right of the last points
        ax.set_xlabel("MACs per image (millions)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if with_top1:
        axes[0].set_title(f"top-1 on {result.data}" if result.data else "top-1", fontsize=10)
    axes[-1].set_title(f"median of {result.repeats} runs, {result.threads} thread(s)",
                       fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120),
                                replace=overwrite)
    finally:
        plt.close(fig)
