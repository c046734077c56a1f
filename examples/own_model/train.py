"""Train ShapesNet on the shapes data (under a minute on a CPU) and save its state_dict.

    python train.py -o shapes.pth
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from shapes import ShapesNet, test_set, train_set


def main() -> None:
    parser = argparse.ArgumentParser(description="Train ShapesNet and save its state_dict.")
    parser.add_argument("-o", "--output", default="shapes.pth")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = ShapesNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(train_set(), batch_size=64, shuffle=True)
    for epoch in range(args.epochs):
        model.train()
        for images, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            images, labels = next(iter(DataLoader(test_set(), batch_size=1000)))
            top1 = float((model(images).argmax(1) == labels).float().mean())
        print(f"epoch {epoch + 1}: test top-1 {100 * top1:.2f}%")
    torch.save(model.state_dict(), Path(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
