"""The data-aware path: whitening, least-squares refit, BatchNorm recalibration, auto."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dwconvert
from dwconvert import calibrate, factorize
from dwconvert.factorize import FORMS, KernelShape, Whitening
from dwconvert.layers import FORM_CLASSES

RANKS = {"dw-pw": 2, "pw-dw": 2, "cp": 12}


def correlated_inputs(batches: int, channels: int = 16, size: int = 12, seed: int = 0):
    """Images whose channels mix 4 latent maps and whose pixels are smooth."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, 4, generator=gen, dtype=torch.float64)
    out = []
    for _ in range(batches):
        z = torch.randn(16, 4, size, size, generator=gen, dtype=torch.float64)
        x = F.avg_pool2d(torch.einsum("cm,bmhw->bchw", mix, z), 3, 1, 1)
        out.append(torch.relu(x) + 0.05 * torch.randn(x.shape, generator=gen, dtype=x.dtype))
    return out


def relative_output_error(module, conv, batches) -> float:
    with torch.no_grad():
        err = sum(float((module(x) - conv(x)).pow(2).sum()) for x in batches)
        ref = sum(float((conv(x) - conv(x).mean(dim=(0, 2, 3), keepdim=True)).pow(2).sum())
                  for x in batches)
    return (err / ref) ** 0.5


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1).double()
    calib, held_out = correlated_inputs(4, seed=1), correlated_inputs(2, seed=2)
    return conv, calib, held_out


def _whitening(conv, batches) -> Whitening:
    model = nn.Sequential(conv)
    stats = calibrate.collect_stats(model, ["0"], batches)["0"]
    return Whitening.from_moments(stats.patch, stats.channel, stats.out_energy,
                                  stats.patch_sum, stats.count)


def test_stats_match_unfold_computed_by_hand(layer):
    conv, calib, _ = layer
    stats = calibrate.collect_stats(nn.Sequential(conv), ["0"], calib)["0"]
    patches = torch.cat([F.unfold(x, 3, padding=1) for x in calib])  # (B, M*9, L)
    p = patches.view(patches.shape[0], 16, 9, -1)
    expected = torch.einsum("bmsl,bmtl->mst", p, p)
    assert torch.allclose(stats.patch, expected, rtol=1e-10)
    assert stats.count == p.shape[0] * p.shape[-1]
    assert torch.allclose(stats.patch_sum, p.sum(dim=(0, 3)))


@pytest.mark.parametrize("form", FORMS)
def test_whitening_lowers_output_error_on_held_out_data(layer, form):
    conv, calib, held_out = layer
    whitening = _whitening(conv, calib)
    errors = {}
    for label, w in (("weights", None), ("whitened", whitening)):
        d = factorize.decompose(form, conv.weight, 1, RANKS[form], whitening=w)
        module = FORM_CLASSES[form].from_decomposition(conv, d)
        errors[label] = relative_output_error(module, conv, held_out)
    assert errors["whitened"] < 0.9 * errors["weights"], errors


@pytest.mark.parametrize("form", FORMS)
def test_whitened_error_estimate_is_close_to_the_measured_one(layer, form):
    conv, calib, _ = layer
    d = factorize.decompose(form, conv.weight, 1, RANKS[form], whitening=_whitening(conv, calib))
    module = FORM_CLASSES[form].from_decomposition(conv, d)
    measured = relative_output_error(module, conv, calib)
    assert d.error == pytest.approx(measured, rel=0.35), (d.error, measured)


