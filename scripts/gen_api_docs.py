"""Write docs/api.md from the signatures and docstrings of dwconvert's public API.

    python scripts/gen_api_docs.py          # rewrite docs/api.md
    python scripts/gen_api_docs.py --check  # exit 1 if docs/api.md is out of date
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "api.md"

HEADER = """# Python API reference

Generated from the docstrings by `python scripts/gen_api_docs.py`; do not edit by hand.
The names in the first sections are importable from `dwconvert` itself; the others
from the module named in their heading.
"""

# (section, [dotted names]) in the order a reader meets them.
SECTIONS = [
    ("Converting", ["dwconvert.convert", "dwconvert.BudgetError"]),
    ("Saving and loading", ["dwconvert.save", "dwconvert.load"]),
    ("Looking before converting", ["dwconvert.inspect", "dwconvert.InspectionReport",
                                   "dwconvert.ConvInspection", "dwconvert.RankError"]),
    ("Reports", ["dwconvert.ConversionReport", "dwconvert.LayerRecord"]),
    ("One layer at a time", ["dwconvert.FactorizedConv2d", "dwconvert.DwPwConv2d",
                             "dwconvert.PwDwConv2d", "dwconvert.CPConv2d"]),
    ("Sweeps", ["dwconvert.sweep.sweep", "dwconvert.sweep.SweepResult",
                "dwconvert.sweep.SweepPoint", "dwconvert.sweep.median_latencies",
                "dwconvert.plot.plot_sweep"]),
    ("Export", ["dwconvert.export.export_onnx", "dwconvert.export.export_torchscript",
                "dwconvert.export.ExportCheck", "dwconvert.export.ExportError"]),
    ("Data and evaluation", ["dwconvert.data.load_dataset", "dwconvert.data.make_loader",
                             "dwconvert.evaluate.evaluate", "dwconvert.evaluate.compare_models"]),
    ("Progress bars", ["dwconvert.progress.set_progress"]),
]


def _resolve(dotted: str):
    import importlib

    module_name, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def _entry(dotted: str) -> str:
    obj = _resolve(dotted)
    kind = "class" if inspect.isclass(obj) else "def"
    try:
        signature = str(inspect.signature(obj))
    except (TypeError, ValueError):
        signature = "(...)"
    name = dotted.rsplit(".", 1)[-1]
    text = [f"### `{dotted}`\n", f"```python\n{kind} {name}{signature}\n```\n"]
    doc = inspect.getdoc(obj)
    if doc:
        text.append(f"```text\n{doc}\n```\n")
    if inspect.isclass(obj):
        for member, value in vars(obj).items():
            if member.startswith("_") or not (inspect.isfunction(value)
                                              or isinstance(value, (property, classmethod))):
                continue
            func = value.fget if isinstance(value, property) else getattr(value, "__func__",
                                                                          value)
            doc = inspect.cleandoc(func.__doc__ or "")  # its own, not nn.Module's
            if not doc:
                continue
            label = f"{name}.{member}" + ("" if isinstance(value, property) else "()")
            text.append(f"- `{label}`: {doc.splitlines()[0]}\n")
    return "\n".join(text)


def render() -> str:
    sys.path.insert(0, str(ROOT))
    parts = [HEADER]
    for section, names in SECTIONS:
        parts.append(f"## {section}\n")
        parts.extend(_entry(name) for name in names)
    return "\n".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET} is out of date: run python scripts/gen_api_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
