"""Fine-tuning under torchrun: two CPU processes on gloo train one and the same model.

The processes are real (``python -m torch.distributed.run``); each writes the weights it
ended with, and the test compares them and loads rank 0's checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import dwconvert

HERE = Path(__file__).resolve().parent
CNN_PATH = (Path(importlib.util.find_spec("digit_recognizer").origin).parent
            / "models" / "handwriting_model.pth")


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_two_gloo_processes_end_with_the_same_weights(tmp_path):
    done = _torchrun([str(HERE / "ddp_worker.py"), str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    with safe_open(tmp_path / "rank0.safetensors", framework="pt") as f:
        assert f.metadata()["world_size"] == "2"
        best_epoch = f.metadata()["best_epoch"]

    sys.path.insert(0, str(HERE))
    try:
        from ddp_worker import WorkerNet

        loaded = dwconvert.load(tmp_path / "tuned.safetensors", model=WorkerNet())
    finally:
        sys.path.remove(str(HERE))
    meta = dwconvert.checkpoint.read_recipe(tmp_path / "tuned.safetensors")
    assert str(meta["extra"]["finetune"]["epoch"]) == best_epoch
    if best_epoch == "2":  # the last epoch's weights are what both ranks hold
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, ranks[0][key]), key
    # Only rank 0 wrote: no other files than the weight dumps and the checkpoint.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "plain0.safetensors", "plain1.safetensors", "rank0.safetensors", "rank1.safetensors",
        "tuned.safetensors"]

    # Two shards of 8 images, gradients averaged, are one process's batches of 16.
    sys.path.insert(0, str(HERE))
    try:
        from ddp_worker import plain_run

        torch.set_num_threads(1)
        reference = plain_run(batch_size=16).state_dict()
    finally:
        sys.path.remove(str(HERE))
    for r in (0, 1):
        plain = load_file(tmp_path / f"plain{r}.safetensors")
        for key, value in reference.items():
            torch.testing.assert_close(plain[key], value, rtol=1e-4, atol=1e-5)


def test_the_finetune_command_runs_under_torchrun(tmp_path):
    small = tmp_path / "small.safetensors"
    from dwconvert.cli.main import main

    assert main(["-q", "compress", str(CNN_PATH), "-o", str(small), "--arch",
                 "digit_recognizer.model:CNN", "--input-shape", "1,28,28", "--form", "dw-pw",
                 "--budget", "0.125", "--budget-scope", "convertible"]) == 0
    done = _torchrun(["-m", "dwconvert", "finetune", str(small), "--teacher", str(CNN_PATH),
                      "--data", "mnist5k", "--limit", "512", "--val-offset", "4000",
                      "--val-limit", "500", "--lr", "0.01", "--batch-size", "16",
                      "-o", str(tmp_path / "tuned.safetensors")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # One table, printed by rank 0 alone, that says two processes trained.
    assert done.stdout.count("fine-tuned (epoch 1)") == 1
    assert "500 held-out images; 1 epoch on 2 processes" in done.stdout
    tuned = dwconvert.load(tmp_path / "tuned.safetensors")
    assert isinstance(tuned.conv_layers[3], dwconvert.DwPwConv2d)
