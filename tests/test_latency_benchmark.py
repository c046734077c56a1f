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
