"""Tests of dwconvert.checkpoint: reading users' checkpoints, saving and loading converted ones.

The real input is the pretrained MNIST CNN shipped in the digit-recognizer-py wheel.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import stat
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from torch import nn

import dwconvert
from dwconvert import checkpoint, factorize
from dwconvert.checkpoint import CheckpointError, build_model, load, read_state_dict, save
from dwconvert.layers import CPConv2d, DwPwConv2d, FactorizedConv2d, PwDwConv2d

CNN_ARCH = "digit_recognizer.model:CNN"
CNN_PATH = (Path(importlib.util.find_spec("digit_recognizer").origin).parent
            / "models" / "handwriting_model.pth")
CNN_CONVS = ["conv_layers.0", "conv_layers.3", "conv_layers.6"]
FORMS = {"dw-pw": DwPwConv2d, "pw-dw": PwDwConv2d, "cp": CPConv2d}


# These models are small: one thread is faster, above all on a busy machine.
pytestmark = pytest.mark.usefixtures("single_thread_module")


class Small(nn.Module):
    """Two 3x3 convs (one without bias), a pool and a linear head."""

    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


class Tied(nn.Module):
    """One conv module registered under two names (``a`` and ``b``) and called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a(x))
        return self.b(x).mean((2, 3))


class Reused(nn.Module):
    """One conv registered once but called twice in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return self.body(torch.relu(self.body(x))).mean((2, 3))


SMALL_ARCH = f"{__name__}:Small"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _small(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return Small(**kwargs).eval()


def _cnn() -> nn.Module:
    from digit_recognizer.model import CNN

    model = CNN()
    model.load_state_dict(torch.load(CNN_PATH, map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return _cnn()


DECOMPOSITIONS = ("decompose", "cp_als", "cp_exact", "svd_dw_pw", "svd_pw_dw", "error_curve",
                  "singular_values")


def _refuse_decomposition(mp: pytest.MonkeyPatch) -> None:
    """Make every decomposition routine raise, to prove that loading decomposes nothing."""

    def refuse(*args, **kwargs):
        raise AssertionError("a decomposition ran while loading")

    assert hasattr(factorize, "decompose")
    for name in DECOMPOSITIONS:
        if hasattr(factorize, name):
            mp.setattr(factorize, name, refuse)


def _converted_names(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, FactorizedConv2d)}


def _assert_same(converted: nn.Module, loaded: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = converted(x), loaded(x)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert list(loaded.state_dict()) == list(converted.state_dict())
    for key, value in converted.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert _converted_names(loaded) == _converted_names(converted)
    assert not loaded.training


# --- save + load round trips -----------------------------------------------------------------


@pytest.mark.parametrize("form", list(FORMS))
def test_round_trip_small_model(form, tmp_path, monkeypatch):
    model = _small()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    converted = dwconvert.convert(model, form=form, rank=2, example_inputs=x[:1]).eval()
    assert {type(converted.conv1), type(converted.conv2)} == {FORMS[form]}
    path = save(converted, tmp_path / "small.safetensors", arch=SMALL_ARCH)
    assert path == tmp_path / "small.safetensors"
    _refuse_decomposition(monkeypatch)
    loaded = load(path)
    assert type(loaded) is Small
    assert isinstance(loaded.conv1, FORMS[form]) and isinstance(loaded.conv2, FORMS[form])
    assert loaded.conv1.rank == converted.conv1.rank == 2
    _assert_same(converted, loaded, x)


@pytest.mark.parametrize("form", list(FORMS))
def test_round_trip_real_mnist_cnn(form, cnn, tmp_path):
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    converted = dwconvert.convert(cnn, form=form, rank=3, example_inputs=x[:1]).eval()
    names = sorted(_converted_names(converted))
    # pw-dw of the 1-channel first conv can only have rank 1, which costs 10/9 of it.
    assert names == (CNN_CONVS[1:] if form == "pw-dw" else CNN_CONVS)
    # The default arch is the model's own class.
    path = save(converted, tmp_path / f"cnn-{form}.safetensors")
    recipe = checkpoint.read_recipe(path)
    assert recipe["arch"] == CNN_ARCH
    assert sorted(recipe["layers"]) == names
    assert all(layer["form"] == form for layer in recipe["layers"].values())
    with pytest.MonkeyPatch.context() as mp:
        _refuse_decomposition(mp)
        loaded = load(path)
    _assert_same(converted, loaded, x)
    # The file holds the tensors once each, under the converted model's keys.
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(converted.state_dict())


def test_round_trip_of_a_hand_built_model(cnn, tmp_path, monkeypatch):
    # With every decomposition refused from the start, build a converted model by hand.
    _refuse_decomposition(monkeypatch)
    layer = cnn.conv_layers[3]
    module = DwPwConv2d.empty_like(layer, 2)
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p)
    model = _cnn()
    model.conv_layers[3] = module
    path = save(model, tmp_path / "hand.safetensors", arch=CNN_ARCH)
    loaded = load(path)
    _assert_same(model, loaded, torch.randn(2, 1, 28, 28))


def test_arch_kwargs_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    converted = dwconvert.convert(model, form="dw-pw", rank=1, example_inputs=x[:1]).eval()
    path = save(converted, tmp_path / "rn.safetensors", arch="torchvision.models:resnet18",
                arch_kwargs={"num_classes": 7})
    assert checkpoint.read_recipe(path)["arch_kwargs"] == {"num_classes": 7}
    loaded = load(path)
    assert loaded.fc.out_features == 7
    assert isinstance(loaded.layer1[0].conv1, DwPwConv2d)
    assert isinstance(loaded.layer2[0].downsample[0], nn.Conv2d)  # 1x1: left unchanged
    _assert_same(converted, loaded, x)

    fresh = torchvision.models.resnet18(num_classes=7)
    into = load(path, model=fresh)
    assert into is fresh
    _assert_same(converted, into, x)

    # The default class of resnet18 (1000 outputs) does not fit: a clear error.
    with pytest.raises(CheckpointError, match="fc"):
        load(path, arch_kwargs={})


def test_half_precision_round_trip(tmp_path):
    model = _small().half()
    x = torch.randn(2, 3, 10, 10).half()
    converted = dwconvert.convert(model, form="cp", rank=2, example_inputs=x[:1]).eval()
    assert {p.dtype for p in converted.parameters()} == {torch.float16}
    path = save(converted, tmp_path / "half.safetensors", arch=SMALL_ARCH)
    loaded = load(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    _assert_same(converted, loaded, x)


def test_tied_conv_stays_shared(tmp_path):
    torch.manual_seed(0)
    model = Tied().eval()
    x = torch.randn(2, 3, 12, 12)
    converted = dwconvert.convert(model, form="dw-pw", rank=2, example_inputs=x[:1]).eval()
    assert converted.a is converted.b and isinstance(converted.a, DwPwConv2d)
    path = save(converted, tmp_path / "tied.safetensors", arch=f"{__name__}:Tied")
    with safe_open(path, framework="pt") as f:  # stored once
        keys = set(f.keys())
    assert "a.conv_dw.weight" in keys and "b.conv_dw.weight" not in keys
    loaded = load(path)
    assert loaded.a is loaded.b
    assert isinstance(loaded.a, DwPwConv2d)
    assert loaded.a.conv_dw.weight is loaded.b.conv_dw.weight
    _assert_same(converted, loaded, x)


def test_conv_called_twice_round_trips(tmp_path):
    torch.manual_seed(0)
    model = Reused().eval()
    x = torch.randn(2, 3, 12, 12)
    converted = dwconvert.convert(model, form="pw-dw", rank=2, example_inputs=x[:1]).eval()
    assert isinstance(converted.body, PwDwConv2d)
    path = save(converted, tmp_path / "reused.safetensors", arch=f"{__name__}:Reused")
    _assert_same(converted, load(path), x)


# --- writing safely ----------------------------------------------------------------------------


def _converted_small():
    return dwconvert.convert(_small(), form="dw-pw", rank=2,
                             example_inputs=torch.randn(1, 3, 8, 8)).eval()


def test_save_refuses_to_overwrite(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"precious")
    converted = _converted_small()
    with pytest.raises(FileExistsError, match="overwrite"):
        save(converted, target, arch=SMALL_ARCH)
    assert target.read_bytes() == b"precious"
    save(converted, target, arch=SMALL_ARCH, overwrite=True)
    assert target.read_bytes() != b"precious"
    _assert_same(converted, load(target), torch.randn(1, 3, 8, 8))
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def test_save_is_atomic(tmp_path, monkeypatch):
    converted = _converted_small()
    target = tmp_path / "out.safetensors"
    save(converted, target, arch=SMALL_ARCH)
    before = _sha256(target)
    real_save_file = checkpoint.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save(_converted_small(), target, arch=SMALL_ARCH, overwrite=True)
    assert _sha256(target) == before
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]  # no temp file left
    # A first save that fails leaves nothing at all.
    with pytest.raises(OSError, match="disk full"):
        save(converted, tmp_path / "new.safetensors", arch=SMALL_ARCH)
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def test_saved_file_has_ordinary_permissions(tmp_path):
    # Like any file the user creates: 0o666 less the umask (a temp file would be 0o600).
    umask = os.umask(0o022)
    os.umask(umask)
    path = save(_converted_small(), tmp_path / "out.safetensors", arch=SMALL_ARCH)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# --- reading users' checkpoints ------------------------------------------------------------


def test_read_plain_state_dict():
    state = read_state_dict(CNN_PATH)
    reference = torch.load(CNN_PATH, map_location="cpu", weights_only=True)
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert "conv_layers.0.weight" in state


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_read_training_checkpoint(key, tmp_path):
    reference = torch.load(CNN_PATH, map_location="cpu", weights_only=True)
    path = tmp_path / "train.pth"
    torch.save({"epoch": 7, key: reference, "optimizer": {"lr": 0.1}}, path)
    state = read_state_dict(path)
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_read_safetensors_state_dict(tmp_path):
    from safetensors.torch import save_file

    reference = torch.load(CNN_PATH, map_location="cpu", weights_only=True)
    save_file(reference, tmp_path / "w.safetensors")
    state = read_state_dict(tmp_path / "w.safetensors")
    assert sorted(state) == sorted(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_whole_pickled_module_needs_allow_pickle(tmp_path, cnn):
    path = tmp_path / "whole.pth"
    torch.save(cnn, path)
    with pytest.raises(CheckpointError, match="--allow-pickle") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    model = read_state_dict(path, allow_pickle=True)
    assert isinstance(model, nn.Module) and type(model).__name__ == "CNN"
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), cnn(x))


def _corrupt_files(tmp_path: Path) -> dict[str, Path]:
    raw = CNN_PATH.read_bytes()
    files = {
        "missing": tmp_path / "missing.pth",
        "truncated": tmp_path / "truncated.pth",
        "random": tmp_path / "random.pth",
        "empty": tmp_path / "empty.pth",
        "random-safetensors": tmp_path / "random.safetensors",
        "folder": tmp_path / "folder.pth",
    }
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    files["random"].write_bytes(random.Random(0).randbytes(4096))
    files["empty"].write_bytes(b"")
    files["random-safetensors"].write_bytes(random.Random(1).randbytes(4096))
    files["folder"].mkdir()
    return files


@pytest.mark.parametrize("kind", ["missing", "truncated", "random", "empty",
                                  "random-safetensors", "folder"])
@pytest.mark.parametrize("allow_pickle", [False, True])
def test_unreadable_checkpoints(kind, allow_pickle, tmp_path):
    path = _corrupt_files(tmp_path)[kind]
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path, allow_pickle=allow_pickle)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    # Random bytes are not "a pickled model": no advice to unpickle them.
    assert "--allow-pickle" not in message


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="list") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    path = tmp_path / "dict.pth"
    torch.save({"epoch": 1, "loss": torch.tensor(0.5), "notes": "x"}, path)
    with pytest.raises(CheckpointError, match="epoch"):
        read_state_dict(path)


def test_state_dict_not_fitting_the_arch(cnn):
    state = dict(cnn.state_dict())
    state["extra.weight"] = state.pop("fc_layers.0.weight")
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_weights(build_model(CNN_ARCH), state, "the file")
    message = str(info.value)
    assert "'fc_layers.0.weight'" in message and "'extra.weight'" in message
    assert "1 missing" in message and "1 unexpected" in message

    # The CNN's weights do not fit resnet18: first missing and first unexpected key named.
    resnet = torchvision.models.resnet18()
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_weights(resnet, cnn.state_dict(), "cnn.pth")
    message = str(info.value)
    assert f"'{next(iter(resnet.state_dict()))}'" in message
    assert "'conv_layers.0.weight'" in message

    # Right keys, wrong shape.
    state = dict(cnn.state_dict())
    state["fc_layers.2.weight"] = torch.zeros(3, 256)
    with pytest.raises(CheckpointError, match="fc_layers.2.weight") as info:
        checkpoint.load_weights(build_model(CNN_ARCH), state, "the file")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("arch, match", [
    ("no_such_module_dwc:CNN", "cannot import"),
    ("digit_recognizer.model.CNN", "MODULE:CALLABLE"),
    ("digit_recognizer.model:", "MODULE:CALLABLE"),
    (":CNN", "MODULE:CALLABLE"),
    ("digit_recognizer.model:NoSuchNet", "no attribute"),
    ("os:sep", "not a callable"),
    ("torch.nn:Conv2d", "failed"),
    ("builtins:dict", "not an nn.Module"),
])
def test_bad_arch(arch, match):
    with pytest.raises(CheckpointError, match=match):
        build_model(arch)


def test_load_errors(tmp_path, cnn):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        load(CNN_PATH)  # a plain .pth is not a converted checkpoint
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="without a dwconvert recipe"):
        load(tmp_path / "plain.safetensors")
    converted = dwconvert.convert(cnn, form="dw-pw", rank=2)
    path = save(converted, tmp_path / "cnn.safetensors")
    with pytest.raises(CheckpointError, match="conv_layers"):
        load(path, arch="torchvision.models:resnet18")
    with pytest.raises(CheckpointError, match="cannot import"):
        load(path, arch="no_such_module_dwc:Net")


@pytest.mark.parametrize("recipe", ["{not json", "{}", "[1]", '{"arch": "x:y"}'])
def test_damaged_recipe(recipe, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "damaged.safetensors"
    save_file({"w": torch.zeros(2)}, path, metadata={"dwconvert": recipe})
    assert not checkpoint.is_converted_checkpoint(path)
    with pytest.raises(CheckpointError, match="damaged") as info:
        load(path)
    assert str(path) in str(info.value)


def test_truncated_converted_checkpoint(tmp_path):
    path = save(_converted_small(), tmp_path / "ok.safetensors", arch=SMALL_ARCH)
    assert checkpoint.is_converted_checkpoint(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    assert not checkpoint.is_converted_checkpoint(cut)
    with pytest.raises(CheckpointError) as info:
        load(cut)
    assert str(cut) in str(info.value)


def test_input_checkpoint_never_modified(tmp_path, capsys):
    from dwconvert.cli.main import main

    before = _sha256(CNN_PATH)
    stat_before = CNN_PATH.stat()
    out = tmp_path / "out.safetensors"
    assert main(["compress", str(CNN_PATH), "-o", str(out), "--arch", CNN_ARCH,
                 "--input-shape", "1,28,28", "--form", "dw-pw", "--budget", "0.5"]) == 0
    assert out.is_file()
    assert _sha256(CNN_PATH) == before
    assert CNN_PATH.stat().st_mtime_ns == stat_before.st_mtime_ns
    meta = checkpoint.read_recipe(out)
    assert meta["extra"]["source"] == str(CNN_PATH)
    assert json.loads(json.dumps(meta))["arch"] == CNN_ARCH
