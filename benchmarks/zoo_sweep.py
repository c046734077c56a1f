"""Model zoo sweep: does every torchvision and timm classifier convert correctly?

For each model, built with random weights at the smallest square input it accepts
(of 64, 96, 128, 160, 224, 256, 299):

* exact: in float64, ``convert(model, form="dw-pw", rank="full")`` gives the
  original's output within ``EXACT`` (max abs difference over max abs output);
* budget: in float32, ``convert(model, budget=0.5, example_inputs=x)`` (form
  ``auto``; if half of the whole model is out of reach, half of its convertible
  convs) runs, keeps the output shape, and lowers the MACs, counted here with
  forward hooks independently of dwconvert's report.

Models: every classification model of ``torchvision.models.list_models(module=
torchvision.models)`` and one or more members of each timm family in
:data:`TIMM_MODELS`. Models above ``--max-params`` parameters are skipped (their
float64 copies do not fit beside other work on a small machine), and so is a
model whose check runs past ``--timeout`` seconds.

Results go to ``OUT.json`` after every model (a rerun resumes) and to ``OUT.md``
at the end. Full run, from the repository root, on one thread::

    python benchmarks/zoo_sweep.py

A quick check::

    python benchmarks/zoo_sweep.py --models resnet18 timm:regnetx_002 --out /tmp/zoo
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dwconvert  # noqa: E402
from dwconvert.files import write_text  # noqa: E402

SIZES = (64, 96, 128, 160, 224, 256, 299)
EXACT = 1e-8
BUDGET = 0.5
CP_ITERS = 20
CP_SIZE_LIMIT = 2e7
MAX_PARAMS = 150e6

# One or more members of each timm family, the smallest where there is a choice.
TIMM_MODELS = (
    "resnet10t", "resnet26d", "resnetrs50", "resnetv2_50", "resnext26ts", "legacy_seresnet18",
    "seresnext26d_32x4d", "ecaresnet26t", "skresnet18", "res2net50_26w_4s", "resnest14d",
    "gcresnet33ts", "bat_resnext26ts", "regnetx_002", "regnety_002", "regnetz_b16",
    "convnext_atto", "convnextv2_atto", "efficientnet_b0", "efficientnetv2_rw_t",
    "tf_efficientnetv2_b0", "tinynet_a", "mobilenetv2_050", "mobilenetv3_small_050",
    "mobilenetv4_conv_small", "lcnet_050", "mixnet_s", "mnasnet_050", "semnasnet_050",
    "spnasnet_100", "fbnetc_100", "hardcorenas_a", "ghostnet_100", "ghostnetv2_100",
    "repghostnet_050", "densenet121", "densenetblur121d", "vgg11", "vgg11_bn",
    "inception_v3", "inception_v4", "inception_resnet_v2", "inception_next_tiny", "xception41",
    "dla34", "hrnet_w18_small", "cspresnet50", "cspdarknet53", "cs3darknet_s", "darknet53",
    "dpn68", "rexnet_100", "repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m1",
    "selecsls42b", "ese_vovnet19b_dw", "nf_resnet26", "dm_nfnet_f0", "tresnet_m", "gernet_s",
    "hgnet_tiny", "hgnetv2_b0", "edgenext_xx_small", "mobilevit_xxs", "efficientvit_b0",
    "efficientformer_l1", "poolformer_s12", "coat_lite_tiny", "levit_128s", "botnet26t_256",
    "halonet26t", "coatnet_0_rw_224", "maxvit_nano_rw_256", "starnet_s050",
    "mambaout_femto", "convmixer_768_32", "nasnetalarge", "pnasnet5large", "senet154",
)


class Timeout(BaseException):  # not caught by the size search
    pass


def zoo_models() -> list[str]:
    """Every model of the sweep: torchvision names as they are, timm ones as ``timm:NAME``."""
    import torchvision

    names = list(torchvision.models.list_models(module=torchvision.models))
    return names + [f"timm:{name}" for name in TIMM_MODELS]


def build(name: str) -> nn.Module:
    """A model of the sweep with random weights, in eval mode (seeded).

    A ``Linear`` layer initialised to zero (ViT heads) is given random weights, so
    that the output depends on the convs before it.
    """
    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name.removeprefix("timm:"), pretrained=False).eval()
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None).eval()
    # Some classifier heads start at zero (ViT), which would make every output 0.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():
                nn.init.normal_(module.weight, std=0.02)
    return model



def smallest_input(model: nn.Module, sizes=SIZES) -> torch.Tensor:
    """A 1x3xSxS float32 input for the smallest S of ``sizes`` that ``model`` accepts."""
    errors = []
    for size in sizes:
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        try:
            with torch.no_grad():
                model(x)
        except Exception as err:  # the model rejects this size: try the next one
            errors.append(f"{size}: {type(err).__name__}")
            continue
        return x
    raise ValueError(f"the model accepts none of the sizes {sizes} ({'; '.join(errors)})")


def first_tensor(output: Any) -> torch.Tensor:
    """The logits of a model's output (a tensor, or the first tensor of a tuple or dict)."""
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output
    return next(v for v in values if isinstance(v, torch.Tensor))


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs per image of every ``nn.Conv2d`` and ``nn.Linear`` call, by forward hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output[0].numel() * module.in_channels // module.groups * kh * kw
        else:
            total += output[0].numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


