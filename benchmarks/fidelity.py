"""Fidelity benchmark: accuracy of converted CNNs against the MACs they keep.

Converts two trained CNNs with every dwconvert method at several MAC budgets and
with the peer TensorLy-Torch (CP ``FactorizedConv``), evaluates each result
without fine-tuning, times the conversion of torchvision's ResNet-50 in fresh
subprocesses, and checks the project's fidelity targets.

Models:

* ``fashion``: ``examples.fashion_mnist.model:FashionResNet`` (BatchNorm), evaluated
  on the 10,000 Fashion-MNIST test images, calibrated on 512 training images.
* ``mnist``: the pretrained CNN of the wheel ``digit-recognizer-py``, calibrated on
  images 0..511 of ``mnist5k`` and evaluated on images 512..4999.

Budgets are fractions of the MACs of the convertible convs (every plain, non-1x1,
non-depthwise ``nn.Conv2d``), i.e. ``budget_scope="convertible"``.

Outputs (written atomically): ``OUT/fidelity.md``, ``OUT/fidelity.json``,
``OUT/fidelity.png``. The Markdown report is also printed to stdout.

Full run, from the repository root (after ``pip install -e '.[bench]'``)::

    python benchmarks/fidelity.py

A quick check::

    python benchmarks/fidelity.py --models fashion --budgets 1/4 --methods cp \\
        --limit 500 --skip-resnet50 --out /tmp/fidelity-test
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib.util
import json
import logging
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so that ``examples.fashion_mnist`` imports from a checkout
    sys.path.insert(0, str(ROOT))

import dwconvert  # noqa: E402
from dwconvert.costs import measure  # noqa: E402
from dwconvert.data import make_loader  # noqa: E402
from dwconvert.evaluate import evaluate  # noqa: E402
from dwconvert.files import write_atomically, write_text  # noqa: E402

logger = logging.getLogger("fidelity")

FASHION_SPEC = "fashion-mnist:/usr/share/datasets/fashion-mnist"
FASHION_WEIGHTS = ROOT / "examples/fashion_mnist/fashion_resnet.safetensors"
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
CALIBRATION_IMAGES = 512
MNIST_REFERENCE_TOP1 = 99.70  # the original CNN on all 5,000 mnist5k images (README)
DEFAULT_BUDGETS = "1/2,1/3,1/4,1/6,1/8"
MODELS = ("fashion", "mnist")
PEER = "tltorch-cp"
RESNET50_BUDGET = 1 / 3
RESNET50_CALIB_IMAGES, RESNET50_CALIB_BATCH = 64, 16
RESNET50_CHILD_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Method:
    """One way of converting a model (a row of the tables).

    Attributes:
        name: the label used on the command line and in the tables.
        form: dwconvert's ``form`` argument (unused by the peer).
        calibrated: pass the calibration images to ``convert``.
        recalibrate_bn: pass ``recalibrate_bn=True`` (needs BatchNorm layers).
        peer: this row is TensorLy-Torch, not dwconvert.
    """

    name: str
    form: str = "auto"
    calibrated: bool = False
    recalibrate_bn: bool = False
    peer: bool = False


METHODS = {m.name: m for m in (
    Method("dw-pw", form="dw-pw"),
    Method("pw-dw", form="pw-dw"),
    Method("cp", form="cp"),
    Method("auto"),
    Method("auto+calib", calibrated=True),
    Method("auto+calib+bn", calibrated=True, recalibrate_bn=True),
    Method(PEER, form="cp", peer=True),
)}
AUTO_METHODS = ("auto", "auto+calib")  # compared with the peer


Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Case:
    """A trained model with its evaluation and calibration images.

    Attributes:
        name: ``fashion`` or ``mnist``.
        title: a human-readable name for tables and plots.
        model: the original model, in eval mode.
        evaluation: the images the accuracies are measured on.
        calibration: the images given to data-aware conversions.
        example_input: a batch of one image, at which MACs are measured.
        notes: extra facts for the report (e.g. a reference accuracy).
    """

    name: str
    title: str
    model: nn.Module
    evaluation: Batches
    calibration: Batches
    example_input: torch.Tensor
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ConvShape:
    """Input and output sizes of one call of a conv (batch of one)."""

    in_h: int
    in_w: int
    out_h: int
    out_w: int


# --------------------------------------------------------------------------- command line


def parse_budgets(text: str) -> list[float]:
    """``"1/2,0.333"`` -> ``[0.5, 0.333]``; each budget must lie in (0, 1]."""
    budgets = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = float(Fraction(item))
        except (ValueError, ZeroDivisionError) as error:
            raise argparse.ArgumentTypeError(f"budget {item!r} is not a number") from error
        if not 0 < value <= 1:
            raise argparse.ArgumentTypeError(f"budget {item!r} must lie in (0, 1]")
        budgets.append(value)
    return budgets


def parse_choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated subset of ``allowed``."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}: choose from {', '.join(allowed)}")
        return names

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(
        description="Accuracy of dwconvert-converted CNNs against MAC budget, "
                    "vs TensorLy-Torch, plus ResNet-50 conversion time.")
    parser.add_argument("--models", type=parse_choices(MODELS), default=list(MODELS),
                        help="comma-separated models (default: fashion,mnist)")
    parser.add_argument("--budgets", type=parse_budgets, default=parse_budgets(DEFAULT_BUDGETS),
                        help=f"kept fractions of the convertible convs' MACs, fractions or "
                             f"decimals (default: {DEFAULT_BUDGETS})")
    parser.add_argument("--methods", type=parse_choices(list(METHODS)), default=list(METHODS),
                        help=f"comma-separated methods (default: {','.join(METHODS)})")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate on at most this many images (quick runs)")
    parser.add_argument("--skip-resnet50", action="store_true",
                        help="skip the ResNet-50 conversion-time runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks",
                        help="output folder (default: docs/benchmarks)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--verbose", action="store_true", help="log dwconvert's per-layer steps")
    parser.add_argument("--resnet50-child", choices=("weights", "calibrated"),
                        help=argparse.SUPPRESS)  # internal: one timed run in a fresh process
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def budget_label(budget: float) -> str:
    """``1/3`` for budgets that are reciprocals of small integers, else ``0.3``."""
    inverse = 1 / budget
    if abs(inverse - round(inverse)) < 0.02 and round(inverse) <= 64:
        return f"1/{round(inverse)}"
    return f"{budget:.3g}"


# --------------------------------------------------------------------------- data and models


def materialise(loader: Iterable[Any], limit: int | None = None) -> Batches:
    """Reads a loader into memory as ``(images, labels)`` batches, at most ``limit`` images."""
    batches, count = [], 0
    for images, labels in loader:
        if limit is not None:
            images, labels = images[: limit - count], labels[: limit - count]
        batches.append((images, labels))
        count += len(images)
        if limit is not None and count >= limit:
            break
    return batches


def image_count(batches: Batches) -> int:
    """Number of images in a list of batches."""
    return sum(len(images) for images, _ in batches)


def load_fashion(limit: int | None) -> Case:
    """FashionResNet with the Fashion-MNIST test set and 512 shuffled training images."""
    from safetensors.torch import load_file

    from examples.fashion_mnist.model import FashionResNet

    model = FashionResNet()
    model.load_state_dict(load_file(str(FASHION_WEIGHTS)))
    model.eval()
    norm = {"mean": FASHION_MEAN, "std": FASHION_STD}
    test = make_loader(FASHION_SPEC, split="test", limit=limit, **norm)
    train = make_loader(FASHION_SPEC, split="train", shuffle=True, seed=0, batch_size=64, **norm)
    return Case(name="fashion", title="FashionResNet on Fashion-MNIST", model=model,
                evaluation=materialise(test), calibration=materialise(train, CALIBRATION_IMAGES),
                example_input=torch.randn(1, 1, 28, 28),
                notes={"evaluation": "Fashion-MNIST test images",
                       "calibration": f"{CALIBRATION_IMAGES} training images (seeded shuffle)"})


def mnist_weights() -> Path:
    """Path of the pretrained weights inside the digit-recognizer-py wheel."""
    spec = importlib.util.find_spec("digit_recognizer")
    if spec is None or spec.origin is None:
        raise SystemExit("digit-recognizer-py is missing: pip install -e '.[bench]'")
    return Path(spec.origin).parent / "models/handwriting_model.pth"


def load_mnist(limit: int | None) -> Case:
    """The digit-recognizer CNN, calibrated on mnist5k[0:512], evaluated on mnist5k[512:]."""
    from digit_recognizer.model import CNN

    model = CNN()
    model.load_state_dict(torch.load(mnist_weights(), map_location="cpu", weights_only=True))
    model.eval()
    case = Case(name="mnist", title="digit-recognizer CNN on mnist5k", model=model,
                evaluation=materialise(make_loader("mnist5k", offset=CALIBRATION_IMAGES,
                                                   limit=limit)),
                calibration=materialise(make_loader("mnist5k", limit=CALIBRATION_IMAGES)),
                example_input=torch.randn(1, 1, 28, 28),
                notes={"evaluation": f"mnist5k images {CALIBRATION_IMAGES} and up",
                       "calibration": f"mnist5k images 0..{CALIBRATION_IMAGES - 1}"})
    all_images = materialise(make_loader("mnist5k"))
    case.notes["original_top1_all_5000"] = accuracy(model, all_images)
    return case


def load_case(name: str, limit: int | None) -> Case:
    """Loads one benchmark model with its data."""
    return {"fashion": load_fashion, "mnist": load_mnist}[name](limit)


def accuracy(model: nn.Module, batches: Batches) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * evaluate(model, batches).top1


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has any BatchNorm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# --------------------------------------------------------------------------- MAC counting


def convertible_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """The convs dwconvert may convert: plain ``nn.Conv2d``, not 1x1, not depthwise."""
    return {name: m for name, m in model.named_modules()
            if type(m) is nn.Conv2d and m.kernel_size != (1, 1)
            and not m.groups == m.in_channels > 1}


def conv_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, ConvShape]:
    """Input/output spatial sizes of every ``nn.Conv2d`` at ``x`` (one call each)."""
    shapes: dict[str, ConvShape] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            def hook(_module, inputs, output, name=name):
                shapes[name] = ConvShape(*inputs[0].shape[-2:], *output.shape[-2:])
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


class FunctionalMacCounter(TorchFunctionMode):
    """Counts MACs per image of every ``F.conv1d``/``F.conv2d``/``F.linear`` call.

    ``dwconvert.costs.measure`` hooks ``nn.Conv2d`` and ``nn.Linear`` modules; the
    peer's ``FactorizedConv`` calls the functional convs directly, so its MACs are
    counted here instead, at the level of the function calls.
    """

    CONVS = (torch.conv1d, torch.conv2d)

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.CONVS or func is torch.nn.functional.linear:
            weight = args[1] if len(args) > 1 else (kwargs or {})["weight"]
            per_output = weight[0].numel() if func in self.CONVS else weight.shape[-1]
            self.macs += out[0].numel() * per_output
        return out


def functional_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs per image of ``model`` at ``x``, counted over functional conv/linear calls."""
    with torch.no_grad(), FunctionalMacCounter() as counter:
        model(x)
    return counter.macs


