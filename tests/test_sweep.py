"""dwconvert.sweep and ``dwconvert sweep``: MACs, accuracy, latency and fronts per budget."""

from __future__ import annotations

import csv
import sys
import time

import pytest
import torch
from conftest import count_macs
from test_cli import CNN_ARCH, CNN_PATH, SHAPE, _cnn, _predictions, _run, mnist  # noqa: F401
from torch import nn

import dwconvert
from dwconvert.cli.common import EXIT_OK, EXIT_USAGE
from dwconvert.sweep import median_latencies, median_latency, pareto_front, sweep

pytestmark = pytest.mark.usefixtures("single_thread_module")


def brute_front(points):
    """Whether each (cost, loss) point is dominated, by the definition, pair by pair."""
    on = []
    for i, (c, loss) in enumerate(points):
        dominated = False
        for j, (c2, loss2) in enumerate(points):
            if i != j and c2 <= c and loss2 <= loss and (c2, loss2) != (c, loss):
                dominated = True
        on.append(not dominated)
    return on


def test_pareto_front():
    assert pareto_front([(1, 3), (2, 2), (3, 1), (3, 3), (2, 2)]) == \
        [True, True, True, False, True]
    generator = torch.Generator().manual_seed(0)
    points = [tuple(p) for p in torch.randint(0, 6, (40, 2), generator=generator).tolist()]
    assert pareto_front(points) == brute_front(points)


class Sleepy(nn.Module):
    def __init__(self, seconds: float = 0.004) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return x


def test_median_latency_measures_the_forward():
    seconds = median_latency(Sleepy(), (torch.zeros(1),), repeats=5, warmup=1)
    assert 0.004 <= seconds < 0.1
    short, long = median_latencies([Sleepy(0.002), Sleepy(0.02)], (torch.zeros(1),),
                                   repeats=5, warmup=0)
    assert 0.002 <= short < 0.02 <= long


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()


def test_sweep_points_are_the_models_it_converted():
    model, x = net(), torch.randn(1, 3, 12, 12)
    images = torch.randn(40, 3, 12, 12)
    labels = model(images).argmax(1)
    labels[::4] = (labels[::4] + 1) % 5  # the original gets exactly 75% right
    data = [(images[:25], labels[:25]), (images[25:], labels[25:])]
    result, models = sweep(model, x, [0.5, 0.25], data=data, data_name="random",
                           repeats=3, warmup=1, keep_models=True, form="dw-pw")
    assert [p.model for p in result.points] == ["original", "budget 0.5", "budget 0.25"]
    original = result.original
    assert original.macs == count_macs(model, x) and original.top1 == pytest.approx(0.75)
    assert original.latency_ratio == 1.0
    for point in result.points[1:]:
        converted = models[point.budget]
        assert point.macs == count_macs(converted, x)
        assert point.mac_ratio == pytest.approx(point.macs / original.macs)
        assert point.mac_ratio <= point.budget + 1e-9
        predicted = torch.cat([converted(b).argmax(1) for b, _ in data])
        assert point.top1 == pytest.approx(float((predicted == labels).float().mean()))
        assert point.latency_ratio == pytest.approx(point.latency_ms / original.latency_ms)
    fronts = brute_front([(p.macs, -p.top1) for p in result.points])
    assert [p.pareto_top1 for p in result.points] == fronts
    assert [p.pareto_latency for p in result.points] == \
        brute_front([(p.macs, p.latency_ms) for p in result.points])


def test_unreachable_budget_is_left_out_with_a_note():
    result, _ = sweep(net(), torch.randn(1, 3, 12, 12), [0.001], repeats=1, warmup=0,
                      form="dw-pw")
    assert [p.model for p in result.points] == ["original"]
    assert "budget 0.001 left out" in result.notes[0]


def test_cli_writes_csv_png_and_checkpoints(tmp_path, capsys, mnist):  # noqa: F811
    out = tmp_path / "sweep"
    code, stdout, err = _run(["sweep", CNN_PATH, "--arch", CNN_ARCH, *SHAPE,
                              "--budgets", "0.5,0.25", "--data", "mnist5k", "--limit", "300",
                              "--repeats", "3", "-o", out, "--report", tmp_path / "s.json"],
                             capsys)
    assert code == EXIT_OK, err
    with open(out / "sweep.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["model"] for row in rows] == ["original", "budget 0.5", "budget 0.25"]
    images, labels = mnist
    expected = (_predictions(_cnn(), images[:300]) == labels[:300]).double().mean()
    assert float(rows[0]["top1"]) == pytest.approx(float(expected))
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows[1:]:
        model = dwconvert.load(out / f"budget-{float(row['budget']):g}.safetensors")
        assert int(row["macs"]) == count_macs(model, images[:1])
        predicted = _predictions(model, images[:300])
        assert float(row["top1"]) == pytest.approx(float((predicted == labels[:300])
                                                         .double().mean()))
    assert sorted(p.name for p in out.iterdir()) == [
        "budget-0.25.safetensors", "budget-0.5.safetensors", "sweep.csv", "sweep.png"]

    code, _, err = _run(["sweep", CNN_PATH, "--arch", CNN_ARCH, *SHAPE, "--budgets", "0.5",
                         "--repeats", "1", "-o", out], capsys)
    assert code == EXIT_USAGE and "--force" in err


def test_cli_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = _run(["sweep", CNN_PATH, "--arch", CNN_ARCH, *SHAPE, "--budgets", "0.5",
                         "-o", tmp_path / "s"], capsys)
    assert code == EXIT_USAGE
    assert "pip install 'dwconvert[plot]'" in err and "--no-plot" in err
    assert not (tmp_path / "s").exists()


def test_cli_bad_budgets(tmp_path, capsys):
    code, _, err = _run(["sweep", CNN_PATH, "--arch", CNN_ARCH, *SHAPE, "--budgets", "0.5,2",
                         "-o", tmp_path / "s"], capsys)
    assert code == EXIT_USAGE and "budget '2'" in err


def test_cli_budgets_that_would_share_a_checkpoint_name(tmp_path, capsys):
    code, _, err = _run(["sweep", CNN_PATH, "--arch", CNN_ARCH, *SHAPE, "--budgets",
                         "0.5,0.5000001", "-o", tmp_path / "s"], capsys)
    assert code == EXIT_USAGE and "budget 0.5 more than once" in err
    assert not (tmp_path / "s").exists()


def test_cli_bad_input_leaves_no_folder(tmp_path, capsys):
    code, _, err = _run(["sweep", tmp_path / "missing.pth", "--arch", CNN_ARCH, *SHAPE,
                         "--budgets", "0.5", "-o", tmp_path / "s"], capsys)
    assert code == 3 and "missing.pth" in err
    assert not (tmp_path / "s").exists()
