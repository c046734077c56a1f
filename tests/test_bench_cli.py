"""``dwconvert bench`` and ``compress --objective latency`` on the pretrained MNIST CNN
(and on FashionResNet where a model must run in channels_last).

Timings are whatever this machine gives; the tests check what holds at any speed:
the table and JSON agree with each other, MAC reductions match MACs counted here,
and a latency conversion keeps no layer that it measured slower.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import count_macs

import dwconvert
from dwconvert import checkpoint
from dwconvert.cli.common import EXIT_CONVERSION, EXIT_OK, EXIT_USAGE
from dwconvert.cli.main import main

CNN_ARCH = "digit_recognizer.model:CNN"
CNN_PATH = (Path(importlib.util.find_spec("digit_recognizer").origin).parent
            / "models" / "handwriting_model.pth")
FASHION = Path(__file__).resolve().parents[1] / "examples/fashion_mnist/fashion_resnet.safetensors"
FASHION_ARCH = "examples.fashion_mnist.model:FashionResNet"

pytestmark = pytest.mark.usefixtures("single_thread_module")


def _cnn():
    from digit_recognizer.model import CNN

    model = CNN()
    model.load_state_dict(torch.load(CNN_PATH, map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def converted_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "cnn-cp.safetensors"
    code = main(["compress", str(CNN_PATH), "-o", str(path), "--arch", CNN_ARCH,
                 "--input-shape", "1,28,28", "--form", "cp", "--budget", "0.5",
                 "--cp-iters", "10"])
    assert code == EXIT_OK
    return path


def test_bench_a_converted_checkpoint(converted_path, tmp_path, capsys):
    capsys.readouterr()
    out_json = tmp_path / "bench.json"
    code = main(["bench", str(CNN_PATH), str(converted_path), "--input-shape", "1,28,28",
                 "--batch", "1,2", "--runtimes", "eager,onnxruntime", "--repeats", "2",
                 "--min-seconds", "0", "--warmup", "1", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    results = json.loads(out_json.read_text())["results"]
    assert [(r["runtime"], r["batch"]) for r in results] == [
        ("eager", 1), ("eager", 2), ("onnxruntime", 1), ("onnxruntime", 2)]
    x = torch.randn(1, 1, 28, 28)
    reduction = count_macs(_cnn(), x) / count_macs(dwconvert.load(converted_path), x)
    for row in results:
        assert row["original_s"] > 0 and row["converted_s"] > 0
        assert row["speedup"] == pytest.approx(row["original_s"] / row["converted_s"])
        assert row["mac_reduction"] == pytest.approx(reduction)
        assert row["efficiency"] == pytest.approx(row["speedup"] / reduction)
        assert f"{row['speedup']:.2f}x" in out
    # The JSON is not overwritten without --force.
    code = main(["bench", str(CNN_PATH), str(converted_path), "--input-shape", "1,28,28",
                 "--runtimes", "eager", "--repeats", "1", "--min-seconds", "0",
                 "--json", str(out_json)])
    assert code == EXIT_USAGE
    assert "--force" in capsys.readouterr().err


def test_bench_converts_when_given_only_the_original(capsys):
    code = main(["bench", str(CNN_PATH), "--arch", CNN_ARCH, "--input-shape", "1,28,28",
                 "--budget", "0.5", "--runtimes", "eager", "--repeats", "1", "--warmup", "0",
                 "--min-seconds", "0"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "model MACs" in out and "eager" in out and "efficiency" in out


def test_bench_rejects_a_bad_runtime(capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", str(CNN_PATH), "--input-shape", "1,28,28", "--runtimes", "tvm"])
    assert err.value.code == EXIT_USAGE
    assert "tvm" in capsys.readouterr().err


def test_compress_objective_latency_keeps_only_faster_layers(tmp_path, capsys):
    output = tmp_path / "cnn-fast.safetensors"
    code = main(["compress", str(CNN_PATH), "-o", str(output), "--arch", CNN_ARCH,
                 "--input-shape", "1,28,28", "--objective", "latency", "--speedup", "1.0",
                 "--cp-iters", "10"])
    out = capsys.readouterr().out
    # Converting nothing is a valid outcome on a slow machine (exit 4 then, nothing written).
    if code == EXIT_OK:
        assert "measured time" in out
        report = dwconvert.checkpoint.read_recipe(output)["extra"]["report"]
        for layer in report["layers"]:
            if layer["status"] == "converted":
                assert layer["time_after"] < layer["time_before"]
    else:
        assert code == EXIT_CONVERSION and not output.exists()


def test_speedup_needs_objective_latency(tmp_path, capsys):
    code = main(["compress", str(CNN_PATH), "-o", str(tmp_path / "x.safetensors"), "--arch",
                 CNN_ARCH, "--input-shape", "1,28,28", "--speedup", "1.5"])
    assert code == EXIT_USAGE
    assert "objective" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--min-seconds", "-1"], ["--min-seconds", "nan"],
                                  ["--threads", "0"], ["--threads", "99999999999999999999"],
                                  ["--repeats", "0"], ["--warmup", "-1"], ["--repeats", "2.5"],
                                  ["--batch", str(2**40)]])
def test_bench_rejects_bad_timing_options(converted_path, capsys, args):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", str(CNN_PATH), str(converted_path), "--input-shape", "1,28,28", *args])
    assert exit_.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert args[0] in err and repr(args[1]) in err and "Traceback" not in err


def test_bench_says_once_that_a_runtime_cannot_run_the_model(converted_path, caplog, capsys):
    # The CNN's forward calls ``view``, which fails on channels_last at every batch size.
    code = main(["bench", str(CNN_PATH), str(converted_path), "--input-shape", "1,28,28",
                 "--batch", "1,2", "--runtimes", "eager,channels_last", "--repeats", "1",
                 "--warmup", "0", "--min-seconds", "0"])
    assert code == EXIT_OK
    skips = [r for r in caplog.records if r.getMessage().startswith("skipping channels_last")]
    assert len(skips) == 1
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert ["eager", "1"] in rows and ["eager", "2"] in rows
    assert not any(row[:1] == ["channels_last"] for row in rows)


def test_bench_keeps_the_global_threads(converted_path, capsys):
    torch.set_num_threads(2)
    try:
        code = main(["--threads", "1", "bench", str(CNN_PATH), str(converted_path),
                     "--input-shape", "1,28,28", "--runtimes", "eager", "--repeats", "1",
                     "--warmup", "0", "--min-seconds", "0"])
        assert code == EXIT_OK and "\n1 thread(s)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(1)


def test_compress_max_macs_caps_a_latency_conversion(tmp_path, capsys):
    output = tmp_path / "cnn-capped.safetensors"
    code = main(["compress", str(CNN_PATH), "-o", str(output), "--arch", CNN_ARCH,
                 "--input-shape", "1,28,28", "--objective", "latency", "--max-macs", "0.6",
                 "--cp-iters", "10"])
    out = capsys.readouterr().out
    # Converting nothing is a valid outcome on a slow machine (exit 4 then, nothing written).
    if code == EXIT_OK:
        x = torch.randn(1, 1, 28, 28)
        assert count_macs(dwconvert.load(output), x) <= 0.6 * count_macs(_cnn(), x)
        assert "at most 0.600" in out
    else:
        assert code == EXIT_CONVERSION and not output.exists()


@pytest.mark.parametrize("args, message", [
    (["--max-macs", "1.5", "--objective", "latency"], "max-macs '1.5'"),
    (["--max-macs", "0.5"], "objective='latency'"),
])
def test_compress_rejects_bad_max_macs(tmp_path, capsys, args, message):
    output = tmp_path / "x.safetensors"
    try:
        code = main(["compress", str(CNN_PATH), "-o", str(output), "--arch", CNN_ARCH,
                     "--input-shape", "1,28,28", *args])
    except SystemExit as err:
        code = err.code
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not output.exists()


def test_bench_json_never_replaces_the_converted_input(converted_path, capsys):
    before = converted_path.read_bytes()
    code = main(["bench", str(CNN_PATH), str(converted_path), "--input-shape", "1,28,28",
                 "--json", str(converted_path), "--force"])
    assert code == EXIT_USAGE and "input" in capsys.readouterr().err
    assert converted_path.read_bytes() == before


def test_compress_channels_last_times_the_layers_in_channels_last(tmp_path, capsys,
                                                                   monkeypatch):
    from dwconvert import speed
    from dwconvert.layouts import is_channels_last

    formats, time_layer = [], speed.time_layer

    def spy(conv, inputs, allowed, timer):
        if conv.in_channels > 1:  # a one-channel input is both NCHW and channels_last
            formats.append(is_channels_last(inputs[0]))
        return time_layer(conv, inputs, allowed, timer)

    monkeypatch.setattr(speed, "time_layer", spy)
    output = tmp_path / "fashion-cl.safetensors"
    code = main(["compress", str(FASHION), "-o", str(output), "--arch", FASHION_ARCH,
                 "--input-shape", "1,28,28", "--objective", "latency", "--speedup", "1.0",
                 "--channels-last"])
    capsys.readouterr()
    assert len(formats) > 1 and all(formats), formats  # timed on channels_last inputs
    # Converting nothing is a valid outcome on a slow machine (exit 4 then, nothing written).
    if code == EXIT_OK:
        loaded = dwconvert.load(output)
        recipe = checkpoint.read_recipe(output)
        assert recipe["extra"]["memory_format"] == "channels_last"
        x = torch.randn(2, 1, 28, 28)
        with torch.no_grad():  # the result runs in either memory format, to the same numbers
            cl = x.contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(loaded(cl), loaded(x), rtol=1e-4, atol=1e-4)
    else:
        assert code == EXIT_CONVERSION and not output.exists()


def test_compress_channels_last_refuses_a_model_that_fails_there(tmp_path, capsys):
    output = tmp_path / "x.safetensors"
    code = main(["compress", str(CNN_PATH), "-o", str(output), "--arch", CNN_ARCH,
                 "--input-shape", "1,28,28", "--objective", "latency", "--channels-last"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "fails in channels_last" in err
    assert "without --channels-last" in err and "Traceback" not in err
    assert not output.exists()


def test_compress_channels_last_needs_something_timed(tmp_path, capsys):
    output = tmp_path / "x.safetensors"
    code = main(["compress", str(FASHION), "-o", str(output), "--arch", FASHION_ARCH,
                 "--input-shape", "1,28,28", "--channels-last"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE and "--objective latency or --layout auto" in err
    assert not output.exists()