def conv_mac_ratio(report: dwconvert.ConversionReport, convertible: Iterable[str]) -> float:
    """MACs kept by the convertible convs: converted ones at their new cost, kept ones whole."""
    names = set(convertible)
    before = after = 0
    for record in report.layers:
        if record.name in names:
            before += record.macs_before
            after += record.macs_after if record.converted else record.macs_before
    return after / before if before else math.nan


def forms_chosen(report: dwconvert.ConversionReport, convertible: Iterable[str]) -> dict:
    """How many convertible convs got each form (``kept`` for those left unchanged)."""
    names = set(convertible)
    counts = collections.Counter(
        (record.form if record.converted else "kept")
        for record in report.layers if record.name in names)
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- dwconvert runs


def lowest_reachable(error: Exception) -> float | None:
    """The lowest reachable budget quoted in a ``BudgetError`` message."""
    match = re.search(r"lowest reachable budget is ([0-9.]+)", str(error))
    return float(match.group(1)) if match else None


def run_dwconvert(case: Case, method: Method, budget: float, original_top1: float) -> dict:
    """Converts ``case.model`` with one dwconvert method at one budget and evaluates it."""
    calibration = case.calibration if method.calibrated else None
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        small = dwconvert.convert(case.model, form=method.form, budget=budget,
                                  budget_scope="convertible", example_inputs=case.example_input,
                                  calibration=calibration, calib_samples=CALIBRATION_IMAGES,
                                  recalibrate_bn=method.recalibrate_bn)
    except dwconvert.BudgetError as error:
        return {"status": "unreachable", "min_reachable": lowest_reachable(error),
                "message": str(error)}
    seconds = time.perf_counter() - start
    report = small.dwconvert_report
    convertible = convertible_convs(case.model)
    top1 = accuracy(small, case.evaluation)
    return {"status": "ok", "top1": top1, "drop": original_top1 - top1,
            "mac_ratio": report.mac_ratio, "conv_mac_ratio": conv_mac_ratio(report, convertible),
            "param_ratio": report.param_ratio, "seconds": seconds,
            "forms": forms_chosen(report, convertible), "mac_count": "dwconvert report"}


