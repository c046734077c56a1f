"""Trains FashionResNet, the Fashion-MNIST benchmark model of dwconvert.

Example (from the repository root)::

    python examples/fashion_mnist/train.py --out examples/fashion_mnist/fashion_resnet.safetensors

Trains on the 60,000 training images with light augmentation (random crop with 2 px
padding, horizontal flip, both done with torch ops on whole batches), SGD with Nesterov
momentum 0.9 under a OneCycle schedule (linear warm-up, cosine decay) and label
smoothing, evaluates on the 10,000 test images after every epoch, and saves the final
state_dict with safetensors plus a JSON sidecar (same name, ``.json``) recording the
test accuracy, epochs, seed, training time and torch version.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:  # so that `python examples/fashion_mnist/train.py` works
    sys.path.insert(0, str(_REPO_ROOT))

from dwconvert.data import make_loader  # noqa: E402
from examples.fashion_mnist.model import (  # noqa: E402
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionResNet,
)

logger = logging.getLogger("fashion_mnist.train")

DEFAULT_DATA = "fashion-mnist:/usr/share/datasets/fashion-mnist"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train FashionResNet on Fashion-MNIST and save it with safetensors."
    )
    parser.add_argument("--out", required=True, type=Path,
                        help="output .safetensors file; a .json sidecar is written next to it")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--data", default=DEFAULT_DATA,
                        help=f"dwconvert data spec of the idx folder (default {DEFAULT_DATA})")
    parser.add_argument("--width", type=int, default=32, help="stem/stage-1 width (default 32)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default 0.1)")
    parser.add_argument("--weight-decay", type=float, default=5e-4,
                        help="weight decay of conv/linear weights (default 5e-4)")
    parser.add_argument("--label-smoothing", type=float, default=0.1,
                        help="label smoothing of the loss (default 0.1)")
    parser.add_argument("--warmup", type=float, default=0.15,
                        help="fraction of the steps spent warming up (default 0.15)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (default 2); on a CPU shared with other jobs, "
                        "1 thread can be several times faster than oversubscribed 2")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="use only the first N training images (for smoke tests)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.out.suffix != ".safetensors":
        parser.error(f"--out {str(args.out)!r} should end in .safetensors")
    return args


def augment(images: torch.Tensor, generator: torch.Generator, pad_value: float) -> torch.Tensor:
    """Random crop with 2 px padding and random horizontal flip, per image, on a batch.

    Args:
        images: normalised batch (N, C, H, W).
        generator: source of the random shifts and flips.
        pad_value: value of a blank (black) pixel after normalisation.
    """
    n, _, h, w = images.shape
    pad = 2
    padded = F.pad(images, (pad, pad, pad, pad), value=pad_value)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(images.shape[1])[None, :, None, None]
    cropped = padded[batch, channel, rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


@torch.no_grad()
def evaluate(model: nn.Module, loader, memory_format: torch.memory_format) -> float:
    """Returns the top-1 accuracy (in %) of a model on a loader."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        logits = model(images.contiguous(memory_format=memory_format))
        correct += int((logits.argmax(1) == labels).sum())
        total += labels.numel()
    return 100.0 * correct / total


