"""C07 with folding: ``fold_bn=True`` folds eval-mode BatchNorm into the conv before it.

The folded weights are checked against ``W * s`` and ``(b - mean) * s + beta``
computed here; the converted model at full rank against the unfolded original in
eval mode; pairs that must not be folded are left alone; folded checkpoints load
again, through the API and the CLI, on the trained Fashion-MNIST ResNet.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
from conftest import FORMS, assert_close
from torch import nn

import dwconvert
from dwconvert import FactorizedConv2d
from dwconvert.cli.main import main
from dwconvert.fold import FoldedBatchNorm2d, fold_batchnorm

pytestmark = pytest.mark.usefixtures("single_thread")
form_param = pytest.mark.parametrize("form", FORMS)
ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "examples" / "fashion_mnist" / "fashion_resnet.safetensors"


def random_bn(channels: int, seed: int = 1) -> nn.BatchNorm2d:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.25, 4)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return bn


def conv_bn(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv, random_bn(conv.out_channels), nn.ReLU()).double().eval()


CONVS = {
    "bias-false": lambda: nn.Conv2d(8, 16, 3, padding=1, bias=False),
    "bias-true": lambda: nn.Conv2d(8, 16, 3, padding=1, bias=True),
    "grouped": lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False),
    "grouped-bias-strided": lambda: nn.Conv2d(8, 12, 3, stride=2, groups=2, bias=True),
}


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("which", CONVS)
def test_folded_weights_follow_the_formula(which):
    torch.manual_seed(0)
    model = conv_bn(CONVS[which]())
    conv, bn = copy.deepcopy(model[0]), copy.deepcopy(model[1])
    result = fold_batchnorm(model)
    assert [(f.conv, f.batchnorm) for f in result.folds] == [("0", "1")]
    assert isinstance(model[1], FoldedBatchNorm2d) and isinstance(model[1], nn.Identity)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels).double()
    assert torch.allclose(model[0].weight, conv.weight * s[:, None, None, None], atol=1e-14)
    assert torch.allclose(model[0].bias, (b - bn.running_mean) * s + bn.bias, atol=1e-14)
    assert isinstance(model[0].bias, nn.Parameter)


@form_param
@pytest.mark.parametrize("which", CONVS)
def test_c07_fold_bn_at_full_rank_equals_the_unfolded_model(which, form):
    torch.manual_seed(0)
    model = conv_bn(CONVS[which]())
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    result = dwconvert.convert(model, form=form, rank="full", fold_bn=True)
    assert isinstance(result[0], FactorizedConv2d)
    assert isinstance(result[1], FoldedBatchNorm2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.modules())
    assert isinstance(model[1], nn.BatchNorm2d), "the caller's model is not changed"
    assert_close(run(result, x), run(model, x), 1e-10, f"fold + {form}")
    assert any("folded 1 BatchNorm2d" in note for note in result.dwconvert_report.notes)


def test_fold_bn_keeps_dtype_and_channels_last():
    torch.manual_seed(0)
    model = conv_bn(nn.Conv2d(4, 8, 3, padding=1, bias=False)).float()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    result = dwconvert.convert(model, form="dw-pw", rank="full", fold_bn=True)
    out = run(result, x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == torch.float32 for p in result.parameters())
    assert_close(out, run(model, x), 1e-5, "folded channels_last")


class Residual(nn.Module):
    """conv1's output feeds its BatchNorm and the sum: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = random_bn(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.bn2 = random_bn(8, seed=2)

    def forward(self, x):
        y = self.conv1(x)
        return self.bn1(y) + y + self.bn2(self.act(self.conv2(x)))


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = random_bn(8)

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


@pytest.mark.parametrize("model, reason", [
    (Residual(), "also used elsewhere"),
    (SharedBN(), "called more than once"),
], ids=["conv-output-reused", "shared-batchnorm"])
def test_ambiguous_pairs_are_not_folded(model, reason):
    model = model.double().eval()
    x = torch.randn(1, 8, 7, 7, dtype=torch.float64)
    result = fold_batchnorm(copy.deepcopy(model))
    assert any(reason in why for why in result.kept.values()), result.kept
    converted = dwconvert.convert(model, form="pw-dw", rank="full", fold_bn=True)
    assert_close(run(converted, x), run(model, x), 1e-10, "not folded where ambiguous")
    norms = [m for m in converted.modules() if type(m) is nn.BatchNorm2d]
    assert len(norms) == len(result.kept)


def test_training_mode_batchnorm_is_not_folded():
    model = conv_bn(nn.Conv2d(4, 8, 3)).train()
    result = fold_batchnorm(model)
    assert not result.folds and "training mode" in result.kept["1"]
    assert type(model[1]) is nn.BatchNorm2d


def test_untraceable_model_folds_nothing_and_says_so():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = random_bn(8)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else self.conv(x)

    result = dwconvert.convert(Branchy().eval(), form="dw-pw", rank=2, fold_bn=True)
    assert type(result.bn) is nn.BatchNorm2d
    assert any("not symbolically traceable" in n for n in result.dwconvert_report.notes)


def _fashion() -> nn.Module:
    from examples.fashion_mnist.model import FashionResNet

    model = FashionResNet()
    dwconvert.checkpoint.load_weights(model, dwconvert.checkpoint.read_state_dict(FASHION),
                                      "fashion")
    return model.eval()


def test_trained_resnet_folds_saves_and_loads(tmp_path):
    model = _fashion().double()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    result = dwconvert.convert(model, form="dw-pw", rank="full", fold_bn=True)
    norms = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    folded = [m for m in result.modules() if isinstance(m, FoldedBatchNorm2d)]
    assert len(folded) == norms > 0  # the 1x1 shortcut's BN too, its conv kept
    assert_close(run(result, x), run(model, x), 1e-10, "folded FashionResNet")
    path = dwconvert.save(result, tmp_path / "folded.safetensors",
                          arch="examples.fashion_mnist.model:FashionResNet")
    again = dwconvert.load(path)
    assert_close(run(again.double(), x), run(model, x), 1e-10, "reloaded")


def test_cli_fold_bn(tmp_path, capsys):
    before = (hashlib.sha256(FASHION.read_bytes()).hexdigest(), FASHION.stat().st_mtime_ns)
    output = tmp_path / "folded.safetensors"
    code = main(["compress", str(FASHION), "-o", str(output), "--arch",
                 "examples.fashion_mnist.model:FashionResNet", "--input-shape", "1,28,28",
                 "--form", "cp", "--rank", "full", "--fold-bn"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "folded 9 BatchNorm2d" in out
    again = dwconvert.load(output)
    x = torch.randn(2, 1, 28, 28)
    assert_close(run(again, x), run(_fashion(), x), 1e-4, "CLI --fold-bn, full rank")
    assert (hashlib.sha256(FASHION.read_bytes()).hexdigest(),
            FASHION.stat().st_mtime_ns) == before
