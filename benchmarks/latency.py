"""Latency benchmark: how much faster converted CNNs run, against the MACs they save.

For each model, the original, dwconvert's conversions and the peer TensorLy-Torch
(CP ``FactorizedConv`` at the same MACs) are timed interleaved in one process
(warm-up, then medians) in PyTorch eager (NCHW), PyTorch channels_last and ONNX
Runtime CPU, at batch 1 and 8, and on CUDA as well when a device is present.

Rows per model and budget ``b`` (a fraction of the whole model's MACs):

* ``dwconvert``: ``convert(model, budget=b, layout="auto", rank_multiple=8)``, MACs
  objective.
* ``dwconvert-latency``: ``convert(model, objective="latency", budget=b,
  rank_multiple=8)``, ``b`` of the measured time (if out of reach, the fastest
  reachable, said in the row).
* ``dwconvert-latency-capped``: ``convert(model, objective="latency", max_macs=b,
  rank_multiple=8)``: no time budget, the least error within ``b`` of the model's
  MACs from options measured faster than each conv, so that it is compared at the
  MACs of the other rows.
* ``tltorch-cp``: ``tltorch.FactorizedConv.from_conv(conv, rank=R,
  factorization='cp', implementation='factorized')`` on every 3x3 conv with more
  than one input channel, ``R`` per conv so that the model keeps ``b`` of its MACs.

The two latency rows are converted twice, because the latency objective chooses forms
and ranks by the time of the candidate layers in the memory format they are timed in:
in NCHW (for the eager and ONNX Runtime columns) and with the model and example in
channels_last (for the channels_last columns). Both are timed on the CPU, also for the
CUDA columns. The two can choose other layers, so a channels_last cell may keep other
MACs; the row's notes say so.

Speedup is original time / converted time; efficiency is speedup / MAC reduction
(1.0: the model runs as much faster as it has fewer MACs). In the PyTorch runtimes
BatchNorm is folded into the conv before it in every model (the peer is built on
the folded original, so it has no BatchNorm left either); ONNX Runtime folds it
itself. Weights are random (torchvision models) or trained (the fidelity models);
the peer's factors are not decomposed from the weights (``decompose_weights=False``)
because its ALS takes tens of minutes on these models and values do not change time.

Full run, from the repository root of a clean clone, on a quiet machine (writes
``docs/benchmarks/latency.{md,json,png}``; prints its estimated run time first)::

    bash scripts/setup.sh bench && .venv/bin/python benchmarks/latency.py

A quick check::

    python benchmarks/latency.py --quick --out /tmp/latency-test
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):  # ``examples.fashion_mnist`` and the fidelity helpers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import dwconvert  # noqa: E402
from dwconvert.costs import measure  # noqa: E402
from dwconvert.errors import first_line  # noqa: E402
from dwconvert.files import write_atomically  # noqa: E402
from dwconvert.latency import (  # noqa: E402
    RUNTIMES,
    RuntimeUnavailable,
    prepare,
    time_interleaved,
)
from dwconvert.layouts import fold_batchnorm  # noqa: E402
from fidelity import (  # noqa: E402
    FASHION_WEIGHTS,
    conv_macs,
    functional_macs,
    mnist_weights,
    peer_macs_per_rank,
    peer_targets,
    set_submodule,
    write_atomic,
)

logger = logging.getLogger("latency")

MODELS = ("resnet18", "resnet50", "vgg16", "fashion", "mnist")
DEFAULT_BUDGETS = "1/2,1/3,1/4"
DEFAULT_BATCHES = "1,8"
CAPPED = "dwconvert-latency-capped"
METHODS = ("dwconvert", "dwconvert-latency", CAPPED, "tltorch-cp")
OURS = ("dwconvert", "dwconvert-latency", CAPPED)
# Rows whose forms and ranks are chosen by measured time: made again for channels_last.
TIMED = ("dwconvert-latency", CAPPED)
# What ``make_variant`` gives a row (suffixed ``_cl`` for its channels_last conversion).
MADE_KEYS = ("model", "macs", "mac_reduction", "note", "convert_s")
# A second, separately prepared copy of the original: the noise of identical models.
AGAIN = "original (again)"
AGAIN_NOTE = ("; the original is timed as two copies, each prepared like the other rows, "
              "and its time is the faster copy's; `two copies of the original` says how far "
              "apart they ran, the noise of identical models in this run")
PEER = "tltorch-cp"
CONVERTED_AGAIN = ("The `objective=\"latency\"` rows are converted again, with the model and "
                   "example in channels_last, for the channels_last columns.")
NOISE = 0.02
TOO_NOISY = 0.10  # copies of one model further apart than this: no slower/not-slower verdict
# Rough seconds per conversion of each model (2 cores, as measured), for the run-time estimate.
CONVERT_SECONDS = {"resnet18": 15, "resnet50": 15, "vgg16": 40, "fashion": 3, "mnist": 1}


# --------------------------------------------------------------------------- command line


def parse_list(allowed: Sequence[str] | None = None):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a comma-separated list of {', '.join(allowed or ['values'])}")
        return values
    return parse


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(Fraction(v.strip())) for v in text.split(",")]
    except (ValueError, ZeroDivisionError):
        budgets = []
    if not budgets or not all(0 < b <= 1 for b in budgets):
        raise argparse.ArgumentTypeError(f"{text!r}: budgets are fractions in (0, 1], e.g. 1/3")
    return budgets


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(v) for v in text.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes are positive ints, e.g. 1,8")
    return batches


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=parse_list(MODELS), default=list(MODELS))
    parser.add_argument("--budgets", type=parse_budgets, default=parse_budgets(DEFAULT_BUDGETS))
    parser.add_argument("--batches", type=parse_batches, default=parse_batches(DEFAULT_BATCHES))
    parser.add_argument("--runtimes", type=parse_list(RUNTIMES), default=list(RUNTIMES))
    parser.add_argument("--methods", type=parse_list(METHODS), default=list(METHODS))
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--rank-multiple", type=int, default=8,
                        help="dwconvert's rank_multiple for both its rows (default 8)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds at least")
    parser.add_argument("--min-seconds", type=float, default=2.0,
                        help="rounds go on (up to 10x --repeats) until this many seconds have "
                             "passed per setting, which steadies small models (default 2)")
    parser.add_argument("--no-cuda", action="store_true", help="skip CUDA even if present")
    parser.add_argument("--quick", action="store_true",
                        help="resnet18 and mnist, budget 1/3, batch 1, 5 repeats, 0.5 s")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: write latency.md and latency.png again from the "
                             "latency.json in --out (after a change to the report)")
    parser.add_argument("--update", action="store_true",
                        help="measure only --models again and keep the other models of the "
                             "latency.json already in --out (same budgets and batches)")
    parser.add_argument("--verbose", action="store_true", help="dwconvert's per-layer log")
    args = parser.parse_args(argv)
    if args.quick:
        args.models = [m for m in args.models if m in ("resnet18", "mnist")] or ["mnist"]
        args.budgets, args.batches, args.repeats, args.warmup = [1 / 3], [1], 5, 2
        args.min_seconds = min(args.min_seconds, 0.5)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0 or args.min_seconds < 0:
        parser.error("--threads and --repeats must be at least 1, --warmup and --min-seconds "
                     "at least 0")
    return args


def budget_label(budget: float) -> str:
    fraction = Fraction(budget).limit_denominator(16)
    return str(fraction) if abs(float(fraction) - budget) < 1e-9 else f"{budget:g}"


# --------------------------------------------------------------------------- models


def load_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A benchmark model in eval mode and the shape of one input image."""
    if name in ("resnet18", "resnet50", "vgg16"):
        import torchvision

        torch.manual_seed(0)
        return getattr(torchvision.models, name)(weights=None).eval(), (3, 224, 224)
    if name == "fashion":
        from safetensors.torch import load_file

        from examples.fashion_mnist.model import FashionResNet

        model = FashionResNet()
        model.load_state_dict(load_file(str(FASHION_WEIGHTS)))
        return model.eval(), (1, 28, 28)
    from digit_recognizer.model import CNN

    model = CNN()
    model.load_state_dict(torch.load(mnist_weights(), map_location="cpu", weights_only=True))
    return model.eval(), (1, 28, 28)


