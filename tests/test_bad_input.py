"""Bad input, one case a row: a one-line error naming the value and the fix, a
documented exit code, no traceback, and nothing lost.

Every CLI case runs ``dwconvert compress`` in-process on a copy of the pretrained
MNIST CNN (or a file made from it) and checks: the exit code; one error line that
contains the words the case names; no traceback; the input's bytes and mtime
unchanged; no output and no temporary file left beside it. API cases check the
exception type and message of ``dwconvert.convert`` / ``load`` / ``read_state_dict``.
The number of bad inputs tried is printed at the end of the run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import SUMMARY_LINES
from torch import nn

import dwconvert
from dwconvert import checkpoint
from dwconvert.checkpoint import CheckpointError
from dwconvert.cli.common import EXIT_CONVERSION, EXIT_INPUT, EXIT_USAGE
from dwconvert.cli.main import main
from dwconvert.convert import WeightsError

CNN_ARCH = "digit_recognizer.model:CNN"
CNN_PATH = (Path(importlib.util.find_spec("digit_recognizer").origin).parent
            / "models" / "handwriting_model.pth")
TRIED: dict[str, int] = {"cli": 0, "api": 0}

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    SUMMARY_LINES["bad input"] = (f"bad inputs tried: {TRIED['cli'] + TRIED['api']} "
                                  f"({TRIED['cli']} CLI, {TRIED['api']} API)")


def _state() -> dict[str, torch.Tensor]:
    return torch.load(CNN_PATH, map_location="cpu", weights_only=True)


def _with(key: str, value: float) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        state = _state()
        state[key] = state[key].clone()
        state[key].view(-1)[3] = value
        path = folder / "bad-weights.pth"
        torch.save(state, path)
        return path
    return make


def _bytes(data: Callable[[bytes], bytes], suffix: str = ".pth") -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / f"input{suffix}"
        path.write_bytes(data(CNN_PATH.read_bytes()))
        return path
    return make


def _safetensors_truncated(folder: Path) -> Path:
    from safetensors.torch import save_file

    whole = folder / "whole.safetensors"
    save_file(_state(), whole)
    path = folder / "input.safetensors"
    path.write_bytes(whole.read_bytes()[:-1000])
    whole.unlink()
    return path


def _pickled_module(folder: Path) -> Path:
    from digit_recognizer.model import CNN

    path = folder / "whole.pth"
    torch.save(CNN(), path)
    return path


def _copy(folder: Path) -> Path:
    return Path(shutil.copy(CNN_PATH, folder / "cnn.pth"))


def _pointwise_only(folder: Path) -> Path:
    path = folder / "pointwise.pth"
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 3, groups=4)).state_dict(),
               path)
    return path


@dataclass
class CLICase:
    id: str
    make_input: Callable[[Path], Path]
    options: list[str]
    code: int
    words: tuple[str, ...]
    arch: str = CNN_ARCH
    usage: bool = False  # argparse's own error format


OK = ["--input-shape", "1,28,28", "--form", "dw-pw", "--rank", "2"]
CLI_CASES = [
    CLICase("missing", lambda d: d / "missing.pth", OK, EXIT_INPUT,
            ("missing.pth", "does not exist")),
    CLICase("folder", lambda d: d, OK, EXIT_INPUT, ("is not a file",)),
    CLICase("empty", _bytes(lambda b: b""), OK, EXIT_INPUT, ("cannot read checkpoint",)),
    CLICase("truncated", _bytes(lambda b: b[: len(b) // 2]), OK, EXIT_INPUT,
            ("cannot read checkpoint", "input.pth")),
    CLICase("truncated-tail", _bytes(lambda b: b[:-100]), OK, EXIT_INPUT,
            ("cannot read checkpoint",)),
    CLICase("corrupt", _bytes(lambda b: random.Random(0).randbytes(4096)), OK, EXIT_INPUT,
            ("not a PyTorch checkpoint",)),
    CLICase("truncated-safetensors", _safetensors_truncated, OK, EXIT_INPUT,
            ("cannot read safetensors file", "input.safetensors")),
    CLICase("pickled-module", _pickled_module, OK, EXIT_INPUT, ("--allow-pickle",)),
    CLICase("arch-mismatch", _copy, OK, EXIT_INPUT,
            ("missing (first 'conv1.weight')", "unexpected (first 'conv_layers.0.weight')",
             "--arch"), arch="torchvision.models:resnet18"),
    CLICase("arch-kwargs-mismatch", _copy, [*OK, "--arch-kwargs", '{"nope": 1}'], EXIT_INPUT,
            ("calling arch", "nope")),
    CLICase("arch-not-importable", _copy, OK, EXIT_INPUT,
            ("cannot import module 'no_such_pkg_dwc.models'", "PYTHONPATH"),
            arch="no_such_pkg_dwc.models:Net"),
    CLICase("arch-no-colon", _copy, OK, EXIT_INPUT, ("MODULE:CALLABLE",),
            arch="digit_recognizer.model.CNN"),
    CLICase("arch-no-attribute", _copy, OK, EXIT_INPUT, ("no attribute 'Nope'",),
            arch="digit_recognizer.model:Nope"),
    CLICase("input-shape-rejected", _copy, ["--input-shape", "3,32,32", "--rank", "2",
                                            "--form", "cp"], EXIT_INPUT,
            ("rejects an input of shape 1x3x32x32", "--input-shape")),
    CLICase("input-shape-malformed", _copy, ["--input-shape", "28x28", "--rank", "2"],
            EXIT_USAGE, ("'28x28'", "C,H,W"), usage=True),
    CLICase("budget-zero", _copy, ["--input-shape", "1,28,28", "--budget", "0"], EXIT_USAGE,
            ("'0'", "(0, 1]"), usage=True),
    CLICase("budget-above-one", _copy, ["--input-shape", "1,28,28", "--budget", "1.5"],
            EXIT_USAGE, ("'1.5'", "(0, 1]"), usage=True),
    CLICase("budget-nan", _copy, ["--input-shape", "1,28,28", "--budget", "nan"], EXIT_USAGE,
            ("'nan'",), usage=True),
    CLICase("budget-unreachable", _copy, ["--input-shape", "1,28,28", "--budget", "0.001",
                                          "--form", "pw-dw"], EXIT_CONVERSION,
            ("budget 0.001", "lowest reachable budget is 0.")),
    CLICase("rank-zero", _copy, ["--input-shape", "1,28,28", "--form", "cp", "--rank", "0"],
            EXIT_USAGE, ("rank '0'", "positive int"), usage=True),
    CLICase("rank-negative", _copy, ["--input-shape", "1,28,28", "--form", "cp",
                                     "--rank", "-1"], EXIT_USAGE, ("rank '-1'",), usage=True),
    CLICase("rank-without-form", _copy, ["--input-shape", "1,28,28", "--rank", "2"],
            EXIT_USAGE, ("needs an explicit form",)),
    CLICase("tolerance-zero", _copy, ["--input-shape", "1,28,28", "--tolerance", "0"],
            EXIT_USAGE, ("tolerance '0'",), usage=True),
    CLICase("nan-weights", _with("conv_layers.3.weight", math.nan), OK, EXIT_INPUT,
            ("conv_layers.3", "NaN or Inf", "--exclude conv_layers.3")),
    CLICase("inf-weights", _with("conv_layers.6.weight", math.inf), OK, EXIT_INPUT,
            ("conv_layers.6", "NaN or Inf", "--exclude conv_layers.6")),
    CLICase("no-convertible-conv", _pointwise_only, ["--input-shape", "1,8,8", "--form",
                                                     "dw-pw", "--rank", "2"],
            EXIT_CONVERSION, ("no conv was converted", "nothing was written"),
            arch="tests.test_bad_input:pointwise_net"),
    CLICase("calib-samples-zero", _copy, [*OK, "--calib", "mnist5k", "--calib-samples", "0"],
            EXIT_USAGE, ("--calib-samples 0",)),
    CLICase("calib-unknown-spec", _copy, [*OK, "--calib", "mnist6k"], EXIT_INPUT,
            ("unknown data spec 'mnist6k'",)),
    CLICase("arch-kwargs-not-json", _copy, [*OK, "--arch-kwargs", "{num_classes: 10}"],
            EXIT_USAGE, ("not valid JSON",), usage=True),
]


def _snapshot(path: Path):
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_cli_bad_input(case, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    source = case.make_input(folder)
    before = _snapshot(source)
    outdir = tmp_path / "out"
    outdir.mkdir()
    output = outdir / "converted.safetensors"
    argv = ["compress", str(source), "-o", str(output), "--arch", case.arch, *case.options]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    TRIED["cli"] += 1

    assert code == case.code, (code, err)
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("dwconvert compress: error: "), err
    if not case.usage:  # the error line, after any warnings dwconvert logged
        others = [x for x in err.strip().splitlines() if x != line]
        assert all(x.startswith("WARNING dwconvert") for x in others), err
    for words in case.words:
        assert words in line, (words, line)
    assert _snapshot(source) == before, "the input file changed"
    assert list(outdir.iterdir()) == [], "an output or temporary file was left"


def pointwise_net() -> nn.Module:
    """The architecture of ``_pointwise_only``: nothing in it can be converted."""
    return nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 3, groups=4))


def test_a_warning_the_summary_prints_is_not_logged_again(tmp_path, capsys, caplog):
    # A library caller is warned through logging; the command line prints the summary,
    # so the same words once are enough there.
    x = torch.randn(1, 1, 8, 8)
    dwconvert.convert(pointwise_net(), form="dw-pw", rank=2, example_inputs=x)
    assert [r for r in caplog.records if "was converted" in r.getMessage()]
    caplog.clear()
    code = main(["compress", str(_pointwise_only(tmp_path)), "-o", str(tmp_path / "o.safetensors"),
                 "--arch", "tests.test_bad_input:pointwise_net", "--input-shape", "1,8,8",
                 "--form", "dw-pw", "--rank", "2"])
    out, err = capsys.readouterr()
    assert code == EXIT_CONVERSION
    assert out.count("no conv was converted") == 1
    assert not [r for r in caplog.records if "was converted" in r.getMessage()]
    assert "no conv of" not in err


def test_debug_shows_a_traceback(tmp_path, capsys):
    with pytest.raises(Exception):
        main(["--debug", "compress", str(tmp_path / "missing.pth"), "-o",
              str(tmp_path / "o.safetensors"), "--arch", CNN_ARCH, *OK])
    TRIED["cli"] += 1


def test_interrupted_save_leaves_no_file(tmp_path, capsys, monkeypatch):
    source = _copy(tmp_path)
    before = _snapshot(source)
    output = tmp_path / "out" / "converted.safetensors"
    output.parent.mkdir()

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    code = main(["compress", str(source), "-o", str(output), "--arch", CNN_ARCH, *OK])
    _, err = capsys.readouterr()
    TRIED["cli"] += 1
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert list(output.parent.iterdir()) == []
    assert _snapshot(source) == before


def test_existing_output_is_kept_without_force(tmp_path, capsys):
    source = _copy(tmp_path)
    output = tmp_path / "o.safetensors"
    output.write_bytes(b"keep me")
    code = main(["compress", str(source), "-o", str(output), "--arch", CNN_ARCH, *OK])
    _, err = capsys.readouterr()
    TRIED["cli"] += 1
    assert code == EXIT_USAGE and "--force" in err and "Traceback" not in err
    assert output.read_bytes() == b"keep me"


def test_an_output_that_is_a_dangling_symlink_is_refused_before_any_work(tmp_path, capsys):
    source = _copy(tmp_path)
    output = tmp_path / "o.safetensors"
    output.symlink_to(tmp_path / "missing" / "target.safetensors")
    code = main(["compress", str(source), "-o", str(output), "--arch", CNN_ARCH, *OK])
    _, err = capsys.readouterr()
    TRIED["cli"] += 1
    assert code == EXIT_USAGE and "symlink to a missing file" in err
    assert output.is_symlink() and not output.exists()


def test_an_output_that_appears_during_the_run_is_kept(tmp_path, capsys, monkeypatch):
    # Checked absent at the start, then written by someone else while converting.
    source = _copy(tmp_path)
    output = tmp_path / "out" / "o.safetensors"
    output.parent.mkdir()
    real_save_file = checkpoint.save_file

    def someone_writes_it_first(tensors, filename, metadata=None):
        output.write_bytes(b"theirs")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", someone_writes_it_first)
    code = main(["compress", str(source), "-o", str(output), "--arch", CNN_ARCH, *OK])
    _, err = capsys.readouterr()
    TRIED["cli"] += 1
    assert code == EXIT_USAGE and "appeared while it was being written" in err
    assert "--force" in err and "overwrite=True" not in err  # the option a CLI user has
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert output.read_bytes() == b"theirs"
    assert list(output.parent.iterdir()) == [output]  # no temporary file left


# --- the API --------------------------------------------------------------------------------


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 64, 4))


def _nan_net() -> nn.Sequential:
    model = _net()
    with torch.no_grad():
        model[2].weight[1, 2, 0, 0] = math.nan
    return model


API_CASES = [
    ("budget-zero", lambda: dwconvert.convert(_net(), budget=0), ValueError, ("(0, 1]", "0")),
    ("budget-above-one", lambda: dwconvert.convert(_net(), budget=1.01), ValueError,
     ("1.01",)),
    ("rank-zero", lambda: dwconvert.convert(_net(), form="cp", rank=0), ValueError,
     ("positive int", "0")),
    ("rank-float", lambda: dwconvert.convert(_net(), form="cp", rank=1.5), ValueError,
     ("1.5",)),
    ("budget-unreachable", lambda: dwconvert.convert(
        _net(), form="dw-pw", budget=0.01, example_inputs=torch.randn(1, 3, 8, 8)),
     dwconvert.BudgetError, ("lowest reachable budget",)),
    ("example-input-rejected", lambda: dwconvert.convert(
        _net(), form="dw-pw", rank=2, example_inputs=torch.randn(1, 3, 9, 9)),
     ValueError, ("rejects example_inputs of shape 1x3x9x9",)),
    ("nan-weights", lambda: dwconvert.convert(_nan_net(), form="dw-pw", rank=2), WeightsError,
     ("layer 2", "NaN or Inf", "exclude=['2']")),
    ("load-missing", lambda: dwconvert.load("/no/such/file.safetensors"), CheckpointError,
     ("/no/such/file.safetensors", "does not exist")),
    ("read-missing", lambda: checkpoint.read_state_dict("/no/such.pth"), CheckpointError,
     ("does not exist",)),
]


@pytest.mark.parametrize("make, error, words", [c[1:] for c in API_CASES],
                         ids=[c[0] for c in API_CASES])
def test_api_bad_input(make, error, words):
    with pytest.raises(error) as info:
        make()
    TRIED["api"] += 1
    message = str(info.value)
    assert "\n" not in message, message
    for w in words:
        assert w in message, (w, message)


def test_api_budget_error_carries_the_minimum():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(dwconvert.BudgetError) as info:
        dwconvert.convert(_net(), form="dw-pw", budget=0.01, example_inputs=x)
    TRIED["api"] += 1
    minimum = info.value.minimum
    assert 0.01 < minimum < 1
    result = dwconvert.convert(_net(), form="dw-pw", budget=minimum + 1e-6, example_inputs=x)
    assert result.dwconvert_report.converted


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_api_damaged_converted_checkpoint(damage, tmp_path):
    path = dwconvert.save(dwconvert.convert(_net(), form="dw-pw", rank=2),
                          tmp_path / "c.safetensors", arch="tests.test_bad_input:_net")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated"
                     else random.Random(0).randbytes(len(data)))
    before = _snapshot(path)
    with pytest.raises(CheckpointError) as info:
        dwconvert.load(path)
    TRIED["api"] += 1
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert _snapshot(path) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads files without read permission")
def test_unreadable_checkpoint(tmp_path, capsys):
    source = _copy(tmp_path)
    source.chmod(0)
    try:
        code = main(["compress", str(source), "-o", str(tmp_path / "o.safetensors"),
                     "--arch", CNN_ARCH, *OK])
    finally:
        source.chmod(0o644)
    _, err = capsys.readouterr()
    TRIED["cli"] += 1
    assert code == EXIT_INPUT and "Traceback" not in err and str(source) in err
