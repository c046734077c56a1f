"""dwconvert.inspect and ``dwconvert inspect``: shares, skip reasons and predicted errors.

Shares are checked against MACs counted by this file's own hooks, the predicted
SVD errors against truncated SVDs computed here, the predicted CP error against
the kernel that a converted layer really computes, and the skip reasons against
what ``convert`` reports for the same model.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import closed_form_macs, count_macs, original_macs, reconstruct_kernel
from test_cli import CNN_ARCH, CNN_PATH, SHAPE, _cnn, _run
from torch import nn

import dwconvert
from dwconvert.cli.common import EXIT_OK, EXIT_USAGE

pytestmark = pytest.mark.usefixtures("single_thread_module")

X = torch.randn(1, 3, 10, 10)


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),
        nn.Conv2d(16, 8, 1),
        nn.Conv2d(8, 12, 3, stride=2, groups=2), nn.Flatten(), nn.Linear(12 * 16, 4),
    ).eval()


def truncated_svd_error(slices: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of rank-``rank`` SVDs of each matrix in ``slices``."""
    u, s, vh = torch.linalg.svd(slices.double(), full_matrices=False)
    approx = u[..., :rank] @ torch.diag_embed(s[..., :rank]) @ vh[..., :rank, :]
    return float((slices.double() - approx).norm() / slices.double().norm())


def test_shares_and_reasons_match_the_conversion():
    model = small_net()
    report = dwconvert.inspect(model, X)
    total = count_macs(model, X)
    assert report.macs == total
    sizes = {0: 100, 2: 100, 3: 100, 4: 16}  # output pixels of each conv
    for layer in report.layers:
        conv = model.get_submodule(layer.name)
        assert layer.macs == original_macs(conv, sizes[int(layer.name)])
        assert layer.mac_share == pytest.approx(layer.macs / total)
        assert layer.params == sum(p.numel() for p in conv.parameters())
    converted = dwconvert.convert(model, form="dw-pw", rank=1, example_inputs=X)
    reasons = {r.name: r.reason for r in converted.dwconvert_report.layers if not r.convertible}
    assert {layer.name: layer.reason for layer in report.layers if not layer.convertible} \
        == reasons == {"2": "already depthwise (groups == in_channels)",
                       "3": "1x1 conv: already pointwise"}
    assert [layer.name for layer in report.convertible] == ["0", "4"]
    assert report.convertible_mac_share == pytest.approx(
        (report.layers[0].macs + report.layers[3].macs) / total)


def test_exclude_is_the_conversions_exclude():
    report = dwconvert.inspect(small_net(), X, exclude=["4"])
    layer = report.layers[-1]
    assert not layer.convertible and layer.reason == "excluded by the user"
    assert layer.errors == []


def test_model_is_not_changed():
    model = small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dwconvert.inspect(model, X)
    assert all(type(m) is not dwconvert.FactorizedConv2d for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ranks_fit_the_fraction_and_svd_errors_are_exact():
    model = small_net()
    report = dwconvert.inspect(model, X, fractions=(0.5, 0.3))
    layer = report.layers[0]
    conv = model[0]
    w = conv.weight.detach()  # (16, 3, 3, 3), groups 1
    for entry in layer.errors:
        limit = entry.fraction * layer.macs
        if entry.rank is None:
            assert closed_form_macs(entry.form, conv, 1, 100, 100) > limit
            continue
        assert entry.macs == closed_form_macs(entry.form, conv, entry.rank, 100, 100) <= limit
        if entry.rank < entry.full_rank:
            assert closed_form_macs(entry.form, conv, entry.rank + 1, 100, 100) > limit
        if entry.form == "dw-pw":  # per input channel: N x k2 slices
            slices = w.permute(1, 0, 2, 3).reshape(3, 16, 9)
        elif entry.form == "pw-dw":  # per output channel: M x k2 slices
            slices = w.reshape(16, 3, 9)
        else:
            continue
        assert entry.error == pytest.approx(truncated_svd_error(slices, entry.rank), abs=1e-9)


def test_cp_prediction_is_what_the_conversion_computes():
    model = small_net()
    report = dwconvert.inspect(model, X, forms=("cp",), fractions=(0.25,), cp_iters=10)
    entry = report.layers[0].errors[0]
    module = dwconvert.CPConv2d.from_conv(model[0], rank=entry.rank, cp_iters=10)
    kernel = reconstruct_kernel("cp", [layer.weight for layer in module.layers()], 1,
                                entry.rank)
    w = model[0].weight.detach().double()
    assert entry.error == pytest.approx(float((w - kernel).norm() / w.norm()), rel=1e-6)


def test_bad_fractions_and_forms():
    with pytest.raises(ValueError, match="fractions"):
        dwconvert.inspect(small_net(), X, fractions=(1.5,))
    with pytest.raises(ValueError, match="unknown form"):
        dwconvert.inspect(small_net(), X, forms=("svd",))


def test_cli_prints_and_reports_the_python_records(tmp_path, capsys):
    path = tmp_path / "inspect.json"
    code, out, err = _run(["inspect", CNN_PATH, "--arch", CNN_ARCH, *SHAPE,
                           "--report", path], capsys)
    assert code == EXIT_OK, err
    expected = dwconvert.inspect(_cnn(), torch.randn(1, 1, 28, 28))
    assert json.loads(path.read_text()) == json.loads(json.dumps(expected.to_dict()))
    for layer in expected.layers:
        assert layer.name in out
    assert "3 of 3 convs can be converted" in out

    markdown = tmp_path / "inspect.md"
    code, out, err = _run(["inspect", CNN_PATH, "--arch", CNN_ARCH, *SHAPE,
                           "--report", markdown, "--fractions", "0.25"], capsys)
    assert code == EXIT_OK, err
    text = markdown.read_text()
    assert text.startswith("# Inspection\n")
    rows = [line for line in text.splitlines() if line.startswith("| conv_layers.")]
    assert len(rows) == 3 and "err @0.25" in text


def test_cli_bad_fractions_and_existing_report(tmp_path, capsys):
    code, _, err = _run(["inspect", CNN_PATH, "--arch", CNN_ARCH, *SHAPE,
                         "--fractions", "0.5,2"], capsys)
    assert code == EXIT_USAGE and "--fractions" in err
    report = tmp_path / "r.md"
    report.write_text("keep")
    code, _, err = _run(["inspect", CNN_PATH, "--arch", CNN_ARCH, *SHAPE,
                         "--report", report], capsys)
    assert code == EXIT_USAGE and "--force" in err and report.read_text() == "keep"
    code, _, err = _run(["inspect", CNN_PATH, "--arch", CNN_ARCH, *SHAPE,
                         "--report", tmp_path / "r.txt"], capsys)
    assert code == EXIT_USAGE and ".json or .md" in err