def check_exact(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Full rank in float64: the converted model's output against the original's."""
    model = model.double()
    x = x.double()
    with torch.no_grad():
        expected = first_tensor(model(x))
    full = dwconvert.convert(model, form="dw-pw", rank="full")
    with torch.no_grad():
        out = first_tensor(full(x))
    report = full.dwconvert_report
    scale = float(expected.abs().max())
    error = float((out - expected).abs().max()) / scale if scale > 0 else float("inf")
    model.float()
    return {"convs": len(report.layers), "converted_full": len(report.converted),
            "traced": report.traced, "exact_error": error,
            "exact": bool(out.shape == expected.shape and error <= EXACT)}


def check_budget(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Half the MACs, form auto: it runs, keeps the output shape and lowers the MACs."""
    options = dict(budget=BUDGET, example_inputs=x, cp_iters=CP_ITERS,
                   cp_size_limit=CP_SIZE_LIMIT)
    scope = "model"
    try:
        small = dwconvert.convert(model, **options)
    except dwconvert.BudgetError:
        scope = "convertible"
        small = dwconvert.convert(model, budget_scope=scope, **options)
    with torch.no_grad():
        expected, out = first_tensor(model(x)), first_tensor(small(x))
    before, after = count_macs(model, x), count_macs(small, x)
    report = small.dwconvert_report
    return {"budget_scope": scope, "converted_budget": len(report.converted),
            "macs_before": before, "macs_after": after, "mac_ratio": after / before,
            "shape_kept": out.shape == expected.shape,
            "finite": bool(torch.isfinite(out).all()),
            "macs_fell": after < before}


def sweep_one(name: str, max_params: float) -> dict[str, Any]:
    start = time.perf_counter()
    result: dict[str, Any] = {"model": name}
    try:
        model = build(name)
        params = sum(p.numel() for p in model.parameters())
        result["params"] = params
        if params > max_params:
            result["status"] = "skipped"
            result["reason"] = (f"{params / 1e6:.0f}M parameters > {max_params / 1e6:.0f}M: "
                                "float64 copies too large for this machine")
            return result
        x = smallest_input(model)
        result["input"] = list(x.shape)
        result.update(check_exact(model, x))
        result.update(check_budget(model, x))
        ok = (result["exact"] and result["shape_kept"] and result["finite"]
              and (result["macs_fell"] or result["converted_budget"] == 0))
        result["status"] = "ok" if ok else "failed"
        if not ok:
            result["reason"] = ", ".join(
                what for what, bad in (
                    (f"full rank off by {result['exact_error']:.2g}", not result["exact"]),
                    ("output shape changed", not result["shape_kept"]),
                    ("non-finite output at budget 0.5", not result["finite"]),
                    ("MACs did not fall", not result["macs_fell"]
                     and result["converted_budget"] > 0),
                ) if bad)
        if result["convs"] == 0 or result["converted_full"] == 0:
            result["note"] = "no convertible conv"
    except Timeout:
        result["status"] = "skipped"
        result["reason"] = "ran past the time limit"
    except Exception as err:
        result["status"] = "failed"
        result["reason"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        result["traceback"] = traceback.format_exc(limit=-3)
    finally:
        result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def summary(results: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "tried": sum(r["status"] != "not run" for r in results),
        "skipped": sum(r["status"] == "skipped" for r in results),
        "converted": sum(r.get("converted_full", 0) > 0 for r in results),
        "exact": sum(bool(r.get("exact")) and r.get("converted_full", 0) > 0
                     for r in results),
        "budget_ok": sum(r["status"] == "ok" and r.get("converted_budget", 0) > 0
                         for r in results),
        "failed": sum(r["status"] == "failed" for r in results),
        "not_run": sum(r["status"] == "not run" for r in results),
    }


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    counts = summary(results)
    lines = [
        "# Model zoo sweep",
        "",
        f"Written by `benchmarks/zoo_sweep.py` on {meta['date']} (torch {meta['torch']}, "
        f"torchvision {meta['torchvision']}, timm {meta['timm']}, {meta['threads']} thread).",
        "Random weights, the smallest accepted square input of "
        f"{', '.join(map(str, SIZES))}. *exact*: `form='dw-pw', rank='full'` in float64, "
        f"max abs difference / max abs output <= {EXACT:g}. *budget*: `budget={BUDGET}` "
        f"(form `auto`, `cp_iters={CP_ITERS}`, `cp_size_limit={CP_SIZE_LIMIT:g}`) in "
        "float32, of the whole model or, where that is out of reach, of its convertible "
        "convs; MACs counted with forward hooks.",
        "",
        f"**{counts['tried']} models tried, {counts['skipped']} skipped, "
        f"{counts['converted']} converted, {counts['exact']} exact at full rank, "
        f"{counts['budget_ok']} ran at budget {BUDGET} with fewer MACs and the same output "
        f"shape, {counts['failed']} failed"
        + (f"; {counts['not_run']} not reached in this run" if counts["not_run"] else "")
        + ".**",
        "",
        "| model | params | input | convs | converted | exact error | budget scope "
        "| MACs kept | s | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        exact = f"{r['exact_error']:.1e}" if "exact_error" in r else ""
        ratio = f"{r['mac_ratio']:.3f}" if "mac_ratio" in r else ""
        size = r["input"][-1] if "input" in r else ""
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        status += f" ({r['note']})" if r.get("note") else ""
        params = f"{r['params'] / 1e6:.1f}M" if "params" in r else ""
        lines.append(
            f"| {r['model']} | {params} | {size} | {r.get('convs', '')} "
            f"| {r.get('converted_full', '')} | {exact} | {r.get('budget_scope', '')} "
            f"| {ratio} | {r['seconds']} | {status.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def render(paths: list[str], out: Path, note: str = "") -> int:
    """Merge the results of earlier runs into one record, in the order of the sweep."""
    found, meta = {}, None
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta = meta or data["meta"]
        found.update({r["model"]: r for r in data["results"]})
    names = zoo_models()
    results = [found.get(name, {"model": name, "status": "not run", "seconds": "",
                                "reason": "not reached before the record was written"})
               for name in names]
    results += [r for name, r in found.items() if name not in names]
    write_text(out.with_suffix(".json"), json.dumps(
        {"meta": meta, "summary": summary(results), "results": results}, indent=1))
    text = markdown(results, meta)
    if note:
        head, sep, rest = text.partition("\n\n**")
        text = f"{head}\n\n{note}{sep}{rest}"
    write_text(out.with_suffix(".md"), text)
    print(json.dumps(summary(results)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None,
                        help="names to check (timm ones as timm:NAME); default: all")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "zoo"),
                        help="path stem of the .json and .md record")
    parser.add_argument("--max-params", type=float, default=MAX_PARAMS)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="ignore results of an earlier run")
    parser.add_argument("--render", nargs="+", metavar="JSON", default=None,
                        help="write OUT.md and OUT.json from the results in these files "
                             "(e.g. of runs in parallel), listing models not reached")
    parser.add_argument("--note", default="", help="a paragraph for the record (--render)")
    args = parser.parse_args(argv)
    if args.render:
        return render(args.render, Path(args.out), args.note)

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    done: dict[str, dict] = {}
    if json_path.exists() and not args.fresh:
        done = {r["model"]: r for r in json.loads(json_path.read_text())["results"]}

    import timm
    import torchvision

    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm.__version__,
            "threads": args.threads, "python": platform.python_version()}
    names = args.models or zoo_models()

    def on_alarm(signum, frame):
        raise Timeout()

    signal.signal(signal.SIGALRM, on_alarm)
    results = []
    for name in names:
        if name in done:
            results.append(done[name])
            continue
        signal.alarm(args.timeout)
        try:
            result = sweep_one(name, args.max_params)
        finally:
            signal.alarm(0)
        results.append(result)
        print(f"{name}: {result['status']} {result.get('reason', '')} ({result['seconds']} s)",
              flush=True)
        write_text(json_path, json.dumps({"meta": meta, "summary": summary(results),
                                             "results": results}, indent=1))
    write_text(json_path, json.dumps({"meta": meta, "summary": summary(results),
                                         "results": results}, indent=1))
    write_text(md_path, markdown(results, meta))
    print(json.dumps(summary(results)))
    return 0 if all(r["status"] != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