def peer_model(model: nn.Module, x: torch.Tensor, budget: float) -> tuple[nn.Module | None, str]:
    """TensorLy-Torch CP convs keeping ``budget`` of the model's MACs, on the folded model."""
    import tltorch

    folded = copy.deepcopy(model).eval()
    fold_batchnorm(folded)
    targets = peer_targets(folded, x)
    total = measure(folded, (x,)).macs
    replaced = sum(conv_macs(conv, shape) for conv, shape in targets.values())
    fraction = (budget * total - (total - replaced)) / replaced if replaced else 0
    ranks = {name: int(fraction * conv_macs(conv, shape) // peer_macs_per_rank(conv, shape))
             for name, (conv, shape) in targets.items()}
    if not targets or min(ranks.values()) < 1:
        return None, f"unreachable at budget {budget_label(budget)}"
    for name, rank in ranks.items():
        conv = folded.get_submodule(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_submodule(folded, name, tltorch.FactorizedConv.from_conv(
                conv, rank=rank, factorization="cp", implementation="factorized",
                decompose_weights=False))
    return folded.eval(), ""


def build_variants(name: str, model: nn.Module, x: torch.Tensor, budgets: Sequence[float],
                   methods: Sequence[str], rank_multiple: int,
                   channels_last: bool = False) -> list[dict[str, Any]]:
    """Every converted model of one benchmark model, with its MACs and how it was made.

    With ``channels_last``, each ``TIMED`` row also holds the conversion made with the
    model and example in channels_last, under the same keys suffixed ``_cl``.
    """
    original_macs = measure(model, (x,)).macs
    examples = {"": (model, x)}
    if channels_last:
        in_channels_last = channels_last_copy(name, model, x)
        if in_channels_last is not None:
            examples["_cl"] = in_channels_last
    variants = []
    for budget in budgets:
        for method in methods:
            row: dict[str, Any] = {"method": method, "budget": budget,
                                   "label": f"{method} @ {budget_label(budget)}"}
            for suffix, (source, example) in examples.items():
                if suffix and method not in TIMED:
                    continue
                label = row["label"] + (" (channels_last)" if suffix else "")
                made = make_variant(name, label, source, example, budget, method,
                                    rank_multiple)
                if "model" in made:
                    share_unchanged(made["model"], model)
                    made["mac_reduction"] = original_macs / made["macs"]
                row.update({key + suffix: value for key, value in made.items()})
            variants.append(row)
    return variants


def channels_last_copy(name: str, model: nn.Module, x: torch.Tensor
                       ) -> tuple[nn.Module, torch.Tensor] | None:
    """``model`` and ``x`` in channels_last, or None if the model fails there (a ``view``
    in its forward, as in the MNIST CNN); ``model`` itself is left as it is."""
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    example = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            twin(example)
    except Exception as err:
        first = first_line(err)
        logger.info("%s fails in channels_last (%s): its rows are not converted there",
                    name, first)
        return None
    return twin, example


def make_variant(name: str, label: str, model: nn.Module, x: torch.Tensor, budget: float,
                 method: str, rank_multiple: int) -> dict[str, Any]:
    """One conversion: ``model``, ``macs``, ``note`` and ``convert_s`` (no model if it failed)."""
    made: dict[str, Any] = {"note": ""}
    start = time.perf_counter()
    try:
        if method == PEER:
            converted, made["note"] = peer_model(model, x, budget)
            if converted is not None:
                made["macs"] = functional_macs(converted, x)
        else:
            converted = convert(model, x, budget, method, made, rank_multiple)
            made["macs"] = converted.dwconvert_report.macs_after
    except dwconvert.BudgetError as err:  # e.g. 1/3 of resnet50's MACs
        converted, made["note"] = None, f"unreachable: {err}"
    except Exception as err:  # one failed row must not sink the benchmark
        logger.exception("%s %s failed", name, label)
        converted, made["note"] = None, f"error: {type(err).__name__}: {err}"
    made["convert_s"] = time.perf_counter() - start
    if converted is not None:
        made["model"] = converted
    logger.info("%s %s: %.1f s%s", name, label, made["convert_s"],
                f" ({made['note']})" if made["note"] else "")
    return made


def variant_for(variant: dict[str, Any], runtime: str) -> dict[str, Any]:
    """The keys of ``variant`` that hold for ``runtime``: its channels_last conversion
    (``_cl`` keys) in the channels_last runtime, where it has one."""
    if runtime != "channels_last" or "note_cl" not in variant:
        return variant
    shared = {k: v for k, v in variant.items() if k not in MADE_KEYS and not k.endswith("_cl")}
    return {**shared, **{key: variant[f"{key}_cl"] for key in MADE_KEYS
                         if f"{key}_cl" in variant}}


def share_unchanged(variant: nn.Module, original: nn.Module) -> None:
    """Point the variant's weights that conversion left as they were at the original's.

    Each conversion copies the whole model, so without this every vgg16 row would hold
    its own 0.5 GB classifier. Timing is unchanged: ``prepare`` copies every contender.
    """
    originals = dict(original.named_parameters()) | dict(original.named_buffers())
    for prefix, module in variant.named_modules():
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                source = originals.get(f"{prefix}.{key}" if prefix else key)
                if (tensor is not None and source is not None and source is not tensor
                        and source.shape == tensor.shape and source.dtype == tensor.dtype
                        and torch.equal(source, tensor)):
                    store[key] = source


def convert(model: nn.Module, x: torch.Tensor, budget: float, method: str, row: dict,
            rank_multiple: int):
    if method == "dwconvert":
        return dwconvert.convert(model, budget=budget, layout="auto", example_inputs=x,
                                 rank_multiple=rank_multiple)
    if method == CAPPED:  # no time budget: the least error within the MACs, faster options
        return dwconvert.convert(model, objective="latency", max_macs=budget, example_inputs=x,
                                 rank_multiple=rank_multiple)
    asked = budget
    for _ in range(3):  # the reachable time is measured again each try, so leave a margin
        try:
            converted = dwconvert.convert(model, objective="latency", budget=budget,
                                          example_inputs=x, rank_multiple=rank_multiple)
        except dwconvert.BudgetError as err:
            # 10% above the minimum just measured, not above the last ask: retries do
            # not compound, so every out-of-reach budget ends near the same point.
            budget = min(1.0, err.minimum * 1.1)
            continue
        if budget != asked:
            row["note"] = (f"{budget_label(asked)} of the time out of reach; asked again at "
                           f"{budget:.2f} of the time (10% above the measured minimum)")
        return converted
    raise RuntimeError(f"no latency budget up to {budget:.2f} of the time was reachable")


# --------------------------------------------------------------------------- timing


def time_runtime(original: nn.Module, variants: list[dict], x: torch.Tensor, runtime: str,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Seconds of the original and of every variant in one runtime, timed interleaved."""
    calls, skipped = {}, {}
    made = [variant_for(v, runtime) for v in variants]
    contenders = {"original": original,
                  **{v["label"]: v["model"] for v in made if "model" in v},
                  AGAIN: original}  # prepare() copies each model, so this is a second copy
    for label, model in contenders.items():
        try:
            calls[label] = prepare(model, x, runtime)
        except RuntimeUnavailable as err:
            skipped[label] = str(err)
        except Exception as err:  # e.g. a model the ONNX exporter cannot export
            skipped[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        gc.collect()  # a copied fx graph is a reference cycle: free each export's copy now
        if label == "original" and label in skipped:
            return {"seconds": {}, "skipped": skipped}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    seconds = time_interleaved(calls, warmup=args.warmup, repeats=args.repeats, sync=sync,
                               min_seconds=args.min_seconds)
    calls.clear()
    gc.collect()  # free this setting's copies and sessions before the next is prepared
    return {"seconds": seconds, "skipped": skipped}


def settings(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(device, runtime, batch) to time."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.no_cuda else [])
    return [(device, runtime, batch) for device in devices for runtime in args.runtimes
            if not (device == "cuda" and runtime == "onnxruntime") for batch in args.batches]


def estimate_seconds(args: argparse.Namespace) -> float:
    """A rough run time: conversions plus timed calls, from one timed call of each model."""
    total = 0.0
    variants = len(args.budgets) * len(args.methods)
    for name in args.models:
        model, shape = load_model(name)
        x = torch.randn(1, *shape)
        with torch.inference_mode():
            model(x)
            start = time.perf_counter()
            model(x)
            once = time.perf_counter() - start
        per_setting = sum(max(once * batch * (1 + 0.6 * variants) * args.repeats,
                              args.min_seconds) + once * batch * args.warmup
                          for batch in args.batches)
        # ONNX Runtime is faster per call, but exports each model; call it the same.
        conversions = sum(m != PEER for m in args.methods) + \
            ("channels_last" in args.runtimes) * sum(m in TIMED for m in args.methods)
        total += per_setting * len(args.runtimes) + CONVERT_SECONDS[name] * \
            len(args.budgets) * conversions
    return total


def benchmark_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    model, shape = load_model(name)
    x = torch.randn(1, *shape)
    variants = build_variants(name, model, x, args.budgets, args.methods, args.rank_multiple,
                              channels_last="channels_last" in args.runtimes)
    result: dict[str, Any] = {
        "input": list(shape), "macs": measure(model, (x,)).macs,
        "params": sum(p.numel() for p in model.parameters()),
        "variants": [{k: v for k, v in row.items() if k not in ("model", "model_cl")}
                     for row in variants],
        "timings": [],
    }
    for device, runtime, batch in settings(args):
        xb = torch.randn(batch, *shape, device=device)
        original = model.to(device)
        for row in variants:
            for key in ("model", "model_cl"):  # the NCHW and the channels_last conversion
                if key in row:
                    row[key] = row[key].to(device)
        logger.info("%s: timing %s %s batch %d", name, device, runtime, batch)
        timed = time_runtime(original, variants, xb, runtime, args)
        result["timings"].append({"device": device, "runtime": runtime, "batch": batch,
                                  **timed})
    model.to("cpu")
    return result


# --------------------------------------------------------------------------- targets


def baseline(seconds: dict[str, float]) -> float | None:
    """The original's time: the faster of its two copies where both were timed.

    Identical models can differ by 10-20% on a shared machine; measuring speedups
    against the faster copy keeps that noise from counting as a gain.
    """
    times = [seconds[key] for key in ("original", AGAIN) if key in seconds]
    return min(times) if times else None


def copy_gap(seconds: dict[str, float]) -> float | None:
    """How far apart the two copies of the original ran: slower / faster - 1."""
    if "original" not in seconds or AGAIN not in seconds:
        return None
    pair = seconds["original"], seconds[AGAIN]
    return max(pair) / min(pair) - 1


def speedup(model: dict, device: str, runtime: str, batch: int, label: str) -> float | None:
    for timing in model["timings"]:
        if (timing["device"], timing["runtime"], timing["batch"]) == (device, runtime, batch):
            seconds = timing["seconds"]
            if "original" in seconds and label in seconds:
                return baseline(seconds) / seconds[label]
    return None


def slower_rows(models: dict, method: str, floors: dict[str, float]) -> tuple[int, list[str]]:
    """How many timings of ``method`` rows there are, and those slower than the allowance."""
    checked, slower = 0, []
    for name, model in models.items():
        for timing in model["timings"]:
            seconds = timing["seconds"]
            unchanged = {v["label"] for v in model["variants"]
                         if variant_for(v, timing["runtime"]).get("macs") == model["macs"]}
            for label, value in seconds.items():
                if label.split(" @ ")[0] != method or "original" not in seconds:
                    continue
                checked += 1
                if value > baseline(seconds) * (1 + floors[name]):
                    same = " (nothing converted: the original timed against itself)"
                    slower.append(f"{name} {timing['device']} {timing['runtime']} "
                                  f"b{timing['batch']} {label} "
                                  f"{baseline(seconds) / value:.2f}x"
                                  f"{same if label in unchanged else ''}")
    return checked, slower


def check_targets(results: dict) -> list[dict[str, Any]]:
    """The project's latency targets, each with the measured figure."""
    models, targets = results["models"], []
    resnet = models.get("resnet18")
    third = next((b for b in results["meta"]["budgets"] if abs(b - 1 / 3) < 1e-9), None)
    if resnet and third is not None:
        within = [v["label"] for v in resnet["variants"] if v["method"] != PEER
                  and v.get("macs", math.inf) <= third * resnet["macs"]]
        for runtime, goal in (("onnxruntime", 1.8), ("eager", 1.6)):
            value = speedup(resnet, "cpu", runtime, 1, f"dwconvert @ {budget_label(third)}")
            targets.append({"target": f"resnet18, budget 1/3, batch 1, {runtime}: >= {goal}x "
                                      "(MACs objective)",
                            "measured": value, "met": value is not None and value >= goal})
            best = max(((speedup(resnet, "cpu", runtime, 1, label), label) for label in within),
                       key=lambda pair: pair[0] or 0, default=(None, None))
            targets.append({"target": f"resnet18, any dwconvert row keeping at most 1/3 of the "
                                      f"MACs, batch 1, {runtime}: >= {goal}x",
                            "measured": f"{best[0]:.2f}x ({best[1]})" if best[0] else "-",
                            "met": best[0] is not None and best[0] >= goal})
    # Timing the original against a copy of itself shows how far identical models
    # differ in this run; a latency row is called slower only beyond that (and NOISE).
    floors = {name: max([NOISE] + [g for g in (copy_gap(t["seconds"]) for t in m["timings"])
                                   if g is not None])
              for name, m in models.items()}
    noise = ", ".join(f"{name} {floor:.0%}" for name, floor in floors.items())
    judged = max(floors.values(), default=0) <= TOO_NOISY
    if not judged:
        noise += f"; above {TOO_NOISY:.0%} is too noisy to judge: rerun on a quiet machine"
    for method, target in (
            ("dwconvert-latency", "objective=latency never slower than the original, beyond "
                                  "the noise of identical models in this run (per model, the "
                                  "largest gap between the two copies of the original over "
                                  f"its settings, at least {NOISE:.0%}: {noise})"),
            (CAPPED, "objective=latency with max_macs (the cap wins over time by design) "
                     "not slower, same allowance")):
        checked, slower = slower_rows(models, method, floors)
        if checked:
            targets.append({"target": target,
                            "measured": f"{checked - len(slower)} of {checked} not slower"
                            + (f"; slower: {', '.join(slower)}" if slower else ""),
                            "met": not slower if method != CAPPED and judged else None})
    behind = []
    compared = 0
    for name, model in models.items():
        for timing in model["timings"]:
            seconds = timing["seconds"]
            macs = {v["label"]: variant_for(v, timing["runtime"]).get("macs")
                    for v in model["variants"]}
            for budget in results["meta"]["budgets"]:
                peer_label = f"{PEER} @ {budget_label(budget)}"
                peer = seconds.get(peer_label)
                # Only rows with no more MACs than the peer's count: equal MACs or fewer.
                ours = [seconds[label] for label in (f"{m} @ {budget_label(budget)}"
                                                     for m in OURS)
                        if label in seconds and peer is not None
                        and macs[label] <= macs[peer_label] * (1 + NOISE)]
                if ours and peer is not None:
                    compared += 1
                    if min(ours) >= peer:
                        behind.append(f"{name} {timing['device']} {timing['runtime']} "
                                      f"b{timing['batch']} @ {budget_label(budget)}")
    if compared:
        targets.append({"target": "faster than tltorch-cp at equal MACs (the best dwconvert "
                                  f"row of the same budget with at most {NOISE:.0%} more MACs "
                                  "than the peer)",
                        "measured": f"{compared - len(behind)} of {compared} settings ahead"
                        + (f"; behind: {', '.join(behind)}" if behind else ""),
                        "met": not behind})
    return targets


# --------------------------------------------------------------------------- report


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def model_section(name: str, model: dict) -> str:
    timings = model["timings"]
    headers = ["row", "MACs kept"] + [
        f"{t['runtime']}{'' if t['device'] == 'cpu' else ' ' + t['device']} b{t['batch']}"
        for t in timings]
    rows = [["original", "1.000"] + [
        f"{baseline(t['seconds']) * 1e3:.2f} ms" if "original" in t["seconds"] else "n/a"
        for t in timings]]
    if any(AGAIN in t["seconds"] for t in timings):  # the A/A row
        rows.append(["two copies of the original", "1.000"] + [
            f"{copy_gap(t['seconds']):.0%} apart" if copy_gap(t["seconds"]) is not None
            else "n/a" for t in timings])
    notes = []
    for variant in model["variants"]:
        label = variant["label"]
        cells = [label, f"{1 / variant['mac_reduction']:.3f}" if "macs" in variant else "-"]
        for t in timings:
            seconds, made = t["seconds"], variant_for(variant, t["runtime"])
            if "macs" not in made:
                cells.append("-")
            elif label in seconds and "original" in seconds:
                gain = baseline(seconds) / seconds[label]
                cells.append(f"{gain:.2f}x ({gain / made['mac_reduction']:.2f})")
            else:
                cells.append("n/a")
        rows.append(cells)
        if variant["note"]:
            notes.append(f"{label}: {variant['note']}")
        notes += channels_last_notes(variant)
    for t in timings:
        for label, why in t["skipped"].items():
            notes.append(f"{t['runtime']} b{t['batch']}, {label}: not timed ({why})")
    shape = "x".join(map(str, model["input"]))
    measured = model.get("measured")
    text = [f"### {name} ({shape}, {model['macs'] / 1e6:.1f}M MACs)", "",
            *([f"Measured by `{measured['command']}` on {measured['date']}.", ""]
              if measured else []),
            "Original: median time per call. Other rows: speedup over the original "
            f"(efficiency = speedup / MAC reduction){AGAIN_NOTE if len(rows) > 1 else ''}.",
            *(["", CONVERTED_AGAIN] if any("note_cl" in v for v in model["variants"]) else []),
            "", md_table(headers, rows)]
    if notes:
        text += [""] + [f"- {n}" for n in sorted(set(notes))]
    return "\n".join(text)


def channels_last_notes(variant: dict) -> list[str]:
    """What a row's channels_last conversion did differently, if it had one."""
    if "note_cl" not in variant:
        return []
    label, notes = variant["label"], []
    if "macs_cl" in variant and variant["macs_cl"] != variant.get("macs"):
        kept = 1 / variant["mac_reduction_cl"]
        notes.append(f"{label}: converted again in channels_last for the channels_last "
                     f"columns, where it keeps {kept:.3f} of the MACs"
                     + (" (no conv converted)" if kept == 1 else ""))
    if variant["note_cl"]:
        notes.append(f"{label}, converted in channels_last: {variant['note_cl']}")
    return notes


def markdown_report(results: dict) -> str:
    meta = results["meta"]
    if meta.get("updates"):  # say which run measured each model
        for model in results["models"].values():
            model.setdefault("measured", {"command": meta["command"], "date": meta["date"]})
    lines = [
        "# Latency benchmark", "",
        f"Generated by `{meta['command']}` on {meta['date']}: torch {meta['torch']}, "
        f"onnxruntime {meta['onnxruntime']}, {meta['threads']} thread(s), {meta['machine']}"
        f"{', ' + meta['cuda'] if meta['cuda'] else ''}. Medians of at least {meta['repeats']} "
        f"interleaved calls and {meta.get('min_seconds', 0):g} s per setting (each round "
        f"starting one contender further on) after {meta['warmup']} warm-up calls; run time "
        f"{meta['seconds'] / 60:.1f} min. Budgets (`@ b`) are fractions of each model's MACs, "
        "except in `dwconvert-latency` rows, where they are fractions of its measured time; "
        "see benchmarks/README.md for how each row is made.", "",
        *[f"Measured again by `{u['command']}` on {u['date']} ({u['seconds'] / 60:.1f} min): "
          f"{', '.join(u['models'])}." for u in meta.get("updates", [])],
        *([""] if meta.get("updates") else []),
        *(["**Provisional**: a `--quick` run (a subset, few repeats); regenerate with "
           "`python benchmarks/latency.py` on a quiet machine for the published figures.", ""]
          if meta["quick"] else []),
        "## Targets", "",
        md_table(["target", "measured", "met"],
                 [[t["target"], f"{t['measured']:.2f}x" if isinstance(t["measured"], float)
                   else t["measured"],
                   "-" if t["met"] is None else "yes" if t["met"] else "**no**"]
                  for t in results["targets"]]),
        "", "## Results", "",
    ]
    for name, model in results["models"].items():
        lines += [model_section(name, model), ""]
    lines.append("![speedup against MAC reduction](latency.png)")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Speedup against MAC reduction, one subplot per (device, runtime), batch 1 if timed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(t["device"], t["runtime"]) for m in results["models"].values()
                     for t in m["timings"]})
    batch = min(results["meta"]["batches"])
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.5),
                                squeeze=False)
    markers = {"dwconvert": "o", "dwconvert-latency": "s", CAPPED: "^", PEER: "x"}
    for axis, (device, runtime) in zip(axes[0], panels):
        top = 1.0
        for name, model in results["models"].items():
            for method, marker in markers.items():
                points = []
                for variant in model["variants"]:
                    made = variant_for(variant, runtime)
                    if variant["method"] != method or "macs" not in made:
                        continue
                    gain = speedup(model, device, runtime, batch, variant["label"])
                    if gain is not None:
                        points.append((made["mac_reduction"], gain))
                if points:
                    top = max(top, *(max(p) for p in points))
                    axis.scatter(*zip(*points), marker=marker, label=f"{name} {method}")
        axis.plot([1, top], [1, top], color="black", linewidth=1, linestyle="--",
                  label="speedup = MAC reduction")
        axis.axhline(1, color="grey", linewidth=1)
        axis.set_xlabel("MAC reduction (x)")
        axis.set_ylabel("speedup (x)")
        axis.set_title(f"{runtime} ({device}), batch {batch}")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=6)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(path, lambda temp: figure.savefig(temp, format="png", dpi=110))
    finally:
        plt.close(figure)