# --------------------------------------------------------------------------- the peer


def peer_macs_per_rank(conv: nn.Conv2d, shape: ConvShape) -> int:
    """MACs of one CP rank of TensorLy-Torch's factorized (``cp_conv``) 2D conv.

    ``tltorch.functional.convolution.cp_conv`` runs four convs per rank ``R``:
    a 1x1 ``M -> R`` at the input size, a ``(kh, 1)`` depthwise conv (stride and
    padding along the height only) giving ``Hout x Win``, a ``(1, kw)`` depthwise
    conv giving ``Hout x Wout``, and a 1x1 ``R -> N``. Per image that is
    ``R * (Hin*Win*M + Hout*Win*kh + Hout*Wout*(kw + N))``.
    """
    kh, kw = conv.kernel_size
    return (shape.in_h * shape.in_w * conv.in_channels + shape.out_h * shape.in_w * kh
            + shape.out_h * shape.out_w * (kw + conv.out_channels))


def conv_macs(conv: nn.Conv2d, shape: ConvShape) -> int:
    """MACs per image of a plain conv."""
    kh, kw = conv.kernel_size
    return shape.out_h * shape.out_w * conv.out_channels * conv.in_channels // conv.groups * kh * kw


def peer_targets(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[nn.Conv2d, ConvShape]]:
    """The convs the peer replaces, with their sizes.

    Every plain 3x3 conv with groups 1, except those with one input channel: a
    CP of such a stem cannot save much and costs the peer most of its accuracy,
    so it is kept, as a user of the peer would (its MACs still count).
    """
    shapes = conv_shapes(model, x)
    return {name: (m, shapes[name]) for name, m in model.named_modules()
            if type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.groups == 1
            and m.in_channels > 1 and name in shapes}


