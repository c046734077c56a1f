"""Draw docs/forms.png: the chain of layers each factorized form puts in place of a conv.

    python scripts/draw_forms.py   # needs matplotlib (pip install 'dwconvert[plot]')
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

TARGET = Path(__file__).resolve().parent.parent / "docs" / "forms.png"

# (title, [(layer, detail, colour)]): M inputs, N outputs, g groups, rank r or R.
ROWS = [
    ("original", [("Conv2d k x k", "M -> N, groups g\nN·(M/g)·k² per pixel", "#bbbbbb")]),
    ("dw-pw", [("depthwise k x k", "M -> M·r, groups M\nstride, padding", "#8ecae6"),
               ("pointwise 1x1", "M·r -> N, groups g\n+ bias", "#ffb703")]),
    ("pw-dw", [("pointwise 1x1", "M -> N·r, groups g\nat input size", "#ffb703"),
               ("grouped k x k", "N·r -> N, groups N\nstride, padding, + bias", "#8ecae6")]),
    ("cp", [("pointwise 1x1", "M -> g·R, groups g\nat input size", "#ffb703"),
            ("depthwise k x k", "g·R -> g·R, groups g·R\nstride, padding", "#8ecae6"),
            ("pointwise 1x1", "g·R -> N, groups g\n+ bias", "#ffb703")]),
]


def main() -> None:
    fig, ax = plt.subplots(figsize=(10, 5.2))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, len(ROWS))
    ax.axis("off")
    width, height, gap = 2.3, 0.62, 0.45
    for row, (title, layers) in enumerate(ROWS):
        y = len(ROWS) - row - 0.5
        ax.text(0.1, y, title, fontsize=12, fontweight="bold", va="center")
        x = 1.4
        ax.annotate("", xy=(x, y), xytext=(x - 0.35, y),
                    arrowprops=dict(arrowstyle="->", color="#444444"))
        for name, detail, colour in layers:
            box = FancyBboxPatch((x, y - height / 2), width, height,
                                 boxstyle="round,pad=0.02", facecolor=colour,
                                 edgecolor="#333333")
            ax.add_patch(box)
            ax.text(x + width / 2, y + 0.13, name, ha="center", va="center", fontsize=10,
                    fontweight="bold")
            ax.text(x + width / 2, y - 0.13, detail, ha="center", va="center", fontsize=7.5)
            x += width
            ax.annotate("", xy=(x + gap - 0.05, y), xytext=(x + 0.05, y),
                        arrowprops=dict(arrowstyle="->", color="#444444"))
            x += gap
    ax.set_title("A k x k conv (M inputs, N outputs, g groups) and its three factorized forms;"
                 "\nonly the k x k layer keeps stride, padding and dilation", fontsize=10)
    fig.tight_layout()
    fig.savefig(TARGET, dpi=110)
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