def atomic_write(path: Path, write) -> None:
    """Calls ``write(tmp_path)`` on a temporary file beside ``path``, then renames it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only, not on BN parameters or biases."""
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.ndim > 1 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout
    )
    sidecar = args.out.with_suffix(".json")
    if args.out.exists() and not args.force:
        logger.error("%s already exists: pass --force to overwrite it", args.out)
        return 2

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    aug_generator = torch.Generator().manual_seed(args.seed + 1)
    memory_format = torch.channels_last

    norm = {"mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD}
    train_loader = make_loader(args.data, split="train", batch_size=args.batch_size,
                               shuffle=True, seed=args.seed, limit=args.train_limit, **norm)
    test_loader = make_loader(args.data, split="test", batch_size=1000, **norm)
    pad_value = (0.0 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]

    model = FashionResNet(width=args.width).to(memory_format=memory_format)
    params = sum(p.numel() for p in model.parameters())
    logger.info("FashionResNet(width=%d): %d parameters", args.width, params)

    optimizer = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr,
                                momentum=0.9, nesterov=True)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=args.warmup, anneal_strategy="cos", div_factor=10.0, final_div_factor=1e3,
        cycle_momentum=False,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    history = []
    start = time.perf_counter()
    accuracy = math.nan
    for epoch in range(1, args.epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        loss_sum = correct = seen = 0.0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{args.epochs}", unit="batch",
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, leave=False)
        for images, labels in bar:
            images = augment(images, aug_generator, pad_value)
            images = images.contiguous(memory_format=memory_format)
            logits = model(images)
            loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * labels.numel()
            correct += int((logits.argmax(1) == labels).sum())
            seen += labels.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.2f}",
                            refresh=False)
        bar.close()
        train_time = time.perf_counter() - epoch_start
        accuracy = evaluate(model, test_loader, memory_format)
        record = {
            "epoch": epoch,
            "train_loss": round(loss_sum / seen, 5),
            "train_accuracy": round(100 * correct / seen, 3),
            "test_accuracy": round(accuracy, 3),
            "epoch_seconds": round(time.perf_counter() - epoch_start, 1),
            "lr_end": scheduler.get_last_lr()[0],
        }
        history.append(record)
        logger.info(
            "epoch %d/%d: train loss %.4f, train acc %.2f%%, test acc %.2f%% "
            "(train %.0fs, epoch %.0fs)",
            epoch, args.epochs, record["train_loss"], record["train_accuracy"], accuracy,
            train_time, record["epoch_seconds"],
        )
    total_time = time.perf_counter() - start

    model = model.to(memory_format=torch.contiguous_format)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"model": "FashionResNet", "width": str(args.width),
                "mean": str(FASHION_MNIST_MEAN[0]), "std": str(FASHION_MNIST_STD[0])}
    atomic_write(args.out, lambda tmp: save_file(state, tmp, metadata=metadata))

    # Check the saved file: a fresh model loaded from it must score the same.
    reloaded = FashionResNet(width=args.width)
    reloaded.load_state_dict(load_file(str(args.out)))
    reloaded_accuracy = evaluate(reloaded, test_loader, torch.contiguous_format)
    logger.info("reloaded %s: test acc %.2f%%", args.out, reloaded_accuracy)

    info = {
        "model": "examples.fashion_mnist.model.FashionResNet",
        "model_kwargs": {"width": args.width},
        "parameters": params,
        "test_accuracy": round(reloaded_accuracy, 3),
        "test_images": len(test_loader.dataset),
        "train_images": len(train_loader.dataset),
        "epochs": args.epochs,
        "seed": args.seed,
        "training_seconds": round(total_time, 1),
        "seconds_per_epoch": round(total_time / args.epochs, 1),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": args.threads,
        "normalisation": {"mean": list(FASHION_MNIST_MEAN), "std": list(FASHION_MNIST_STD)},
        "hyperparameters": {
            "optimizer": "SGD(momentum=0.9, nesterov=True)",
            "schedule": f"OneCycleLR(max_lr={args.lr}, pct_start={args.warmup}, cos)",
            "batch_size": args.batch_size,
            "weight_decay": args.weight_decay,
            "label_smoothing": args.label_smoothing,
            "augmentation": "random crop (2 px padding) + horizontal flip",
        },
        "history": history,
    }

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as stream:
            json.dump(info, stream, indent=2)
            stream.write("\n")

    atomic_write(sidecar, write_json)
    logger.info("saved %s and %s (test acc %.2f%%, %.0fs)", args.out, sidecar,
                reloaded_accuracy, total_time)
    return 0


if __name__ == "__main__":
    sys.exit(main())