def metadata(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    import onnxruntime

    command = " ".join(["python benchmarks/latency.py",
                        *(sys.argv[1:] if argv is None else argv)])
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.no_cuda \
        else ""
    return {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "cuda": cuda, "models": args.models, "budgets": args.budgets,
            "batches": args.batches, "runtimes": args.runtimes, "methods": args.methods,
            "warmup": args.warmup, "repeats": args.repeats, "min_seconds": args.min_seconds,
            "quick": args.quick,
            "rank_multiple": args.rank_multiple}


def previous_results(args: argparse.Namespace) -> dict[str, Any]:
    """The results in ``--out`` to update, refused if they were measured otherwise."""
    path = args.out / "latency.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        sys.exit(f"--update: cannot read {path} ({err}); run without --update first")
    meta = results["meta"]
    for key in ("budgets", "batches", "runtimes", "methods", "threads"):
        if meta[key] != getattr(args, key):
            sys.exit(f"--update: {path} was measured with {key} {meta[key]}, not "
                     f"{getattr(args, key)}; give the same, or run without --update")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("dwconvert").setLevel(logging.INFO if args.verbose else logging.ERROR)
    torch.set_num_threads(args.threads)
    if args.render:
        results = json.loads((args.out / "latency.json").read_text())
        return write_results(results, args.out)
    estimate = estimate_seconds(args)
    print(f"estimated run time: {estimate / 60:.0f} min", file=sys.stderr, flush=True)
    start = time.perf_counter()
    meta = metadata(args, argv)
    results: dict[str, Any] = previous_results(args) if args.update else {"meta": meta,
                                                                          "models": {}}
    for name in args.models:
        results["models"][name] = benchmark_model(name, args)
        results["models"][name]["measured"] = {"command": meta["command"],
                                               "date": meta["date"]}
        # Each model as it is done, so that a crash (e.g. out of memory) keeps the others.
        write_atomic(args.out / "latency.json", json.dumps(results, indent=2) + "\n")
    if args.update:
        results["meta"].setdefault("updates", []).append(
            {**meta, "seconds": time.perf_counter() - start})
    else:
        results["meta"]["seconds"] = time.perf_counter() - start
        results["meta"]["estimated_seconds"] = estimate
    return write_results(results, args.out)


def write_results(results: dict[str, Any], out: Path) -> int:
    """Check the targets, then write latency.json, latency.md and latency.png to ``out``."""
    results["targets"] = check_targets(results)
    report = markdown_report(results)
    write_atomic(out / "latency.json", json.dumps(results, indent=2) + "\n")
    write_atomic(out / "latency.md", report)
    plot(results, out / "latency.png")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
