"""The latency benchmark's target checks (benchmarks/latency.py), on made-up timings.

Each expected verdict follows from the numbers written here, so the checks that
decide what docs/benchmarks/latency.md calls met are themselves tested.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("latency_benchmark",
                                                      ROOT / "benchmarks/latency.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def results(macs: dict[str, float], seconds: dict[str, float], total: float = 300.0) -> dict:
    variants = [{"method": label.split(" @ ")[0], "label": label, "macs": value}
                for label, value in macs.items()]
    timing = {"device": "cpu", "runtime": "eager", "batch": 1,
              "seconds": {"original": 30.0, **seconds}, "skipped": {}}
    onnx = {**timing, "runtime": "onnxruntime", "seconds": dict(timing["seconds"])}
    return {"meta": {"budgets": [1 / 3]},
            "models": {"resnet18": {"macs": total, "variants": variants,
                                    "timings": [timing, onnx]}}}


def by_target(targets: list[dict]) -> dict[str, dict]:
    return {t["target"]: t for t in targets}


def test_resnet_targets_read_the_macs_row_and_any_row_within_a_third(bench):
    # MACs row: 30/20 = 1.5x; latency row: 30/15 = 2.0x at 95 <= 100 MACs.
    targets = by_target(bench.check_targets(results(
        {"dwconvert @ 1/3": 80, "dwconvert-latency @ 1/3": 95, "tltorch-cp @ 1/3": 99},
        {"dwconvert @ 1/3": 20.0, "dwconvert-latency @ 1/3": 15.0, "tltorch-cp @ 1/3": 40.0})))
    macs_row = targets["resnet18, budget 1/3, batch 1, eager: >= 1.6x (MACs objective)"]
    assert macs_row["measured"] == pytest.approx(1.5) and not macs_row["met"]
    within = targets["resnet18, any dwconvert row keeping at most 1/3 of the MACs, batch 1, "
                     "eager: >= 1.6x"]
    assert within["measured"] == "2.00x (dwconvert-latency @ 1/3)" and within["met"]


def test_a_row_over_a_third_of_the_macs_does_not_count_as_within(bench):
    targets = by_target(bench.check_targets(results(
        {"dwconvert @ 1/3": 80, "dwconvert-latency @ 1/3": 120},
        {"dwconvert @ 1/3": 20.0, "dwconvert-latency @ 1/3": 10.0})))
    within = targets["resnet18, any dwconvert row keeping at most 1/3 of the MACs, batch 1, "
                     "onnxruntime: >= 1.8x"]
    assert within["measured"] == "1.50x (dwconvert @ 1/3)" and not within["met"]


def test_peer_is_compared_only_with_rows_of_no_more_macs(bench):
    # The fast latency row has more MACs than the peer, so only the MACs row counts
    # (97 is within the 2% allowance of 96), and it is slower than the peer.
    targets = bench.check_targets(results(
        {"dwconvert @ 1/3": 97, "dwconvert-latency @ 1/3": 150, "tltorch-cp @ 1/3": 96},
        {"dwconvert @ 1/3": 25.0, "dwconvert-latency @ 1/3": 10.0, "tltorch-cp @ 1/3": 24.0}))
    peer = next(t for t in targets if t["target"].startswith("faster than tltorch-cp"))
    assert not peer["met"] and peer["measured"].startswith("0 of 2 settings ahead")


def test_an_unconverted_latency_row_is_named_as_the_original_against_itself(bench):
    targets = bench.check_targets(results(
        {"dwconvert @ 1/3": 80, "dwconvert-latency @ 1/3": 300},
        {"dwconvert @ 1/3": 20.0, "dwconvert-latency @ 1/3": 31.0}))
    never = next(t for t in targets if t["target"].startswith("objective=latency never"))
    # 31 > 30 * 1.02: slower beyond the noise allowance, in both runtimes.
    assert not never["met"] and never["measured"].startswith("0 of 2 not slower")
    assert "nothing converted" in never["measured"]


def test_slower_means_beyond_the_noise_of_the_original_against_its_copy(bench):
    data = results({"dwconvert @ 1/3": 80, "dwconvert-latency @ 1/3": 90},
                   {"dwconvert @ 1/3": 20.0, "dwconvert-latency @ 1/3": 32.0})
    eager, onnx = data["models"]["resnet18"]["timings"]
    eager["seconds"][bench.AGAIN] = 33.0  # identical models 10% apart: 32 is within it
    onnx["seconds"].update({bench.AGAIN: 30.3, "dwconvert-latency @ 1/3": 36.0})
    never = next(t for t in bench.check_targets(data)
                 if t["target"].startswith("objective=latency never"))
    # The floor is the gap of the copies, 33/30 - 1 = 10%; 36 > 30 * 1.1, the faster copy.
    assert "resnet18 10%" in never["target"]
    assert never["measured"].startswith("1 of 2 not slower")
    assert "onnxruntime b1 dwconvert-latency @ 1/3 0.83x" in never["measured"]


def test_copies_too_far_apart_give_no_verdict(bench):
    data = results({"dwconvert-latency @ 1/3": 90}, {"dwconvert-latency @ 1/3": 20.0})
    eager, _ = data["models"]["resnet18"]["timings"]
    eager["seconds"][bench.AGAIN] = 36.0  # identical models 20% apart: a busy machine
    never = next(t for t in bench.check_targets(data)
                 if t["target"].startswith("objective=latency never"))
    assert never["met"] is None and "too noisy to judge" in never["target"]
    eager["seconds"][bench.AGAIN] = 31.5  # 5% apart: judged again
    never = next(t for t in bench.check_targets(data)
                 if t["target"].startswith("objective=latency never"))
    assert never["met"] is True and "too noisy" not in never["target"]


def test_speedups_are_against_the_faster_copy_and_capped_rows_are_apart(bench):
    data = results({"dwconvert @ 1/3": 100, "dwconvert-latency-capped @ 1/3": 100},
                   {"dwconvert @ 1/3": 15.0, "dwconvert-latency-capped @ 1/3": 40.0})
    for timing in data["models"]["resnet18"]["timings"]:
        timing["seconds"][bench.AGAIN] = 24.0  # the copy ran faster than the first (30)
    targets = by_target(bench.check_targets(data))
    # 24 / 15 = 1.6x, not 30 / 15 = 2.0x.
    assert targets["resnet18, budget 1/3, batch 1, eager: >= 1.6x (MACs objective)"][
        "measured"] == pytest.approx(1.6)
    capped = next(t for t in targets.values() if "with max_macs" in t["target"])
    assert capped["met"] is None and capped["measured"].startswith("0 of 2 not slower")
    assert not any(t["target"].startswith("objective=latency never") for t in targets.values())


def test_a_variant_shares_only_the_weights_conversion_left_alone(bench):
    import copy

    import torch
    from torch import nn

    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                             nn.Linear(4 * 6 * 6, 5)).eval()
    variant = copy.deepcopy(original)
    variant[0] = nn.Conv2d(3, 4, 3)  # as a conversion would replace it
    variant[1].running_mean += 1.0  # and a changed buffer
    x = torch.randn(2, 3, 8, 8)
    expected = variant(x)

    bench.share_unchanged(variant, original)

    assert variant[3].weight is original[3].weight and variant[3].bias is original[3].bias
    assert variant[1].running_var is original[1].running_var
    assert variant[1].running_mean is not original[1].running_mean
    assert variant[0].weight is not original[0].weight
    assert torch.equal(variant(x), expected)


def test_the_channels_last_columns_read_the_conversion_made_in_channels_last(bench):
    variant = {"method": "dwconvert-latency", "label": "dwconvert-latency @ 1/3", "macs": 50,
               "mac_reduction": 2.0, "note": "", "macs_cl": 60, "mac_reduction_cl": 5 / 3,
               "note_cl": "asked again"}
    assert bench.variant_for(variant, "eager") is variant
    cl = bench.variant_for(variant, "channels_last")
    assert (cl["macs"], cl["mac_reduction"], cl["note"]) == (60, 5 / 3, "asked again")
    assert cl["label"] == variant["label"] and not any(k.endswith("_cl") for k in cl)
    # Without a conversion of its own (a MACs-objective row), channels_last reads the one.
    plain = {"method": "dwconvert", "label": "dwconvert @ 1/3", "macs": 50, "note": ""}
    assert bench.variant_for(plain, "channels_last") is plain

    # In the report: 30/20 = 1.5x in both, efficiency 1.5/2 in eager, 1.5/(5/3) in CL.
    timings = [{"device": "cpu", "runtime": runtime, "batch": 1, "skipped": {},
                "seconds": {"original": 30.0, variant["label"]: 20.0}}
               for runtime in ("eager", "channels_last")]
    text = bench.model_section("m", {"input": [3, 8, 8], "macs": 100, "variants": [variant],
                                     "timings": timings})
    assert "| dwconvert-latency @ 1/3 | 0.500 | 1.50x (0.75) | 1.50x (0.90) |" in text
    assert "where it keeps 0.600 of the MACs" in text and bench.CONVERTED_AGAIN in text
    assert "dwconvert-latency @ 1/3, converted in channels_last: asked again" in text


def test_only_the_timed_rows_are_converted_again_and_not_for_a_model_failing_there(
        bench, monkeypatch):
    import torch
    from torch import nn

    import dwconvert
    from dwconvert.layouts import is_channels_last

    # A conversion by MACs stands in for the timed one, so that the outcome does not
    # depend on this machine's speed; it records the memory format it was given.
    seen = []

    def by_macs(model, x, budget, method, row, rank_multiple):
        weight = next(model.parameters())
        seen.append((method, is_channels_last(x), is_channels_last(weight)))
        return dwconvert.convert(model, budget=budget, example_inputs=x)

    monkeypatch.setattr(bench, "convert", by_macs)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(1, 8, 12, 12)
    rows = bench.build_variants("tiny", model, x, [1 / 2], ["dwconvert", bench.CAPPED],
                                rank_multiple=1, channels_last=True)
    assert seen == [("dwconvert", False, False), (bench.CAPPED, False, False),
                    (bench.CAPPED, True, True)]
    by_method = {row["method"]: row for row in rows}
    assert not any(key.endswith("_cl") for key in by_method["dwconvert"])
    capped = by_method[bench.CAPPED]
    assert capped["model_cl"] is not capped["model"] and capped["note_cl"] == ""
    assert capped["mac_reduction_cl"] == pytest.approx(
        bench.measure(model, (x,)).macs / capped["macs_cl"])
    assert not is_channels_last(model[0].weight)  # the original is left in NCHW
    assert model[0].weight.is_contiguous()  # the original is left in NCHW

    class Flattens(nn.Module):  # ``view`` fails on a channels_last tensor
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 16, 3, padding=1)

        def forward(self, x):
            return self.conv(x).view(x.shape[0], -1)

    flat = Flattens().eval()
    assert bench.channels_last_copy("flat", flat, x) is None
    rows = bench.build_variants("flat", flat, x, [1 / 2], [bench.CAPPED], rank_multiple=1,
                                channels_last=True)
    assert seen[-1] == (bench.CAPPED, False, False)  # converted in NCHW only
    assert not any(key.endswith("_cl") for key in rows[0])


def test_the_peer_is_compared_in_channels_last_at_the_macs_of_that_conversion(bench):
    # NCHW conversion: 95 MACs, within the peer's 96; the channels_last one keeps 150.
    data = results({"dwconvert-latency @ 1/3": 95, "tltorch-cp @ 1/3": 96},
                   {"dwconvert-latency @ 1/3": 10.0, "tltorch-cp @ 1/3": 24.0})
    model = data["models"]["resnet18"]
    model["variants"][0].update(macs_cl=150, mac_reduction_cl=2.0, note_cl="")
    model["timings"].append({**model["timings"][0], "runtime": "channels_last"})
    peer = next(t for t in bench.check_targets(data)
                if t["target"].startswith("faster than tltorch-cp"))
    # Ahead in eager and ONNX Runtime; in channels_last there is no row to compare.
    assert peer["met"] and peer["measured"] == "2 of 2 settings ahead"
    model["variants"][0]["macs_cl"] = 96
    peer = next(t for t in bench.check_targets(data)
                if t["target"].startswith("faster than tltorch-cp"))
    assert peer["measured"] == "3 of 3 settings ahead"
