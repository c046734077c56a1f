"""objective="latency" with an injected, deterministic timer; the timing helpers.

The fake timer gives each conv a time proportional to its MACs (counted by the
formulas in conftest, independently of dwconvert), times a slowdown per form, so
every expected choice follows from arithmetic and no test depends on this
machine's speed.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import closed_form_macs, count_macs, original_macs
from torch import nn

import dwconvert
from dwconvert import FactorizedConv2d
from dwconvert.latency import MedianTimer, capture_inputs, time_interleaved
from dwconvert.speed import TIMED_RANKS, LayerTimes, timed_ranks

pytestmark = pytest.mark.usefixtures("single_thread")

NS = 1e-9  # fake seconds per MAC


class FakeTimer:
    """Seconds = MACs * NS * slowdown[form]; records what it was asked to time."""

    def __init__(self, slowdown: dict[str, float], layout_stage_slowdown: float = 1.0):
        self.slowdown = slowdown
        # Applied when the contenders are one module's layouts (after conversion).
        self.layout_stage_slowdown = layout_stage_slowdown
        self.calls: list[list[str]] = []

    def seconds(self, module: nn.Module, inputs, layout_stage: bool) -> float:
        total = 0.0

        def hook(m, args, out):
            nonlocal total
            hw_in = args[0].shape[-2] * args[0].shape[-1]
            hw_out = out.shape[-2] * out.shape[-1]
            if isinstance(m, FactorizedConv2d):
                conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size,
                                 groups=m.groups, device="meta")
                slow = self.slowdown[m.form] * (self.layout_stage_slowdown if layout_stage
                                                else 1.0)
                total += closed_form_macs(m.form, conv, m.rank, hw_in, hw_out) * NS * slow
            elif not inside[id(m)]:
                total += original_macs(m, hw_out) * NS

        inside = {}
        for m in module.modules():
            if isinstance(m, FactorizedConv2d):
                for child in m.modules():
                    inside[id(child)] = child is not m
            inside.setdefault(id(m), False)
        handles = [m.register_forward_hook(hook) for m in module.modules()
                   if isinstance(m, (nn.Conv2d, FactorizedConv2d))]
        try:
            with torch.no_grad():
                module(*inputs)
        finally:
            for h in handles:
                h.remove()
        return total

    def __call__(self, modules, inputs):
        self.calls.append(list(modules))
        layout_stage = "original" in modules and "|" not in "".join(modules) and len(modules) > 1 \
            and "converted" not in modules
        return {name: self.seconds(m, inputs, layout_stage) for name, m in modules.items()}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(8, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def example():
    return torch.randn(1, 8, 12, 12)


def test_latency_never_keeps_a_replacement_that_is_not_faster():
    timer = FakeTimer({"dw-pw": 50.0, "pw-dw": 1.0, "cp": 1.0})
    small = dwconvert.convert(Net().eval(), objective="latency", speedup=1.2,
                              example_inputs=example(), timer=timer, cp_iters=10)
    report = small.dwconvert_report
    assert report.converted
    for record in report.layers:
        assert record.time_before is not None
        if record.converted:
            assert record.form != "dw-pw", "dw-pw is always 50x slower here"
            assert record.time_after < record.time_before
    assert report.speedup >= 1.2 * (1 - 1e-9)


def test_layers_stay_when_no_form_is_faster():
    timer = FakeTimer({"dw-pw": 1000.0, "pw-dw": 1000.0, "cp": 1000.0})
    small = dwconvert.convert(Net().eval(), objective="latency", speedup=1.0,
                              example_inputs=example(), timer=timer, cp_iters=10)
    report = small.dwconvert_report
    assert not report.converted
    assert all("measured faster" in r.reason for r in report.layers), report.table()
    assert all(type(small.get_submodule(n)) is nn.Conv2d for n in ("conv1", "conv2", "conv3"))


def test_replacement_slower_in_the_final_check_is_reverted():
    # Candidates look fast, but the converted module measures slower: keep the original.
    timer = FakeTimer({"dw-pw": 1.0, "pw-dw": 1.0, "cp": 1.0}, layout_stage_slowdown=100.0)
    small = dwconvert.convert(Net().eval(), objective="latency", speedup=1.5,
                              example_inputs=example(), timer=timer, cp_iters=10)
    report = small.dwconvert_report
    assert not report.converted
    assert any("not faster than the original" in r.reason for r in report.layers)
    x = example()
    with torch.no_grad():
        torch.testing.assert_close(small(x), Net().eval()(x))


class SlowWholeModel(FakeTimer):
    """Layers time as FakeTimer says, but the converted model as a whole is 10% slower."""

    def __call__(self, modules, inputs):
        seconds = super().__call__(modules, inputs)
        if set(modules) == {"original", "converted"}:
            seconds["converted"] = seconds["original"] * 1.1
        return seconds


def test_a_conversion_slower_as_a_whole_is_undone():
    net, x = Net().eval(), example()
    small = dwconvert.convert(net, objective="latency", speedup=1.2, example_inputs=x,
                              timer=SlowWholeModel({"dw-pw": 1.0, "pw-dw": 1.0, "cp": 1.0}),
                              cp_iters=10)
    report = small.dwconvert_report
    assert not report.converted
    assert any("every conv put back" in n for n in report.notes)
    assert any("as a whole was not faster" in r.reason for r in report.layers)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x))


def test_a_capped_conversion_slower_as_a_whole_stays_with_a_warning():
    net, x = Net().eval(), example()
    small = dwconvert.convert(net, objective="latency", max_macs=0.5, example_inputs=x,
                              timer=SlowWholeModel({"dw-pw": 1.0, "pw-dw": 1.0, "cp": 1.0}),
                              cp_iters=10)
    report = small.dwconvert_report
    assert report.converted and count_macs(small, x) <= 0.5 * count_macs(net, x)
    assert any(n.startswith("warning: the converted model is not faster") for n in report.notes)
    assert "1.10x slower" in report.summary()


def test_unreachable_speedup_names_the_reachable_one():
    timer = FakeTimer({"dw-pw": 50.0, "pw-dw": 1.0, "cp": 1.0})
    with pytest.raises(dwconvert.BudgetError, match="out of reach") as err:
        dwconvert.convert(Net().eval(), objective="latency", speedup=1000.0,
                          example_inputs=example(), timer=timer, cp_iters=10)
    assert 0 < err.value.minimum < 1


def test_candidates_timed_per_layer_are_bounded():
    timer = FakeTimer({"dw-pw": 1.0, "pw-dw": 1.0, "cp": 1.0})
    dwconvert.convert(Net().eval(), objective="latency", budget=0.5,
                      example_inputs=example(), timer=timer, cp_iters=10)
    per_layer = [names for names in timer.calls if any("|" in n for n in names)]
    assert len(per_layer) == 2 * 3, "two timing runs for each of the three convs"
    for first, second in zip(per_layer[::2], per_layer[1::2]):
        assert "original" in first and len(first) <= 3 * 4 + 1
        assert len(second) <= 3 * (TIMED_RANKS - 1)


def test_macs_objective_warns_where_time_rose():
    timer = FakeTimer({"dw-pw": 50.0, "pw-dw": 50.0, "cp": 50.0})
    small = dwconvert.convert(Net().eval(), form="cp", budget=0.5, layout="auto",
                              example_inputs=example(), timer=timer, cp_iters=10)
    report = small.dwconvert_report
    assert report.converted, "the MACs objective keeps its choice"
    rose = [r for r in report.converted if r.time_rose]
    assert rose and all(r.time_after > r.time_before for r in rose)
    assert any("MACs fell" in n and "time rose" in n for n in report.notes)
    assert "time after" in report.table() and "layout" in report.table()


def test_latency_arguments_are_checked():
    with pytest.raises(ValueError, match="speedup needs objective='latency'"):
        dwconvert.convert(Net(), speedup=2.0, example_inputs=example())
    with pytest.raises(ValueError, match="example_inputs"):
        dwconvert.convert(Net(), objective="latency")
    with pytest.raises(ValueError, match=">= 1"):
        dwconvert.convert(Net(), objective="latency", speedup=0.5, example_inputs=example())
    with pytest.raises(ValueError, match="one of"):
        dwconvert.convert(Net(), objective="latency", speedup=2.0, budget=0.5,
                          example_inputs=example())
    with pytest.raises(ValueError, match="objective must be"):
        dwconvert.convert(Net(), objective="flops", example_inputs=example())


@pytest.mark.parametrize("layout", ["matmul", "channels_last", "matmul+repeat"])
def test_reported_macs_do_not_depend_on_the_layout(layout):
    # matmul and repeat bypass nn.Conv2d; the count must still be that of the chain.
    net, x = Net().eval(), example()
    small = dwconvert.convert(net, form="dw-pw", rank=2, layout=layout, example_inputs=x)
    plain = dwconvert.convert(net, form="dw-pw", rank=2, example_inputs=x)
    expected = sum(closed_form_macs("dw-pw", conv, 2, hw_in, hw_out)
                   for conv, hw_in, hw_out in ((net.conv1, 144, 144), (net.conv2, 144, 144),
                                               (net.conv3, 144, 36)))
    assert small.dwconvert_report.macs_after == expected == plain.dwconvert_report.macs_after
    assert all(small.get_submodule(n).layout == layout for n in ("conv1", "conv2", "conv3"))


def test_max_macs_caps_the_macs_of_a_latency_conversion():
    # Time is proportional to MACs here, so the time budget alone (1/1.2 of the time)
    # would keep far more MACs than the cap allows.
    net, x = Net().eval(), example()
    total = count_macs(net, x)
    free = dwconvert.convert(net, objective="latency", speedup=1.2, example_inputs=x,
                             timer=FakeTimer({"dw-pw": 1.0, "pw-dw": 1.0, "cp": 1.0}),
                             cp_iters=10)
    assert count_macs(free, x) > 0.4 * total, "the cap below must bind"
    capped = dwconvert.convert(net, objective="latency", speedup=1.2, max_macs=0.4,
                               example_inputs=x,
                               timer=FakeTimer({"dw-pw": 1.0, "pw-dw": 1.0, "cp": 1.0}),
                               cp_iters=10)
    assert count_macs(capped, x) <= 0.4 * total
    report = capped.dwconvert_report
    assert report.max_macs == 0.4 and "at most 0.400" in report.summary()
    assert report.speedup >= 1.2 * (1 - 1e-9)


def test_max_macs_alone_needs_no_time_budget():
    net, x = Net().eval(), example()
    capped = dwconvert.convert(net, objective="latency", max_macs=0.5, example_inputs=x,
                               timer=FakeTimer({"dw-pw": 1.0, "pw-dw": 1.0, "cp": 1.0}),
                               cp_iters=10)
    assert capped.dwconvert_report.converted
    assert count_macs(capped, x) <= 0.5 * count_macs(net, x)


def test_max_macs_keeps_a_slower_layer_rather_than_break_the_cap():
    # Every converted module measures slower in the final check; putting the originals
    # back would exceed the cap, so the layers stay converted.
    net, x = Net().eval(), example()
    capped = dwconvert.convert(net, objective="latency", speedup=1.5, max_macs=0.5,
                               example_inputs=x, cp_iters=10,
                               timer=FakeTimer({"dw-pw": 1.0, "pw-dw": 1.0, "cp": 1.0},
                                               layout_stage_slowdown=100.0))
    assert capped.dwconvert_report.converted
    assert count_macs(capped, x) <= 0.5 * count_macs(net, x)


def test_unreachable_max_macs_names_the_reachable_fraction():
    net, x = Net().eval(), example()
    with pytest.raises(dwconvert.BudgetError, match="max_macs 0.001 is out of reach") as err:
        dwconvert.convert(net, objective="latency", max_macs=0.001, example_inputs=x,
                          timer=FakeTimer({"dw-pw": 1.0, "pw-dw": 1.0, "cp": 1.0}),
                          cp_iters=10)
    assert 0.001 < err.value.minimum < 1


def test_max_macs_arguments_are_checked():
    x = example()
    with pytest.raises(ValueError, match="objective='latency'"):
        dwconvert.convert(Net(), max_macs=0.5, example_inputs=x)
    for bad in (0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"max_macs .* \(0, 1\]"):
            dwconvert.convert(Net(), objective="latency", max_macs=bad, example_inputs=x)
    with pytest.raises(ValueError, match="without rank"):
        dwconvert.convert(Net(), objective="latency", form="cp", rank=2, max_macs=0.5,
                          example_inputs=x)


def test_interpolated_times_are_exact_for_linear_costs():
    assert timed_ranks([1]) == [1]
    assert timed_ranks(list(range(1, 101))) == [1, 51, 100]
    assert timed_ranks([1, 2]) == [1, 2]
    assert timed_ranks([1, 2, 8, 16, 24, 32]) == [1, 8, 32]
    points = [(r, 0.5 + 0.25 * r, "plain") for r in timed_ranks(list(range(1, 101)))]
    times = LayerTimes(original=10.0, points={"cp": points})
    for rank in (1, 7, 51, 80, 100):
        assert math.isclose(times.time("cp", rank), 0.5 + 0.25 * rank)
    single = LayerTimes(original=1.0, points={"cp": [(1, 0.3, "matmul")]})
    assert single.time("cp", 1) == 0.3 and single.layout("cp", 1) == "matmul"


def test_real_timer_runs_interleaved_and_returns_medians():
    conv = nn.Conv2d(4, 4, 3)
    x = torch.randn(1, 4, 8, 8)
    seconds = MedianTimer(warmup=1, repeats=3, min_seconds=0)({"a": conv, "b": nn.Identity()},
                                                              (x,))
    assert set(seconds) == {"a", "b"} and all(s > 0 for s in seconds.values())
    order = []
    time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                     warmup=0, repeats=3)
    assert order == ["a", "b", "b", "a", "a", "b"]
    order.clear()
    time_interleaved({name: (lambda name=name: order.append(name)) for name in "abc"},
                     warmup=0, repeats=4)
    assert "".join(order) == "abc" "bca" "cab" "abc"
    assert all(first != second for first, second in zip(order, order[1:]))


def test_onnxruntime_sessions_run_the_model_and_do_not_spin_between_calls(monkeypatch):
    # Spinning threads of one session would slow the next one timed after it.
    ort = pytest.importorskip("onnxruntime")
    from dwconvert.latency import prepare

    sessions = []

    class Recorded(ort.InferenceSession):
        def __init__(self, path, options, **kwargs):
            super().__init__(path, options, **kwargs)
            sessions.append(options)

    monkeypatch.setattr(ort, "InferenceSession", Recorded)
    conv = nn.Conv2d(3, 5, 3, padding=1).eval()
    x = torch.randn(2, 3, 8, 8)
    (out,) = prepare(conv, x, "onnxruntime")()
    torch.testing.assert_close(torch.from_numpy(out), conv(x), rtol=1e-4, atol=1e-5)
    assert [o.get_session_config_entry("session.intra_op.allow_spinning")
            for o in sessions] == ["0"]


def test_capture_inputs_sees_each_layer_input():
    net = Net().eval()
    x = example()
    seen = capture_inputs(net, {"conv2": net.conv2, "conv3": net.conv3}, (x,))
    assert seen["conv2"][0].shape == (1, 32, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(seen["conv3"][0],
                                   torch.relu(net.conv2(torch.relu(net.conv1(x)))))


@pytest.mark.parametrize("objective", ["macs", "latency"])
def test_rank_multiple_keeps_inner_widths_aligned(objective):
    timer = FakeTimer({"dw-pw": 1.0, "pw-dw": 1.0, "cp": 1.0})
    small = dwconvert.convert(Net().eval(), form="cp", budget=0.5, objective=objective,
                              rank_multiple=8, example_inputs=example(), timer=timer,
                              cp_iters=10)
    ranks = [r.rank for r in small.dwconvert_report.converted]
    assert ranks and all(r < 8 or r % 8 == 0 for r in ranks), ranks
    with pytest.raises(ValueError, match="rank_multiple"):
        dwconvert.convert(Net(), budget=0.5, rank_multiple=0, example_inputs=example())


def test_latency_with_a_fixed_layout():
    timer = FakeTimer({"dw-pw": 50.0, "pw-dw": 1.0, "cp": 1.0})
    small = dwconvert.convert(Net().eval(), objective="latency", speedup=1.2, layout="matmul",
                              example_inputs=example(), timer=timer, cp_iters=10)
    converted = small.dwconvert_report.converted
    assert converted and all(r.layout == "matmul" for r in converted)
    assert all(r.time_after < r.time_before for r in converted)
