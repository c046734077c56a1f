"""Wall-clock timing of modules: warm-up, then the median of repeated calls.

Used by the conversion pass (``objective="latency"``, ``layout="auto"``) to time
candidate layers at their real input, and by ``dwconvert bench`` and
``benchmarks/latency.py`` to time whole models. CPU timings use the current
``torch.get_num_threads()``; CUDA timings synchronize the device around each call.

Known limit: on a machine shared with other work, medians still move by 10-30%;
:func:`time_interleaved` runs the contenders in turn so that load hits all alike.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Times contending modules at one input: name -> module in, name -> seconds per call out.
ModuleTimer = Callable[[Mapping[str, nn.Module], Sequence[torch.Tensor]], dict[str, float]]


def synchronizer(tensors: Sequence[torch.Tensor]) -> Callable[[], None]:
    """What waits for queued GPU work to finish: ``torch.cuda.synchronize`` or nothing."""
    if any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor)):
        return torch.cuda.synchronize
    return lambda: None


def time_interleaved(calls: Mapping[str, Callable[[], object]], *, warmup: int = 3,
                     repeats: int = 20, sync: Callable[[], None] = lambda: None,
                     min_seconds: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each of ``calls``, run in turn (a, b, c, b, c, a, ...).

    Each call is warmed up ``warmup`` times first; then ``repeats`` rounds are
    timed, more if ``min_seconds`` of rounds have not passed yet (at most 10x).
    Each round starts one call further on, so that every call takes every place in
    the order: none always comes first (after the others have evicted its weights
    from the cache), and with three or more none runs twice in a row (which would
    find its weights still cached; reversing every other round did that to the
    first and last calls, and small models ran 3-5% faster there).
    """
    samples: dict[str, list[float]] = {name: [] for name in calls}
    items = list(calls.items())
    orders = [items[shift:] + items[:shift] for shift in range(len(items))]
    with torch.inference_mode():
        for call in calls.values():
            for _ in range(warmup):
                call()
        sync()
        start = time.perf_counter()
        rounds = 0
        while rounds < repeats or (time.perf_counter() - start < min_seconds
                                   and rounds < 10 * repeats):
            for name, call in orders[rounds % len(orders)]:
                begin = time.perf_counter()
                call()
                sync()
                samples[name].append(time.perf_counter() - begin)
            rounds += 1
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass(frozen=True)
class MedianTimer:
    """The default :data:`ModuleTimer`: interleaved medians after ``warmup`` calls each.

    Rounds are repeated until ``min_seconds`` have passed (at least ``repeats``, at
    most ``10 * repeats`` rounds), which steadies sub-millisecond layers.
    """

    warmup: int = 2
    repeats: int = 7
    min_seconds: float = 0.05

    def __call__(self, modules: Mapping[str, nn.Module],
                 inputs: Sequence[torch.Tensor]) -> dict[str, float]:
        modes = {name: m.training for name, m in modules.items()}
        for module in modules.values():
            module.eval()
        try:
            return time_interleaved(
                {name: (lambda m=m: m(*inputs)) for name, m in modules.items()},
                warmup=self.warmup, repeats=self.repeats, sync=synchronizer(inputs),
                min_seconds=self.min_seconds)
        finally:
            for name, module in modules.items():
                module.train(modes[name])


def capture_inputs(model: nn.Module, modules: Mapping[str, nn.Module],
                   example_inputs: Sequence[torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
    """The input each of ``modules`` receives (its first call) when ``model`` runs once."""
    seen: dict[str, tuple[torch.Tensor, ...]] = {}
    handles = []
    for name, module in modules.items():
        def hook(_module, inputs, name=name):
            seen.setdefault(name, tuple(t.detach().clone() if isinstance(t, torch.Tensor)
                                        else t for t in inputs))
        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen


def format_seconds(seconds: float | None) -> str:
    """``0.00123`` -> ``'1.23 ms'``."""
    if seconds is None:
        return ""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


# --------------------------------------------------------------------------- runtimes

RUNTIMES = ("eager", "channels_last", "onnxruntime")


class RuntimeUnavailable(RuntimeError):
    """A runtime that cannot run here (a missing package, or ONNX Runtime on CUDA)."""


def _inference_copy(model: nn.Module, fold_bn: bool) -> nn.Module:
    from .layouts import fold_batchnorm  # layouts imports this module

    model = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm(model)
    return model


def prepare(model: nn.Module, example: torch.Tensor, runtime: str, *, fold_bn: bool = True,
            relayout: bool = True, timer: ModuleTimer | None = None,
            workdir: str | None = None) -> Callable[[], object]:
    """A call that runs (a copy of) ``model`` on ``example`` in ``runtime``.

    ``eager``: PyTorch on ``example``'s device in NCHW; ``channels_last``: the model
    and input converted to channels_last; ``onnxruntime``: exported to ONNX
    (TorchScript exporter) and run by ONNX Runtime's CPU provider with
    ``torch.get_num_threads()`` intra-op threads that do not spin between runs. In
    the PyTorch runtimes BatchNorm is folded into the conv before it (``fold_bn``,
    for any model, so that original and converted are treated alike; ONNX Runtime
    folds it itself) and, with ``relayout``, every factorized layer gets the layout
    measured fastest at this input (see :mod:`dwconvert.layouts`); ONNX Runtime gets
    the plain layout, which its own graph optimiser rewrites.
    """
    from .layouts import choose_layouts, factorized_modules

    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        return _onnxruntime_call(_inference_copy(model, False), example, workdir)
    model = _inference_copy(model, fold_bn)
    if runtime == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            model(example)
    except RuntimeError as err:  # e.g. a ``view`` in the model's forward on channels_last
        first = str(err).splitlines()[0]
        raise RuntimeUnavailable(f"{type(model).__name__} fails in {runtime}: {first}") from None
    if relayout and factorized_modules(model):
        choose_layouts(model, example, timer)
    return lambda: model(example)


def _onnxruntime_call(model: nn.Module, example: torch.Tensor, workdir: str | None
                      ) -> Callable[[], object]:
    import tempfile
    import warnings

    from .layouts import set_layouts

    if example.is_cuda:
        raise RuntimeUnavailable("ONNX Runtime is timed on CPU only")
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeUnavailable("onnxruntime is not installed: pip install 'dwconvert[onnx]'"
                                 ) from None
    set_layouts(model, "plain")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = f"{tmp}/model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), path, dynamo=False, input_names=["x"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Each session has its own threads, which by default spin after a run: timed in
        # turn, a session would share the cores with the spinning threads of the one
        # before (on 2 cores, resnet18 at batch 1 ran 2.3x slower, 8% apart between
        # copies of one model; without spinning, 2% apart).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"x": example.detach().cpu().numpy()}
    return lambda: session.run(None, feed)


def time_models(models: Mapping[str, nn.Module], example: torch.Tensor, runtime: str, *,
                warmup: int = 3, repeats: int = 20, min_seconds: float = 0.0,
                fold_bn: bool = True, relayout: bool = True,
                layout_timer: ModuleTimer | None = None) -> dict[str, float]:
    """Median seconds of each model in ``runtime``, all timed interleaved in this process.

    At least ``repeats`` rounds are timed, more until ``min_seconds`` have passed
    (see :func:`time_interleaved`).
    """
    calls = {name: prepare(model, example, runtime, fold_bn=fold_bn, relayout=relayout,
                           timer=layout_timer)
             for name, model in models.items()}
    sync = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    return time_interleaved(calls, warmup=warmup, repeats=repeats, sync=sync,
                            min_seconds=min_seconds)
