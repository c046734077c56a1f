"""Tests of fine-tuning by distillation: the losses, a real recovery, resuming, and files.

The losses are checked against formulas written out here; recovery is measured on the
pretrained MNIST CNN of digit-recognizer-py, deliberately damaged by a rank-1 conversion,
with accuracies and losses computed here independently of dwconvert.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import dwconvert
from dwconvert import distill
from dwconvert.finetune import FinetuneConfig, finetune, resume_path

CNN_PATH = (Path(importlib.util.find_spec("digit_recognizer").origin).parent
            / "models" / "handwriting_model.pth")

pytestmark = pytest.mark.usefixtures("single_thread_module")


# --- independent references ------------------------------------------------------------------


def _kd_reference(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 * mean_b sum_k p_t (log p_t - log p_s), with softmaxes written out."""
    def log_softmax(z):
        z = z / t
        return z - torch.log(torch.exp(z - z.max(1, keepdim=True).values).sum(1, keepdim=True)) \
            - z.max(1, keepdim=True).values

    log_s, log_t = log_softmax(student.double()), log_softmax(teacher.double())
    return t * t * (log_t.exp() * (log_t - log_s)).sum(1).mean()


def _cnn() -> nn.Module:
    from digit_recognizer.model import CNN

    model = CNN()
    model.load_state_dict(torch.load(CNN_PATH, map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    from dwconvert.data import make_loader

    images, labels = zip(*make_loader("mnist5k", batch_size=1000))
    return torch.cat(images), torch.cat(labels)


def _accuracy(model: nn.Module, images, labels) -> float:
    with torch.no_grad():
        return (model.eval()(images).argmax(1) == labels).double().mean().item()


def _held_out_kd(student, teacher, images, t=2.0) -> float:
    with torch.no_grad():
        return _kd_reference(student.eval()(images), teacher(images), t).item()


class _TinyNet(nn.Module):
    """Conv -> BN -> ReLU -> dropout -> conv -> pool -> linear, for fast training tests."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.drop(F.relu(self.bn(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 1).flatten(1))


def _tiny_pair(seed: int = 0):
    torch.manual_seed(seed)
    teacher = _TinyNet().eval()
    student = dwconvert.convert(teacher, form="dw-pw", rank=1,
                                example_inputs=torch.randn(1, 1, 8, 8))
    return student, teacher


def _tiny_data(count: int = 96, seed: int = 1) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (count,), generator=generator)
    return TensorDataset(images, labels)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- the losses ------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_is_the_scaled_kl_divergence(temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 7) * 3, torch.randn(5, 7) * 3
    got = distill.kd_loss(student, teacher, temperature)
    assert got.item() == pytest.approx(_kd_reference(student, teacher, temperature).item(),
                                       rel=1e-5)
    assert distill.kd_loss(teacher, teacher, temperature).item() == pytest.approx(0, abs=1e-6)


def test_feature_loss_is_the_mean_relative_squared_error():
    a, b = torch.ones(2, 3, 4, 4), torch.full((2, 3, 4, 4), 2.0)
    c, d = torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), 3.0)
    # ||a - b||^2 / ||b||^2 = 1/4; ||c - d||^2 / ||d||^2 = 1; a layer that did not run is skipped.
    got = distill.feature_loss([a, c, None], [b, d, torch.ones(1)])
    assert got.item() == pytest.approx((0.25 + 1.0) / 2)


def test_matched_layers_pair_each_converted_layer_with_the_original_conv():
    student, teacher = _tiny_pair()
    pairs = distill.matched_layers(student, teacher)
    assert [name for name, _, _ in pairs] == ["conv1", "conv2"]
    assert all(isinstance(t, nn.Conv2d) and not isinstance(t, dwconvert.FactorizedConv2d)
               for _, _, t in pairs)


# --- recovering a damaged conversion ---------------------------------------------------------


def test_one_epoch_recovers_a_damaged_conversion(mnist):
    images, labels = mnist
    teacher = _cnn()
    student = dwconvert.convert(teacher, form="dw-pw", budget=0.125, budget_scope="convertible",
                                example_inputs=images[:1])
    train = TensorDataset(images[:1000], labels[:1000])
    held_out = (images[4000:], labels[4000:])
    accuracy_before = _accuracy(student, *held_out)
    kd_before = _held_out_kd(student, teacher, held_out[0])

    result = finetune(student, teacher, train, val_data=TensorDataset(*held_out), epochs=1,
                      lr=0.01, batch_size=16)

    accuracy_after = _accuracy(result.model, *held_out)
    kd_after = _held_out_kd(result.model, teacher, held_out[0])
    assert result.model is student
    print(f"top-1 {accuracy_before:.4f} -> {accuracy_after:.4f}, "
          f"distillation loss {kd_before:.3f} -> {kd_after:.3f}")
    assert kd_after < 0.5 * kd_before
    assert accuracy_after > accuracy_before + 0.3
    # The record agrees with what is measured here.
    assert result.start_top1 == pytest.approx(accuracy_before)
    assert result.history[0].val_top1 == pytest.approx(accuracy_after)
    assert result.teacher_top1 == pytest.approx(_accuracy(teacher, *held_out))


def test_unlabelled_data_trains_on_distillation_alone(mnist):
    images, labels = mnist

    class Unlabelled(Dataset):
        def __len__(self):
            return 500

        def __getitem__(self, index):
            return images[index]

    teacher = _cnn()
    student = dwconvert.convert(teacher, form="dw-pw", budget=0.125, budget_scope="convertible",
                                example_inputs=images[:1])
    held_out = images[4000:4500]
    kd_before = _held_out_kd(student, teacher, held_out)
    result = finetune(student, teacher, Unlabelled(), val_data=Unlabelled(), epochs=1, lr=0.01)
    assert _held_out_kd(result.model, teacher, held_out) < kd_before
    assert math.isnan(result.history[0].val_top1)
    assert 0 < result.history[0].val_agreement <= 1


def test_feature_matching_trains_every_converted_layer_towards_the_original():
    student, teacher = _tiny_pair()
    with torch.no_grad():  # off the factorization's optimum, so that every layer can improve
        for conv in (student.conv1, student.conv2):
            for p in conv.parameters():
                p.add_(0.3 * p.std() * torch.randn_like(p))
    data = _tiny_data()
    errors_before = _layer_errors(student, teacher, data.tensors[0])
    finetune(student, teacher, data, epochs=3, lr=0.01, batch_size=16, kd_weight=0.0,
             ce_weight=0.0, feature_weight=1.0, freeze_bn=True)
    errors_after = _layer_errors(student, teacher, data.tensors[0])
    print("relative output error per layer", errors_before, "->", errors_after)
    assert all(after < before for before, after in zip(errors_before, errors_after))


def _layer_errors(student, teacher, images) -> list[float]:
    outputs = {}

    def keep(key):
        return lambda _m, _i, out: outputs.__setitem__(key, out)

    hooks = [m.register_forward_hook(keep((tag, name))) for tag, model in
             (("s", student), ("t", teacher)) for name, m in model.named_children()
             if name in ("conv1", "conv2")]
    with torch.no_grad():
        student.eval()(images)
        teacher(images)
    for hook in hooks:
        hook.remove()
    return [((outputs["s", n] - outputs["t", n]).norm() / outputs["t", n].norm()).item()
            for n in ("conv1", "conv2")]


def test_frozen_batchnorm_keeps_its_statistics():
    student, teacher = _tiny_pair()
    before = student.bn.running_mean.clone(), student.bn.running_var.clone()
    weight = student.bn.weight.clone()
    finetune(student, teacher, _tiny_data(), epochs=1, lr=0.01, freeze_bn=True)
    assert torch.equal(student.bn.running_mean, before[0])
    assert torch.equal(student.bn.running_var, before[1])
    assert not torch.equal(student.bn.weight, weight)  # affine weights still train


def test_teacher_is_not_changed():
    student, teacher = _tiny_pair()
    kept = {k: v.clone() for k, v in teacher.state_dict().items()}
    finetune(student, teacher, _tiny_data(), epochs=1, lr=0.01)
    assert all(torch.equal(kept[k], v) for k, v in teacher.state_dict().items())


def test_same_seed_same_weights():
    runs = []
    for _ in range(2):
        student, teacher = _tiny_pair()
        runs.append(finetune(student, teacher, _tiny_data(), epochs=1, lr=0.01, seed=3).model)
    assert _same_weights(*runs)


# --- files and resuming ----------------------------------------------------------------------


def test_best_epoch_written_and_loadable(tmp_path):
    student, teacher = _tiny_pair()
    data = _tiny_data()
    out = tmp_path / "tuned.safetensors"
    result = finetune(student, teacher, data, val_data=_tiny_data(64, seed=5), epochs=3,
                      lr=0.01, output=out, arch=f"{__name__}:_TinyNet")
    scores = [r.val_top1 for r in result.history]
    assert result.best_epoch == 1 + scores.index(max(scores))
    loaded = dwconvert.load(out, model=_TinyNet())
    assert _same_weights(loaded, result.model)
    assert not resume_path(out).exists()  # removed once the run completed
    meta = dwconvert.checkpoint.read_recipe(out)
    assert meta["extra"]["finetune"]["epoch"] == result.best_epoch


class _Interrupting(Dataset):
    """Raises KeyboardInterrupt when item ``at`` is read for the ``nth`` time."""

    def __init__(self, data: Dataset, at: int | None) -> None:
        self.data, self.at, self.reads = data, at, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        if index == self.at:
            self.reads += 1
            if self.reads == 2:  # during the second epoch
                raise KeyboardInterrupt
        return self.data[index]


def test_resume_continues_from_the_saved_epoch_and_step(tmp_path):
    data = _tiny_data()
    options = dict(epochs=2, lr=0.01, batch_size=16, checkpoint_every=1000)

    student, teacher = _tiny_pair()
    whole = finetune(student, teacher, data, **options).model

    # Interrupt at a batch in the middle of epoch 2: find which item opens its 4th batch.
    from dwconvert.finetune import _sampler
    from dwconvert.distributed import Context

    sampler = _sampler(data, Context(0, 1, torch.device("cpu")), seed=0)
    sampler.set_epoch(1)
    at = list(sampler)[3 * 16]
    out = tmp_path / "tuned.safetensors"
    student, teacher = _tiny_pair()
    with pytest.raises(KeyboardInterrupt):
        finetune(student, teacher, _Interrupting(data, at), output=out,
                 arch=f"{__name__}:_TinyNet", **options)
    state = torch.load(resume_path(out), weights_only=True)
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (1, 3)

    student, teacher = _tiny_pair()
    resumed = finetune(student, teacher, data, output=out, resume=True,
                       arch=f"{__name__}:_TinyNet", **options)
    assert _same_weights(resumed.model, whole)
    assert [r.epoch for r in resumed.history] == [1, 2]


def test_resume_refuses_other_settings(tmp_path):
    out = tmp_path / "tuned.safetensors"
    student, teacher = _tiny_pair()
    with pytest.raises(KeyboardInterrupt):
        finetune(student, teacher, _Interrupting(_tiny_data(), at=0), output=out, epochs=2,
                 arch=f"{__name__}:_TinyNet")
    with pytest.raises(ValueError, match=r"lr=None, now 0\.5"):
        finetune(student, teacher, _tiny_data(), output=out, epochs=2, lr=0.5, resume=True)


def test_files_are_not_replaced_unasked(tmp_path):
    student, teacher = _tiny_pair()
    out = tmp_path / "tuned.safetensors"
    out.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        finetune(student, teacher, _tiny_data(), output=out)
    assert out.read_bytes() == b"mine"
    with pytest.raises(FileNotFoundError, match="no resume file"):
        finetune(student, teacher, _tiny_data(), output=out, resume=True)


def test_an_output_that_appears_during_training_is_kept(tmp_path, monkeypatch):
    import importlib

    finetune_module = importlib.import_module("dwconvert.finetune")  # the function shadows it
    out = tmp_path / "tuned.safetensors"
    real_save = finetune_module.save
    saved_over = []

    def someone_writes_it_first(model, path, **kwargs):
        if not out.exists():
            out.write_bytes(b"theirs")
        saved_over.append(kwargs["overwrite"])
        return real_save(model, path, **kwargs)

    monkeypatch.setattr(finetune_module, "save", someone_writes_it_first)
    student, teacher = _tiny_pair()
    with pytest.raises(FileExistsError, match="tuned.safetensors' exists"):
        finetune(student, teacher, _tiny_data(), output=out, arch=f"{__name__}:_TinyNet")
    assert out.read_bytes() == b"theirs" and saved_over == [False]
    # With overwrite=True the run's first epoch replaces it, as asked.
    student, teacher = _tiny_pair()
    finetune(student, teacher, _tiny_data(), output=out, overwrite=True, epochs=2,
             arch=f"{__name__}:_TinyNet")
    assert dwconvert.checkpoint.read_recipe(out)["extra"]["finetune"]["epoch"] >= 1


@pytest.mark.parametrize("option, value, words", [
    ("epochs", 0, "epochs=0 should be at least 1"),
    ("lr", -1.0, "lr=-1.0 should be positive"),
    ("optimizer", "adam", "optimizer='adam' should be one of adamw, sgd"),
    ("warmup", 1.0, "warmup=1.0 should be a fraction"),
    ("temperature", 0.0, "temperature=0.0 should be positive"),
])
def test_bad_settings_name_the_value(option, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        FinetuneConfig(**{option: value})


def test_sgd_and_no_clipping_also_train():
    student, teacher = _tiny_pair()
    data = _tiny_data()
    kd_before = _held_out_kd(student, teacher, data.tensors[0])
    finetune(student, teacher, data, epochs=3, optimizer="sgd", lr=0.05, clip_grad_norm=None)
    assert _held_out_kd(student, teacher, data.tensors[0]) < kd_before


# --- the command line ------------------------------------------------------------------------


def _run(argv, capsys):
    from dwconvert.cli.main import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


CNN_OPTIONS = ["--arch", "digit_recognizer.model:CNN", "--input-shape", "1,28,28"]
TUNING = ["--limit", "1000", "--val-offset", "4000", "--lr", "0.01", "--batch-size", "16"]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    from dwconvert.cli.main import main

    path = tmp_path_factory.mktemp("damaged") / "small.safetensors"
    assert main(["-q", "compress", str(CNN_PATH), "-o", str(path), *CNN_OPTIONS, "--form",
                 "dw-pw", "--budget", "0.125", "--budget-scope", "convertible"]) == 0
    return path


def _row(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(label))
    return line[len(label):].split()


def test_finetune_command_prints_the_three_models_and_keeps_the_best(damaged, mnist, tmp_path,
                                                                     capsys):
    out_path = tmp_path / "tuned.safetensors"
    code, out, err = _run(["finetune", str(damaged), "--teacher", str(CNN_PATH), "--data",
                           "mnist5k", *TUNING, "-o", str(out_path)], capsys)
    assert code == 0, err
    images, labels = mnist
    held_out = images[4000:], labels[4000:]
    tuned = dwconvert.load(out_path)
    expected = {"original": _accuracy(_cnn(), *held_out),
                "converted": _accuracy(dwconvert.load(damaged), *held_out),
                "fine-tuned (epoch 1)": _accuracy(tuned, *held_out)}
    for label, accuracy in expected.items():
        assert _row(out, label)[0] == f"{100 * accuracy:.2f}%", label
    assert expected["fine-tuned (epoch 1)"] > expected["converted"] + 0.3
    assert "1000 held-out images; 1 epoch" in out


def test_compress_with_finetune_writes_the_tuned_model(mnist, tmp_path, capsys):
    out_path = tmp_path / "tuned.safetensors"
    code, out, err = _run(["compress", str(CNN_PATH), "-o", str(out_path), *CNN_OPTIONS,
                           "--form", "dw-pw", "--budget", "0.125", "--budget-scope",
                           "convertible", "--finetune", "mnist5k", "--finetune-limit", "1000",
                           "--val-offset", "4000", "--lr", "0.01", "--batch-size", "16"],
                          capsys)
    assert code == 0, err
    images, labels = mnist
    tuned = dwconvert.load(out_path)
    accuracy = _accuracy(tuned, images[4000:], labels[4000:])
    assert _row(out, "fine-tuned (epoch 1)")[0] == f"{100 * accuracy:.2f}%"
    meta = dwconvert.checkpoint.read_recipe(out_path)
    assert {"report", "finetune", "source"} <= set(meta["extra"])


def test_compress_with_finetune_keeps_an_output_that_appears_during_the_run(
        tmp_path, capsys, monkeypatch):
    import importlib

    finetune_module = importlib.import_module("dwconvert.finetune")
    out_path = tmp_path / "tuned.safetensors"
    real_save = finetune_module.save

    def someone_writes_it_first(model, path, **kwargs):
        out_path.write_bytes(b"theirs")
        return real_save(model, path, **kwargs)

    monkeypatch.setattr(finetune_module, "save", someone_writes_it_first)
    code, _, err = _run(["compress", str(CNN_PATH), "-o", str(out_path), *CNN_OPTIONS,
                         "--form", "dw-pw", "--budget", "0.125", "--budget-scope",
                         "convertible", "--finetune", "mnist5k", "--finetune-limit", "200",
                         "--val-offset", "4000", "--val-limit", "100", "--lr", "0.01",
                         "--batch-size", "16"], capsys)
    assert code == 2 and "tuned.safetensors' exists" in err
    assert "Traceback" not in err and out_path.read_bytes() == b"theirs"


def test_compress_refuses_a_bad_recipe_before_converting(tmp_path, capsys, monkeypatch):
    import dwconvert.cli.compress as compress_cli

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted before the recipe was checked")

    monkeypatch.setattr(compress_cli, "convert", no_conversion)
    out_path = tmp_path / "tuned.safetensors"
    code, _, err = _run(["compress", str(CNN_PATH), "-o", str(out_path), *CNN_OPTIONS,
                         "--finetune", "mnist5k", "--lr", "-1"], capsys)
    assert code == 2 and "lr=-1.0 should be positive" in err
    assert not out_path.exists()


@pytest.mark.parametrize("extra, words", [
    (["--resume"], "no resume file"),
    (["--lr", "-1"], "lr=-1.0 should be positive"),
    (["--epochs", "0"], "'0' should be a whole number of at least 1"),
    (["--seed", str(2**32)], f"'{2**32}' should be a whole number from 0 to 2**32-1"),
    (["--batch-size", str(2**40)], f"'{2**40}' should be a whole number of images"),
    (["--data", "nosuch"], "unknown data spec 'nosuch'"),
])
def test_finetune_command_errors_are_one_line(extra, words, damaged, tmp_path, capsys):
    argv = ["finetune", str(damaged), "--teacher", str(CNN_PATH), "--data", "mnist5k",
            "--limit", "500", "--val-offset", "4000", "-o", str(tmp_path / "tuned.safetensors"),
            *extra]
    refused_by_parser = extra[0] in ("--epochs", "--seed", "--batch-size")
    with pytest.raises(SystemExit) if refused_by_parser else _nothing():
        code, _, err = _run(argv, capsys)
        assert code in (2, 3)
        assert words in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    if refused_by_parser:
        assert words in capsys.readouterr().err


def test_finetune_command_keeps_an_existing_output(damaged, tmp_path, capsys):
    out_path = tmp_path / "tuned.safetensors"
    out_path.write_bytes(b"mine")
    code, _, err = _run(["finetune", str(damaged), "--teacher", str(CNN_PATH), "--data",
                         "mnist5k", "-o", str(out_path)], capsys)
    assert code == 2 and "--force" in err
    assert out_path.read_bytes() == b"mine"


def test_held_out_images_that_are_training_images_are_refused(damaged, tmp_path, capsys):
    code, _, err = _run(["finetune", str(damaged), "--teacher", str(CNN_PATH), "--data",
                         "mnist5k", "-o", str(tmp_path / "tuned.safetensors")], capsys)
    assert code == 2 and "overlap the training images of 'mnist5k'" in err
    assert not (tmp_path / "tuned.safetensors").exists()


def test_an_interrupted_run_is_not_restarted_unasked(damaged, tmp_path, capsys):
    out_path = tmp_path / "tuned.safetensors"
    resume_path(out_path).write_bytes(b"state of an interrupted run")
    code, _, err = _run(["finetune", str(damaged), "--teacher", str(CNN_PATH), "--data",
                         "mnist5k", "--limit", "500", "--val-offset", "4000", "-o",
                         str(out_path)], capsys)
    assert code == 2 and "--resume" in err and "--force" in err
    assert resume_path(out_path).read_bytes() == b"state of an interrupted run"


def test_feature_matching_after_fold_bn_targets_the_teacher_batchnorm():
    torch.manual_seed(0)
    teacher = _TinyNet().eval()
    student = dwconvert.convert(teacher, form="dw-pw", rank=1, fold_bn=True,
                                example_inputs=torch.randn(1, 1, 8, 8))
    pairs = {name: t for name, _, t in distill.matched_layers(student, teacher)}
    assert pairs["conv1"] is teacher.bn and pairs["conv2"] is teacher.conv2


def _nothing():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("extra, words", [
    # A timed conversion could choose other layers than the interrupted run's.
    (["--resume", "--objective", "latency"], "convert first"),
    (["--resume", "--layout", "auto"], "convert first"),
    (["--resume"], "no resume file"),
])
def test_compress_refuses_a_resume_it_cannot_do_before_converting(extra, words, tmp_path,
                                                                  capsys, monkeypatch):
    import dwconvert.cli.compress as compress_cli

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted before the resume was checked")

    monkeypatch.setattr(compress_cli, "convert", no_conversion)
    out_path = tmp_path / "tuned.safetensors"
    code, _, err = _run(["compress", str(CNN_PATH), "-o", str(out_path), *CNN_OPTIONS,
                         "--finetune", "mnist5k", *extra], capsys)
    assert code == 2 and words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out_path.exists()


def test_an_output_beside_an_interrupted_run_names_resume(tmp_path, capsys):
    out_path = tmp_path / "tuned.safetensors"
    out_path.write_bytes(b"best epoch so far")
    resume_path(out_path).write_bytes(b"state of an interrupted run")
    code, _, err = _run(["compress", str(CNN_PATH), "-o", str(out_path), *CNN_OPTIONS,
                         "--finetune", "mnist5k"], capsys)
    assert code == 2 and "--resume" in err and "--force" in err
    assert out_path.read_bytes() == b"best epoch so far"


def test_an_existing_output_without_a_resume_file_does_not_suggest_resuming(tmp_path):
    student, teacher = _tiny_pair()
    out = tmp_path / "tuned.safetensors"
    out.write_bytes(b"mine")
    with pytest.raises(FileExistsError) as caught:
        finetune(student, teacher, _tiny_data(), output=out)
    assert "overwrite=True" in str(caught.value) and "resume" not in str(caught.value)
    resume_path(out).write_bytes(b"state")
    with pytest.raises(FileExistsError, match="or resume=True to continue its run"):
        finetune(student, teacher, _tiny_data(), output=out)
