"""``dwconvert export``: files that onnxruntime and torch.jit run as PyTorch does."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import assert_close
from test_cli import _run
from torch import nn

import dwconvert
from dwconvert.cli.common import EXIT_CONVERSION, EXIT_OK, EXIT_USAGE
from dwconvert.export import ExportError, export_torchscript

pytestmark = [pytest.mark.usefixtures("single_thread_module"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                         "ignore::FutureWarning",
                                         "ignore::torch.jit.TracerWarning")]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 7))

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module")
def converted_path(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    small = dwconvert.convert(model, form="cp", budget=0.5,
                              example_inputs=torch.randn(1, 3, 16, 16), cp_iters=10)
    path = tmp_path_factory.mktemp("export") / "net.safetensors"
    dwconvert.save(small, path, arch=f"{__name__}:Net",
                   extra={"input_shape": [1, 3, 16, 16]})
    return path


def test_onnx_and_torchscript_run_as_pytorch(converted_path, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    onnx_path, ts_path = tmp_path / "net.onnx", tmp_path / "net.pt"
    code, out, err = _run(["export", converted_path, "--onnx", onnx_path,
                           "--torchscript", ts_path], capsys)
    assert code == EXIT_OK, err
    assert "batch sizes 1, 3" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.pt"]

    model = dwconvert.load(converted_path)
    x = torch.randn(5, 3, 16, 16)  # a batch size the export check did not use
    with torch.no_grad():
        expected = model(x)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (first,) = session.get_inputs()
    assert isinstance(first.shape[0], str)  # a named, dynamic batch dimension
    assert first.shape[1:] == [3, 16, 16]
    (out_onnx,) = session.run(None, {first.name: x.numpy()})
    assert_close(torch.from_numpy(out_onnx), expected, 1e-4, "onnxruntime at batch 5")
    with torch.no_grad():
        assert_close(torch.jit.load(str(ts_path))(x), expected, 1e-5, "TorchScript at batch 5")


def test_existing_output_needs_force(converted_path, tmp_path, capsys):
    path = tmp_path / "net.pt"
    path.write_bytes(b"keep")
    code, _, err = _run(["export", converted_path, "--torchscript", path], capsys)
    assert code == EXIT_USAGE and "--force" in err and path.read_bytes() == b"keep"
    code, _, err = _run(["export", converted_path, "--torchscript", path, "--force"], capsys)
    assert code == EXIT_OK, err
    assert path.read_bytes() != b"keep"


def test_nothing_to_export_and_missing_onnxruntime(converted_path, tmp_path, capsys,
                                                   monkeypatch):
    code, _, err = _run(["export", converted_path], capsys)
    assert code == EXIT_USAGE and "--onnx" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, err = _run(["export", converted_path, "--onnx", tmp_path / "n.onnx"], capsys)
    assert code == EXIT_USAGE and "pip install 'dwconvert[onnx]'" in err
    assert not list(tmp_path.iterdir())


class BatchDependent(nn.Module):
    """Branches on the batch size: a trace at batch 1 is wrong at batch 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        y = self.conv(x)
        return y * 2 if x.shape[0] == 1 else y


def test_a_file_that_disagrees_is_not_written(tmp_path, capsys):
    path = tmp_path / "bad.pt"
    with pytest.raises(ExportError, match="batch size 3"):
        export_torchscript(BatchDependent().eval(), torch.randn(1, 1, 8, 8), path)
    assert not list(tmp_path.iterdir())


def test_cli_reports_a_failed_check(tmp_path, capsys):
    model = dwconvert.convert(BatchDependent().eval(), form="dw-pw", rank=1,
                              example_inputs=torch.randn(1, 1, 8, 8))
    ckpt = dwconvert.save(model, tmp_path / "b.safetensors", arch=f"{__name__}:BatchDependent",
                          extra={"input_shape": [1, 1, 8, 8]})
    code, _, err = _run(["export", ckpt, "--torchscript", tmp_path / "b.pt"], capsys)
    assert code == EXIT_CONVERSION and "differs from PyTorch at batch size 3" in err
    assert not (tmp_path / "b.pt").exists()


def test_cli_refuses_one_file_for_both_formats_however_it_is_spelled(tmp_path, capsys,
                                                                     monkeypatch):
    model = dwconvert.convert(BatchDependent().eval(), form="dw-pw", rank=1,
                              example_inputs=torch.randn(1, 1, 8, 8))
    ckpt = dwconvert.save(model, tmp_path / "b.safetensors", arch=f"{__name__}:BatchDependent",
                          extra={"input_shape": [1, 1, 8, 8]})
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(["export", ckpt, "--onnx", "same.onnx", "--torchscript", "./same.onnx",
                         "--force"], capsys)
    assert code == EXIT_USAGE and "name the same file" in err
    assert not (tmp_path / "same.onnx").exists()
