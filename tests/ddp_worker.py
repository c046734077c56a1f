"""One process of the distributed fine-tuning test (run by torchrun, not by pytest).

Every rank fine-tunes the same converted model on its shard of the same data, then writes
the weights it ended with to ``OUT_DIR/rank<R>.safetensors``, so the test can compare them.
Usage: ``torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dwconvert  # noqa: E402


class WorkerNet(nn.Module):
    """Conv -> BN -> ReLU -> conv -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 1).flatten(1))


class PlainNet(nn.Module):
    """Conv -> ReLU -> conv -> pool -> linear: no BatchNorm, so that training on two shards
    of eight images equals training on batches of sixteen in one process."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv2(x)), 1).flatten(1))


def plain_run(batch_size: int):
    """PlainNet converted and fine-tuned on 96 images; the same in every process."""
    torch.manual_seed(0)
    teacher = PlainNet().eval()
    student = dwconvert.convert(teacher, form="dw-pw", rank=1,
                                example_inputs=torch.randn(1, 1, 8, 8))
    generator = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(96, 1, 8, 8, generator=generator),
                         torch.randint(0, 4, (96,), generator=generator))
    return dwconvert.finetune(student, teacher, data, epochs=2, batch_size=batch_size,
                              lr=0.01, clip_grad_norm=None).model


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = WorkerNet().eval()
    student = dwconvert.convert(teacher, form="dw-pw", rank=1,
                                example_inputs=torch.randn(1, 1, 8, 8))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(128, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (128,), generator=generator)
    data, held_out = TensorDataset(images[:96], labels[:96]), TensorDataset(images[96:],
                                                                            labels[96:])
    result = dwconvert.finetune(student, teacher, data, val_data=held_out, epochs=2,
                                batch_size=8, lr=0.01, output=out_dir / "tuned.safetensors",
                                arch="ddp_worker:WorkerNet")
    rank = int(os.environ["RANK"])
    state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, str(out_dir / f"rank{rank}.safetensors"),
              metadata={"world_size": str(result.world_size),
                        "best_epoch": str(result.best_epoch)})
    plain = {k: v.contiguous() for k, v in plain_run(batch_size=8).state_dict().items()}
    save_file(plain, str(out_dir / f"plain{rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