def convertible_conv_macs(case: Case) -> int:
    """MACs per image of every convertible conv of ``case.model`` (as dwconvert sees them)."""
    shapes = conv_shapes(case.model, case.example_input)
    return sum(conv_macs(conv, shapes[name])
               for name, conv in convertible_convs(case.model).items() if name in shapes)


def peer_fraction(targets: dict, budget: float, convertible_macs: int) -> float:
    """The fraction of each target's MACs that meets ``budget`` of all convertible MACs."""
    replaced = sum(conv_macs(conv, shape) for conv, shape in targets.values())
    kept = convertible_macs - replaced
    return (budget * convertible_macs - kept) / replaced


def peer_ranks(targets: dict[str, tuple[nn.Conv2d, ConvShape]], fraction: float
               ) -> dict[str, int]:
    """Per conv, the largest CP rank whose MACs stay within ``fraction`` of the conv's MACs."""
    return {name: int(fraction * conv_macs(conv, shape) // peer_macs_per_rank(conv, shape))
            for name, (conv, shape) in targets.items()}


def peer_minimum(targets: dict[str, tuple[nn.Conv2d, ConvShape]],
                 convertible_macs: int) -> float:
    """The lowest budget of all convertible MACs the peer can meet (rank 1 everywhere)."""
    replaced = sum(conv_macs(conv, shape) for conv, shape in targets.values())
    lowest = sum(peer_macs_per_rank(conv, shape) for conv, shape in targets.values())
    return (convertible_macs - replaced + lowest) / convertible_macs


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replaces the submodule at qualified ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def peer_convert(model: nn.Module, targets: dict, ranks: dict[str, int]) -> nn.Module:
    """A copy of ``model`` with each target conv replaced by a CP ``FactorizedConv``."""
    import tltorch

    small = copy.deepcopy(model)
    for name in targets:
        conv = small.get_submodule(name)
        with warnings.catch_warnings():
            # TensorLy's SVD initialisation notes each rank above a mode's size; expected.
            warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
            factorized = tltorch.FactorizedConv.from_conv(
                conv, rank=ranks[name], factorization="cp", implementation="factorized",
                decompose_weights=True)
        set_submodule(small, name, factorized)
    return small.eval()


def run_peer(case: Case, budget: float, original_top1: float, model_macs: int) -> dict:
    """Converts ``case.model`` with TensorLy-Torch at one budget and evaluates it."""
    targets = peer_targets(case.model, case.example_input)
    convertible = convertible_conv_macs(case)
    ranks = peer_ranks(targets, peer_fraction(targets, budget, convertible))
    if min(ranks.values()) < 1:
        low = [name for name, rank in ranks.items() if rank < 1]
        return {"status": "unreachable", "min_reachable": peer_minimum(targets, convertible),
                "message": f"rank 1 exceeds the budget for {', '.join(low)}"}
    torch.manual_seed(0)
    start = time.perf_counter()
    small = peer_convert(case.model, targets, ranks)
    seconds = time.perf_counter() - start
    before = sum(conv_macs(conv, shape) for conv, shape in targets.values())
    formula = sum(ranks[name] * peer_macs_per_rank(conv, shape)
                  for name, (conv, shape) in targets.items())
    measured = functional_macs(small, case.example_input)
    expected = model_macs - before + formula
    if measured != expected:
        logger.warning("%s: peer MACs counted %d but the formula gives %d", case.name,
                       measured, expected)
    top1 = accuracy(small, case.evaluation)
    params = sum(p.numel() for p in small.parameters())
    kept = convertible - before
    return {"status": "ok", "top1": top1, "drop": original_top1 - top1,
            "mac_ratio": measured / model_macs,
            "conv_mac_ratio": (kept + formula) / convertible,
            "param_ratio": params / sum(p.numel() for p in case.model.parameters()),
            "seconds": seconds, "forms": {"tltorch-cp": len(targets)}, "ranks": ranks,
            "mac_count": "F.conv counter" if measured == expected else "F.conv counter "
                         f"(formula differs: {expected})",
            "formula_matches_counter": measured == expected}


# --------------------------------------------------------------------------- one model


def check_counter(case: Case) -> int:
    """Model MACs by ``costs.measure``; fails if the functional counter disagrees."""
    hooks = measure(case.model, (case.example_input,)).macs
    counted = functional_macs(case.model, case.example_input)
    if hooks != counted:
        raise RuntimeError(f"{case.name}: F.conv counter {counted} != costs.measure {hooks}")
    return hooks


def run_one(case: Case, method: Method, budget: float, original_top1: float,
            model_macs: int) -> dict:
    """One method at one budget; an unexpected failure is recorded, not raised."""
    try:
        if method.peer:
            return run_peer(case, budget, original_top1, model_macs)
        return run_dwconvert(case, method, budget, original_top1)
    except Exception as error:  # noqa: BLE001 - one failed run must not end a long benchmark
        logger.exception("%s %s at %s failed", case.name, method.name, budget_label(budget))
        return {"status": "error", "message": f"{type(error).__name__}: {error}"}


def benchmark_case(case: Case, methods: Sequence[str], budgets: Sequence[float]) -> dict:
    """Every method at every budget on one model."""
    original_top1 = accuracy(case.model, case.evaluation)
    model_macs = check_counter(case)
    logger.info("%s: original top-1 %.2f%% on %d images, %d MACs", case.name, original_top1,
                image_count(case.evaluation), model_macs)
    runs = []
    for name in methods:
        method = METHODS[name]
        for budget in budgets:
            if method.recalibrate_bn and not has_batchnorm(case.model):
                result = {"status": "n/a", "message": "the model has no BatchNorm"}
            else:
                result = run_one(case, method, budget, original_top1, model_macs)
            result.update(method=name, budget=budget)
            logger.info("%s %s at %s: %s", case.name, name, budget_label(budget),
                        cell_text(result))
            runs.append(result)
    convertible = convertible_convs(case.model)
    shapes = conv_shapes(case.model, case.example_input)
    return {"title": case.title, "original_top1": original_top1,
            "evaluation_images": image_count(case.evaluation),
            "calibration_images": image_count(case.calibration), "model_macs": model_macs,
            "convertible_conv_macs": sum(conv_macs(m, shapes[n]) for n, m in convertible.items()),
            "params": sum(p.numel() for p in case.model.parameters()),
            "notes": case.notes, "runs": runs}


# --------------------------------------------------------------------------- ResNet-50


def peak_rss_kib() -> int:
    """Peak resident memory of this process in KiB (VmHWM, else ru_maxrss)."""
    return proc_status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def proc_status_kib(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def resnet50_child(mode: str) -> dict:
    """One timed ResNet-50 conversion (in a fresh process): time and peak memory."""
    import torchvision

    baseline = proc_status_kib("VmRSS")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    calibration = None
    if mode == "calibrated":
        calibration = [torch.randn(RESNET50_CALIB_BATCH, 3, 224, 224)
                       for _ in range(RESNET50_CALIB_IMAGES // RESNET50_CALIB_BATCH)]
    example = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    small = dwconvert.convert(model, form="auto", budget=RESNET50_BUDGET,
                              budget_scope="convertible", example_inputs=example,
                              calibration=calibration, calib_samples=RESNET50_CALIB_IMAGES)
    seconds = time.perf_counter() - start
    report = small.dwconvert_report
    convertible = convertible_convs(model)
    return {"mode": mode, "seconds": seconds, "peak_rss_kib": peak_rss_kib(),
            "baseline_rss_kib": baseline, "mac_ratio": report.mac_ratio,
            "conv_mac_ratio": conv_mac_ratio(report, convertible),
            "forms": forms_chosen(report, convertible)}


def resnet50_sizes() -> dict:
    """Parameter size of ResNet-50 and activation sizes of one calibration batch, in MB."""
    import torchvision

    model = torchvision.models.resnet50(weights=None).eval()
    outputs = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel()))
               for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for handle in handles:
        handle.remove()
    batch = RESNET50_CALIB_BATCH
    return {"params": sum(p.numel() for p in model.parameters()),
            "param_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6,
            "batch_input_mb": batch * 3 * 224 * 224 * 4 / 1e6,
            "batch_conv_outputs_mb": batch * sum(outputs) * 4 / 1e6,
            "batch_largest_conv_output_mb": batch * max(outputs) * 4 / 1e6}


def run_resnet50(threads: int) -> dict:
    """Both ResNet-50 timings, each in a fresh subprocess of this script."""
    results = {"sizes": resnet50_sizes()}
    for mode in ("weights", "calibrated"):
        command = [sys.executable, str(Path(__file__).resolve()), "--resnet50-child", mode,
                   "--threads", str(threads)]
        logger.info("resnet50 (%s): %s", mode, " ".join(command))
        try:
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                  timeout=RESNET50_CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            results[mode] = {"status": "error", "message": "timed out"}
            continue
        if done.returncode != 0:
            logger.error("resnet50 (%s) failed:\n%s", mode, done.stderr[-4000:])
            results[mode] = {"status": "error", "message": done.stderr.strip()[-300:]}
            continue
        results[mode] = {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}
        logger.info("resnet50 (%s): %.1f s, peak RSS %.0f MB", mode, results[mode]["seconds"],
                    results[mode]["peak_rss_kib"] / 1024)
    return results


# --------------------------------------------------------------------------- targets


def find_run(model: dict, method: str, budget: float) -> dict | None:
    """The run of ``method`` at ``budget`` (within 1e-3), if it was measured."""
    for run in model["runs"]:
        if run["method"] == method and abs(run["budget"] - budget) < 1e-3:
            return run
    return None


def best_run(model: dict, methods: Iterable[str], budget: float) -> dict | None:
    """The most accurate successful run among ``methods`` at ``budget``."""
    runs = [find_run(model, m, budget) for m in methods]
    runs = [r for r in runs if r is not None and r["status"] == "ok"]
    return max(runs, key=lambda r: r["top1"], default=None)


def drop_target(models: dict, name: str, budget: float, limit: float) -> dict:
    """Best dwconvert method at ``budget`` within ``limit`` points of the original."""
    label = f"{name} at {budget_label(budget)}: best dwconvert method within {limit:g} points"
    if name not in models:
        return {"target": label, "status": "not measured"}
    dwconvert_methods = [m for m, spec in METHODS.items() if not spec.peer]
    best = best_run(models[name], dwconvert_methods, budget)
    if best is None:
        return {"target": label, "status": "not measured"}
    return {"target": label, "status": "PASS" if best["drop"] <= limit else "MISS",
            "measured": f"drop {best['drop']:.2f} points ({best['method']}, "
                        f"{best['top1']:.2f}% vs {models[name]['original_top1']:.2f}%)"}


def peer_target(models: dict, budgets: Sequence[float]) -> dict:
    """dwconvert (best of auto / auto+calib) ahead of the peer at every budget."""
    label = "dwconvert (best of auto, auto+calib) ahead of tltorch-cp at every budget"
    verdicts = []
    for name, model in models.items():
        for budget in budgets:
            ours, peer = best_run(model, AUTO_METHODS, budget), find_run(model, PEER, budget)
            if ours is None or peer is None:
                continue
            if peer["status"] == "unreachable":
                verdicts.append((True, f"{name} {budget_label(budget)}: {ours['top1']:.2f}% "
                                       f"vs peer unreachable"))
            elif peer["status"] == "ok":
                verdicts.append((ours["top1"] > peer["top1"],
                                 f"{name} {budget_label(budget)}: {ours['top1']:.2f}% "
                                 f"vs {peer['top1']:.2f}%"))
    if not verdicts:
        return {"target": label, "status": "not measured"}
    return {"target": label, "status": "PASS" if all(ok for ok, _ in verdicts) else "MISS",
            "measured": "; ".join(text for _, text in verdicts)}


def resnet_targets(resnet: dict | None) -> list[dict]:
    """ResNet-50 conversion time limits, and the memory yardstick."""
    limits = (("weights", "weight-only", 15.0), ("calibrated", "64 calibration images", 90.0))
    targets = []
    for mode, text, seconds in limits:
        label = f"resnet50 auto 1/3, {text}, under {seconds:g} s"
        run = (resnet or {}).get(mode)
        if not run or run.get("status") != "ok":
            targets.append({"target": label, "status": "not measured"})
            continue
        targets.append({"target": label, "status": "PASS" if run["seconds"] < seconds else "MISS",
                        "measured": f"{run['seconds']:.1f} s"})
    run = (resnet or {}).get("calibrated")
    label = ("resnet50 calibrated: peak memory above the import baseline under 3x model "
             "size + one calibration batch's conv outputs")
    if not run or run.get("status") != "ok" or not run.get("baseline_rss_kib"):
        targets.append({"target": label, "status": "not measured"})
        return targets
    sizes = resnet["sizes"]
    allowed = 3 * sizes["param_mb"] + sizes["batch_conv_outputs_mb"]
    strict = 3 * sizes["param_mb"] + sizes["batch_largest_conv_output_mb"]
    used = (run["peak_rss_kib"] - run["baseline_rss_kib"]) * 1024 / 1e6
    targets.append({"target": label, "status": "PASS" if used < allowed else "MISS",
                    "measured": f"{used:.0f} MB vs {allowed:.0f} MB allowed ({strict:.0f} MB "
                                f"if only the largest conv output counts)"})
    return targets


def check_targets(models: dict, resnet: dict | None, budgets: Sequence[float]) -> list[dict]:
    """Every target of the benchmark with PASS / MISS / not measured."""
    return [drop_target(models, "fashion", 1 / 4, 0.5),
            drop_target(models, "fashion", 1 / 8, 2.0),
            drop_target(models, "mnist", 1 / 8, 0.2),
            peer_target(models, budgets),
            *resnet_targets(resnet)]


# --------------------------------------------------------------------------- Markdown


def cell_text(run: dict) -> str:
    """One run as a table cell: accuracy and drop, or why there is none."""
    if run["status"] == "ok":
        return f"{run['top1']:.2f}% ({0.0 - run['drop']:+.2f})"
    if run["status"] == "unreachable":
        low = run.get("min_reachable")
        return f"unreachable (min {low:.3f})" if low is not None else "unreachable"
    return run["status"] if run["status"] != "error" else f"error: {run.get('message', '')}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(model: dict, methods: Sequence[str], budgets: Sequence[float]) -> str:
    """Methods x budgets: top-1 and change in points."""
    rows = [["original", *[f"{model['original_top1']:.2f}%"] * len(budgets)]]
    for method in methods:
        runs = [find_run(model, method, budget) for budget in budgets]
        rows.append([f"`{method}`", *[cell_text(run) if run else "" for run in runs]])
    return md_table(["method", *[f"{budget_label(b)} of conv MACs" for b in budgets]], rows)


def detail_table(model: dict) -> str:
    """Every run with all its measurements."""
    rows = []
    for run in model["runs"]:
        if run["status"] != "ok":
            rows.append([f"`{run['method']}`", budget_label(run["budget"]), cell_text(run),
                         *[""] * 6])
            continue
        forms = ", ".join(f"{form} {count}" for form, count in run["forms"].items())
        rows.append([f"`{run['method']}`", budget_label(run["budget"]), f"{run['top1']:.2f}%",
                     f"{run['drop']:.2f}", f"{run['conv_mac_ratio']:.3f}",
                     f"{run['mac_ratio']:.3f}", f"{run['param_ratio']:.3f}",
                     f"{run['seconds']:.2f}", forms])
    headers = ["method", "budget", "top-1", "drop (points)", "conv MACs kept",
               "model MACs kept", "params kept", "convert (s)", "forms"]
    return md_table(headers, rows)


def resnet_section(resnet: dict) -> str:
    """ResNet-50 conversion time and memory."""
    sizes = resnet["sizes"]
    rows = []
    for mode in ("weights", "calibrated"):
        run = resnet.get(mode, {})
        if run.get("status") != "ok":
            rows.append([mode, f"error: {run.get('message', 'not run')}", "", "", "", ""])
            continue
        forms = ", ".join(f"{form} {count}" for form, count in run["forms"].items())
        base = run.get("baseline_rss_kib") or 0
        rows.append([mode, f"{run['seconds']:.1f}", f"{run['peak_rss_kib'] / 1024:.0f}",
                     f"{(run['peak_rss_kib'] - base) * 1024 / 1e6:.0f}",
                     f"{run['conv_mac_ratio']:.3f}", forms])
    table = md_table(["calibration", "convert (s)", "peak RSS (MiB)",
                      "peak above import baseline (MB)", "conv MACs kept", "forms"], rows)
    return (f"{table}\n\nResNet-50: {sizes['params'] / 1e6:.1f} M parameters, "
            f"{sizes['param_mb']:.0f} MB of float32 weights. One calibration batch "
            f"({RESNET50_CALIB_BATCH}x3x224x224): input {sizes['batch_input_mb']:.1f} MB, "
            f"largest conv output {sizes['batch_largest_conv_output_mb']:.0f} MB, all conv "
            f"outputs together {sizes['batch_conv_outputs_mb']:.0f} MB (float32). "
            f"Each run is a fresh process; the import baseline is the RSS after importing "
            f"torch, torchvision and dwconvert.")


def model_section(name: str, model: dict, methods: Sequence[str],
                  budgets: Sequence[float]) -> str:
    """The tables and notes of one model."""
    notes = model["notes"]
    lines = [f"## {model['title']}", "",
             f"Original: {model['original_top1']:.2f}% top-1 on {model['evaluation_images']} "
             f"images ({notes['evaluation']}); {model['model_macs'] / 1e6:.2f} M MACs, of "
             f"which {model['convertible_conv_macs'] / 1e6:.2f} M in convertible convs; "
             f"{model['params']:,} parameters. Calibration: {notes['calibration']}."]
    if "original_top1_all_5000" in notes:
        lines.append(f"On all 5,000 mnist5k images the original scores "
                     f"{notes['original_top1_all_5000']:.2f}% (README: "
                     f"{MNIST_REFERENCE_TOP1:.2f}%).")
    lines += ["", "Top-1 (change in points against the original on the same images):", "",
              summary_table(model, methods, budgets), "", detail_table(model), ""]
    return "\n".join(lines)


def markdown_report(results: dict) -> str:
    """The whole report."""
    meta = results["meta"]
    parts = ["# Fidelity benchmark", "",
             f"`{meta['command']}` on {meta['date']}: torch {meta['torch']}, tensorly-torch "
             f"{meta['tltorch']}, {meta['threads']} thread(s), {meta['machine']}. No "
             "fine-tuning anywhere. Budgets are kept fractions of the MACs of the convertible "
             "convs (`budget_scope=\"convertible\"`); the peer (`tltorch-cp`, "
             "`tltorch.FactorizedConv.from_conv(..., factorization='cp', "
             "implementation='factorized')`) replaces every 3x3 conv with more than one input "
             "channel (one-channel stems are kept, as its users would keep them) with the "
             "largest CP rank within one fraction of each conv's MACs, the fraction set so "
             "that all convertible convs together keep the budget.", "",
             "MACs: dwconvert's from its report (`nn.Conv2d`/`nn.Linear` hooks). The peer's "
             "`FactorizedConv` calls `F.conv1d`/`F.conv2d` itself, with no `nn.Conv2d` inside, "
             "so its MACs are counted by a `TorchFunctionMode` over the functional conv and "
             "linear calls (checked equal to `dwconvert.costs.measure` on each original "
             "model) and compared with the formula "
             "`R * (Hin*Win*M + Hout*Win*kh + Hout*Wout*(kw + N))` per conv.", ""]
    for name, model in results["models"].items():
        parts.append(model_section(name, model, meta["methods"], meta["budgets"]))
    if results.get("resnet50"):
        parts += ["## Conversion time: torchvision ResNet-50", "",
                  resnet_section(results["resnet50"]), ""]
    parts += ["## Targets", "", md_table(["target", "result", "measured"], [
        [t["target"], t["status"], t.get("measured", "")] for t in results["targets"]]), ""]
    if results["models"]:
        parts += ["![accuracy against conv MACs kept](fidelity.png)", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- output files


def write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def plot(results: dict, path: Path) -> None:
    """Accuracy against conv MACs kept (log x), one subplot per model, saved atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for axis, (name, model) in zip(axes[0], models.items()):
        for method in results["meta"]["methods"]:
            runs = sorted((r for r in model["runs"] if r["method"] == method
                           and r["status"] == "ok"), key=lambda r: r["conv_mac_ratio"])
            if runs:
                axis.plot([r["conv_mac_ratio"] for r in runs], [r["top1"] for r in runs],
                          marker="o", linestyle="--" if method == PEER else "-", label=method)
        axis.axhline(model["original_top1"], color="black", linestyle="--", linewidth=1,
                     label="original")
        axis.set_xscale("log")
        budgets = results["meta"]["budgets"]
        axis.set_xticks(budgets, [budget_label(b) for b in budgets])
        axis.minorticks_off()
        axis.set_xlim(min(budgets) * 0.8, max(budgets) * 1.15)
        axis.set_xlabel("fraction of conv MACs kept")
        axis.set_ylabel("top-1 accuracy (%)")
        axis.set_title(model["title"])
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(path, lambda temp: figure.savefig(temp, format="png", dpi=120))
    finally:
        plt.close(figure)


def metadata(args: argparse.Namespace, argv: Sequence[str] | None) -> dict:
    """What the run was, for the report and the JSON."""
    import tltorch

    command = " ".join(["python benchmarks/fidelity.py",
                        *(sys.argv[1:] if argv is None else argv)])
    return {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "torch": torch.__version__, "tltorch": getattr(tltorch, "__version__", "?"),
            "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "methods": args.methods, "budgets": args.budgets, "limit": args.limit}


# --------------------------------------------------------------------------- main


def configure(args: argparse.Namespace) -> None:
    """Logging, threads and seeds."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("dwconvert").setLevel(logging.INFO if args.verbose else logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and writes its outputs; returns the exit status."""
    args = parse_args(argv)
    configure(args)
    if args.resnet50_child:
        print(json.dumps(resnet50_child(args.resnet50_child)))
        return 0
    results: dict[str, Any] = {"meta": metadata(args, argv), "models": {}}
    for name in args.models:
        case = load_case(name, args.limit)
        results["models"][name] = benchmark_case(case, args.methods, args.budgets)
    results["resnet50"] = None if args.skip_resnet50 else run_resnet50(args.threads)
    results["targets"] = check_targets(results["models"], results["resnet50"], args.budgets)
    report = markdown_report(results)
    write_atomic(args.out / "fidelity.json", json.dumps(results, indent=2) + "\n")
    write_atomic(args.out / "fidelity.md", report)
    if results["models"]:
        plot(results, args.out / "fidelity.png")
    print(report)
    errors = [run for model in results["models"].values() for run in model["runs"]
              if run["status"] == "error"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