@pytest.mark.parametrize("form", FORMS)
def test_refit_recovers_a_known_last_layer(form):
    """Targets made by a known chain; a scrambled last layer is solved back exactly."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=2).double()
    truth = FORM_CLASSES[form].from_conv(conv, RANKS[form] // 2 or 1)
    known_last = truth.layers()[-1]
    known = (known_last.weight.detach().clone(), known_last.bias.detach().clone())

    # The "original" is the known chain itself; the candidate starts with a scrambled last layer.
    original = nn.Sequential(truth)
    converted = nn.Sequential(FORM_CLASSES[form].from_conv(conv, RANKS[form] // 2 or 1))
    candidate_last = converted[0].layers()[-1]
    with torch.no_grad():
        candidate_last.weight.add_(torch.randn_like(candidate_last.weight))
        candidate_last.bias.add_(1.0)
    batches = [torch.randn(8, 8, 10, 10, dtype=torch.float64) for _ in range(3)]
    [result] = calibrate.refit(original, converted, ["0"], batches, ridge=0.0)

    assert result.error_before > 0.1
    assert result.error_after < 1e-6  # computed from Gram sums: ~sqrt(eps) floor
    assert torch.allclose(candidate_last.weight, known[0], atol=1e-7), \
        (candidate_last.weight - known[0]).abs().max()
    assert torch.allclose(candidate_last.bias, known[1], atol=1e-7)


def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).double().eval()


def _smooth_images(count, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, 16, 16, generator=gen, dtype=torch.float64)
    return F.avg_pool2d(x, 3, 1, 1)


@pytest.mark.parametrize("form", ["dw-pw", "pw-dw", "cp", "auto"])
def test_calibrated_model_is_closer_to_the_original(form):
    model = _small_cnn()
    calib, held_out = _smooth_images(128, 1), _smooth_images(64, 2)
    example = held_out[:1]
    with torch.no_grad():
        ref = model(held_out)
    errors = {}
    for label, data in (("weights", None), ("calibrated", calib)):
        converted = dwconvert.convert(model, form=form, budget=0.4, example_inputs=example,
                                      calibration=data)
        with torch.no_grad():
            errors[label] = float((converted(held_out) - ref).norm() / ref.norm())
        report = converted.dwconvert_report
        assert report.mac_ratio <= 0.4 + 1e-9
        measured = [r.output_error for r in report.converted]
        assert all((m is None) == (data is None) for m in measured)
    assert errors["calibrated"] < errors["weights"], errors


def test_recalibrate_batchnorm_matches_batch_statistics():
    model = _small_cnn()
    batches = [_smooth_images(32, seed) for seed in range(3)]
    assert calibrate.recalibrate_batchnorm(model, batches) == 2
    with torch.no_grad():
        first = [model[0](x) for x in batches]
    # A cumulative average over equal batches: the mean of the batch statistics.
    mean = torch.stack([y.mean(dim=(0, 2, 3)) for y in first]).mean(dim=0)
    var = torch.stack([y.var(dim=(0, 2, 3), unbiased=True) for y in first]).mean(dim=0)
    assert torch.allclose(model[1].running_mean, mean, atol=1e-10)
    assert torch.allclose(model[1].running_var, var, rtol=1e-6)
    assert not model.training and not model[1].training


def test_as_batches_accepts_tensors_loaders_and_pairs():
    x = torch.randn(100, 3, 8, 8)
    assert [b.shape[0] for b in calibrate.as_batches(x, batch_size=64)] == [64, 36]
    pairs = [(x[:40], torch.zeros(40)), (x[40:], torch.zeros(60))]
    assert sum(len(b) for b in calibrate.as_batches(pairs, max_samples=70)) == 70
    with pytest.raises(TypeError, match="calibration"):
        calibrate.as_batches(3)
    with pytest.raises(ValueError, match="no images"):
        calibrate.as_batches([])


def test_tolerance_gives_each_layer_the_cheapest_option_within_it():
    model = _small_cnn()
    example = _smooth_images(1, 3)
    tolerance = 0.5
    converted = dwconvert.convert(model, form="pw-dw", tolerance=tolerance,
                                  example_inputs=example)
    for record in converted.dwconvert_report.converted:
        assert record.weight_error <= tolerance + 1e-9
        conv = model.get_submodule(record.name)
        errors = factorize.svd_truncation_errors("pw-dw", conv.weight, conv.groups)
        if record.rank > 1:  # one rank lower would have broken the tolerance
            assert errors[record.rank - 2] > tolerance


def test_budget_on_params_keeps_the_parameter_fraction():
    model = _small_cnn()
    converted = dwconvert.convert(model, form="auto", budget=0.5, budget_on="params",
                                  example_inputs=_smooth_images(1, 3))
    report = converted.dwconvert_report
    assert report.params_after <= 0.5 * report.params_before
    assert report.params_after == sum(p.numel() for p in converted.parameters())


def test_auto_chooses_forms_and_reports_them():
    model = _small_cnn()
    converted = dwconvert.convert(model, budget=0.3, example_inputs=_smooth_images(1, 3))
    report = converted.dwconvert_report
    assert report.converted
    assert {r.form for r in report.converted} <= set(FORMS)
    assert report.mac_ratio <= 0.3 + 1e-9


def test_budget_scope_convertible_counts_only_convertible_convs():
    model = nn.Sequential(nn.Conv2d(8, 64, 1), nn.Conv2d(64, 64, 3, padding=1)).eval()
    example = torch.randn(1, 8, 16, 16)
    converted = dwconvert.convert(model, form="cp", budget=0.25, budget_scope="convertible",
                                  example_inputs=example)
    [record] = converted.dwconvert_report.converted
    assert record.macs_after <= 0.25 * record.macs_before
    assert record.macs_after > 0.15 * record.macs_before
    assert KernelShape.of(model[1].weight, 1).k2 == 9
