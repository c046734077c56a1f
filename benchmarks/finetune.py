"""Fine-tuning benchmark: how much accuracy distillation wins back, and at what cost.

Two cases, each converted and then fine-tuned with ``dwconvert.finetune`` (the original
model as teacher):

* ``fashion``: FashionResNet (``examples/fashion_mnist``), converted to 1/8 of the model's
  MACs with ``form="auto"`` calibrated on 512 training images, fine-tuned for up to 2
  epochs on 55,000 Fashion-MNIST training images. The best epoch is chosen on the other
  5,000 training images; the 10,000 test images are only used to report accuracy.
* ``mnist``: the pretrained CNN of ``digit-recognizer-py``, converted weight-only with
  ``form="dw-pw"`` to 1/8 of its convertible convs' MACs (the worst start), fine-tuned
  for 1 epoch on mnist5k images 0..3999 and measured on images 4000..4999.

Outputs (written atomically): ``OUT/finetune.md`` and ``OUT/finetune.json``; the Markdown
is also printed. Full run, from the repository root, on a quiet machine::

    python benchmarks/finetune.py

Quick check::

    python benchmarks/finetune.py --cases mnist --out /tmp/finetune-test
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that ``examples.fashion_mnist`` imports from a checkout
    sys.path.insert(0, str(ROOT))

import dwconvert  # noqa: E402
from dwconvert.files import write_atomically  # noqa: E402
from dwconvert.data import load_dataset, make_loader  # noqa: E402
from dwconvert.evaluate import evaluate  # noqa: E402

FASHION_SPEC = "fashion-mnist:/usr/share/datasets/fashion-mnist"
FASHION_WEIGHTS = ROOT / "examples/fashion_mnist/fashion_resnet.safetensors"
FASHION_NORM = {"mean": (0.2860,), "std": (0.3530,)}
TARGET_POINTS = 0.3  # within this many top-1 points of the original

# The recipes, stated once: what the benchmark runs is what the docs quote.
RECIPES = {
    "fashion": {"epochs": 2, "lr": 1e-3, "batch_size": 32},
    "mnist": {"epochs": 1, "lr": 0.01, "batch_size": 16},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="fashion,mnist",
                        help="comma-separated: fashion, mnist (default both)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--fashion-train-limit", type=int, default=None,
                        help="train Fashion on fewer images (a smoke test; not the benchmark)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks",
                        help="folder for finetune.md and finetune.json")
    return parser.parse_args(argv)


def top1(model: nn.Module, loader) -> float:
    return 100.0 * evaluate(model, loader).top1


def fashion_case(train_limit: int | None) -> dict[str, Any]:
    from safetensors.torch import load_file

    from examples.fashion_mnist.model import FashionResNet

    teacher = FashionResNet()
    teacher.load_state_dict(load_file(str(FASHION_WEIGHTS)))
    teacher.eval()
    train_all = load_dataset(FASHION_SPEC, split="train", **FASHION_NORM)
    order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(0)).tolist()
    train = Subset(train_all, order[:55_000][:train_limit])
    held_out = Subset(train_all, order[55_000:])
    test = make_loader(FASHION_SPEC, split="test", **FASHION_NORM)
    calibration = make_loader(FASHION_SPEC, split="train", shuffle=True, seed=0, batch_size=64,
                              limit=512, **FASHION_NORM)
    started = time.perf_counter()
    student = dwconvert.convert(teacher, budget=1 / 8, example_inputs=torch.randn(1, 1, 28, 28),
                                calibration=calibration)
    return {"name": "fashion", "teacher": teacher, "student": student, "train": train,
            "held_out": held_out, "test": test, "convert_seconds": time.perf_counter() - started,
            "conversion": "form auto, 1/8 of the model's MACs, calibrated on 512 training "
                          "images",
            "data": "train on 55,000 training images, best epoch chosen on the other 5,000, "
                    "accuracy on the 10,000 test images"}


def mnist_case() -> dict[str, Any]:
    from digit_recognizer.model import CNN

    spec = importlib.util.find_spec("digit_recognizer")
    weights = Path(spec.origin).parent / "models/handwriting_model.pth"
    teacher = CNN()
    teacher.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    teacher.eval()
    started = time.perf_counter()
    student = dwconvert.convert(teacher, form="dw-pw", budget=1 / 8,
                                budget_scope="convertible",
                                example_inputs=torch.randn(1, 1, 28, 28))
    images = load_dataset("mnist5k")
    held_out = Subset(images, range(4000, 5000))
    return {"name": "mnist", "teacher": teacher, "student": student,
            "train": Subset(images, range(4000)), "held_out": held_out,
            "test": make_loader("mnist5k", offset=4000),
            "convert_seconds": time.perf_counter() - started,
            "conversion": "form dw-pw, weight-only, 1/8 of the convertible convs' MACs",
            "data": "train on mnist5k images 0..3999, accuracy on images 4000..4999"}


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    recipe = RECIPES[case["name"]]
    teacher, student = case["teacher"], case["student"]
    original = top1(teacher, case["test"])
    converted = top1(student, case["test"])
    report = student.dwconvert_report
    logging.info("%s: original %.2f%%, converted %.2f%%; fine-tuning %s", case["name"],
                 original, converted, recipe)
    result = dwconvert.finetune(copy.deepcopy(student), teacher, case["train"],
                                val_data=case["held_out"], progress=sys.stderr.isatty(),
                                **recipe)
    tuned = top1(result.model, case["test"])
    return {
        "case": case["name"], "conversion": case["conversion"], "data": case["data"],
        "recipe": recipe, "convert_seconds": case["convert_seconds"],
        "mac_ratio": report.mac_ratio, "conv_mac_ratio": report.conv_mac_ratio,
        "param_ratio": report.param_ratio,
        "original_top1": original, "converted_top1": converted, "finetuned_top1": tuned,
        "points_lost": original - tuned, "target_points": TARGET_POINTS,
        "target_met": original - tuned <= TARGET_POINTS,
        "best_epoch": result.best_epoch,
        "epochs": [vars(r) for r in result.history],
    }


def markdown(results: list[dict[str, Any]], environment: dict[str, Any]) -> str:
    lines = ["# Fine-tuning benchmark", "",
             f"`python benchmarks/finetune.py`, torch {environment['torch']}, "
             f"{environment['threads']} threads, {environment['machine']}.", "",
             "| case | conversion | MACs kept | original | converted | fine-tuned | lost | "
             f"within {TARGET_POINTS} |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        kept = r["mac_ratio"] if r["case"] == "fashion" else r["conv_mac_ratio"]
        lines.append(
            f"| {r['case']} | {r['conversion']} | {kept:.3f} | {r['original_top1']:.2f}% | "
            f"{r['converted_top1']:.2f}% | {r['finetuned_top1']:.2f}% | "
            f"{r['points_lost']:+.2f} | {'yes' if r['target_met'] else '**no**'} |")
    for r in results:
        lines += ["", f"## {r['case']}", "", f"Data: {r['data']}. Recipe: "
                  + ", ".join(f"{k}={v}" for k, v in r["recipe"].items())
                  + f" (other settings at their defaults). Conversion took "
                  f"{r['convert_seconds']:.1f} s.", "",
                  "| epoch | train loss | held-out top-1 | agreement | seconds | images/s |",
                  "|---|---|---|---|---|---|"]
        for e in r["epochs"]:
            lines.append(f"| {e['epoch']} | {e['train_loss']:.4f} | "
                         f"{100 * e['val_top1']:.2f}% | {100 * e['val_agreement']:.2f}% | "
                         f"{e['seconds']:.1f} | {e['images_per_second']:.0f} |")
        lines.append("")
        lines.append(f"Kept epoch {r['best_epoch']}; test top-1 {r['finetuned_top1']:.2f}%.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(RECIPES)
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}: choose from {sorted(RECIPES)}")
    results = []
    for name in cases:
        case = fashion_case(args.fashion_train_limit) if name == "fashion" else mnist_case()
        results.append(run_case(case))
    environment = {"torch": torch.__version__, "threads": args.threads,
                   "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
                   "python": platform.python_version()}
    text = markdown(results, environment)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomically(args.out / "finetune.md", lambda tmp: Path(tmp).write_text(text))
    payload = json.dumps({"environment": environment, "results": results}, indent=2)
    write_atomically(args.out / "finetune.json", lambda tmp: Path(tmp).write_text(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
