"""Tests of dwconvert.data: data specs, idx parsing, loaders and error messages."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dwconvert.data import (
    DATA_SPECS_HELP,
    DataSpecError,
    load_dataset,
    make_loader,
    read_idx,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encodes a uint8 array as an idx file, independently of the code under test."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_pair(
    folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool
) -> None:
    """Writes an images/labels idx pair in the Fashion-MNIST naming scheme."""
    for name, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        path = folder / f"{prefix}-{name}"
        if gz:
            with gzip.open(f"{path}.gz", "wb") as stream:
                stream.write(_idx_bytes(array))
        else:
            path.write_bytes(_idx_bytes(array))


@pytest.fixture
def idx_folder(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A folder with a plain train pair and a gzipped test pair of random images."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, prefix, count, gz in (("train", "train", 7, False), ("test", "t10k", 5, True)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=count, dtype=np.uint8)
        _write_idx_pair(tmp_path, prefix, images, labels, gz)
        arrays[split] = (images, labels)
    return tmp_path, arrays


def test_mnist5k_shape_labels_and_normalisation() -> None:
    dataset = load_dataset("mnist5k")
    assert len(dataset) == 5000
    image, label = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert isinstance(label, int)
    labels = np.array([dataset[i][1] for i in range(len(dataset))])
    counts = np.bincount(labels, minlength=10)
    assert counts.shape == (10,) and counts.sum() == 5000
    assert counts.min() >= 400 and counts.max() <= 600
    background = (0.0 - 0.1307) / 0.3081
    assert float(image.min()) == pytest.approx(background, abs=1e-5)
    assert float(image.max()) == pytest.approx((1.0 - 0.1307) / 0.3081, abs=1e-2)
    assert float(torch.median(image)) == pytest.approx(background, abs=1e-5)


def test_mnist5k_whole_set_mean_matches_mnist_statistics() -> None:
    batch, _ = next(iter(make_loader("mnist5k", batch_size=5000)))
    assert batch.shape == (5000, 1, 28, 28)
    assert float(batch.mean()) == pytest.approx(0.0, abs=0.02)
    assert float(batch.std()) == pytest.approx(1.0, abs=0.02)


def test_mnist5k_user_normalisation_and_ignored_split() -> None:
    raw = load_dataset("mnist5k", mean=(0.0,), std=(1.0,), split="train")
    default = load_dataset("mnist5k")
    assert len(raw) == 5000
    assert 0.0 <= float(raw[3][0].min()) and float(raw[3][0].max()) <= 1.0
    expected = (raw[3][0] - 0.1307) / 0.3081
    torch.testing.assert_close(default[3][0], expected)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    array = np.random.default_rng(1).integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    path = tmp_path / ("a.gz" if gz else "a")
    data = _idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    np.testing.assert_array_equal(read_idx(path), array)


def test_idx_folder_reads_back_exactly(idx_folder) -> None:
    folder, arrays = idx_folder
    for split, (images, labels) in arrays.items():
        dataset = load_dataset(f"fashion-mnist:{folder}", split=split)
        assert len(dataset) == len(labels)
        for index in range(len(labels)):
            image, label = dataset[index]
            assert image.shape == (1, 28, 28) and image.dtype == torch.float32
            assert label == int(labels[index])
            restored = (image[0] * 255).round().to(torch.uint8).numpy()
            np.testing.assert_array_equal(restored, images[index])


def test_idx_folder_user_normalisation(idx_folder) -> None:
    folder, arrays = idx_folder
    images, _ = arrays["train"]
    dataset = load_dataset(f"fashion-mnist:{folder}", split="train", mean=(0.5,), std=(0.25,))
    expected = (torch.from_numpy(images[2]).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(dataset[2][0][0], expected)


def test_make_loader_limit_offset_split(idx_folder) -> None:
    folder, arrays = idx_folder
    _, labels = arrays["train"]
    spec = f"fashion-mnist:{folder}"
    head = make_loader(spec, split="train", batch_size=3, limit=4)
    tail = make_loader(spec, split="train", batch_size=3, offset=4)
    head_labels = torch.cat([y for _, y in head]).tolist()
    tail_labels = torch.cat([y for _, y in tail]).tolist()
    assert head_labels == labels[:4].tolist()
    assert tail_labels == labels[4:].tolist()
    assert [x.shape[0] for x, _ in head] == [3, 1]


def test_make_loader_shuffle_is_seeded(idx_folder) -> None:
    folder, _ = idx_folder
    spec = f"fashion-mnist:{folder}"

    def order(seed: int) -> list[int]:
        loader = make_loader(spec, split="train", batch_size=7, shuffle=True, seed=seed)
        return torch.cat([x.flatten(1)[:, :8] for x, _ in loader]).sum(1).tolist()

    assert order(3) == order(3)
    assert sorted(order(3)) == sorted(order(4))


def test_imagefolder_resize_and_mixed_sizes(tmp_path: Path) -> None:
    from PIL import Image

    for cls, size in (("cat", (10, 12)), ("dog", (16, 8))):
        (tmp_path / cls).mkdir()
        pixels = np.full((*size, 3), 200 if cls == "cat" else 50, dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / cls / "0.png")
    dataset = load_dataset(f"imagefolder:{tmp_path}", image_size=(6, 7))
    assert len(dataset) == 2
    (cat, cat_label), (dog, dog_label) = dataset[0], dataset[1]
    assert (cat_label, dog_label) == (0, 1)
    assert cat.shape == (3, 6, 7) and cat.dtype == torch.float32
    torch.testing.assert_close(cat, torch.full((3, 6, 7), 200 / 255))
    with pytest.raises(DataSpecError, match="image_size"):
        next(iter(make_loader(f"imagefolder:{tmp_path}", batch_size=2)))
    with pytest.raises(DataSpecError, match="3 channel"):
        load_dataset(f"imagefolder:{tmp_path}", mean=(0.5,), std=(0.5,))


@pytest.mark.parametrize(
    ("spec", "kwargs", "fragment"),
    [
        ("mnist", {}, "'mnist'"),
        ("fashion-mnist", {}, "'fashion-mnist'"),
        ("imagenet:/tmp", {}, "'imagenet:/tmp'"),
        ("fashion-mnist:/no/such/dir", {}, "/no/such/dir"),
        ("imagefolder:/no/such/dir", {}, "/no/such/dir"),
        ("mnist5k", {"mean": (0.1, 0.2, 0.3)}, r"\(0.1, 0.2, 0.3\)"),
        ("mnist5k", {"std": (0.0,)}, "std"),
    ],
)
def test_bad_specs_name_the_value(spec: str, kwargs: dict, fragment: str) -> None:
    with pytest.raises(DataSpecError, match=fragment) as info:
        load_dataset(spec, **kwargs)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_missing_idx_files_and_bad_split(idx_folder, tmp_path: Path) -> None:
    folder, _ = idx_folder
    (folder / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataSpecError, match="train-labels-idx1-ubyte"):
        load_dataset(f"fashion-mnist:{folder}", split="train")
    with pytest.raises(DataSpecError, match="'val'"):
        load_dataset(f"fashion-mnist:{folder}", split="val")
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"not an idx file")
    with pytest.raises(DataSpecError, match="t10k-images"):
        load_dataset(f"fashion-mnist:{folder}", split="test")


def test_make_loader_bad_ranges() -> None:
    with pytest.raises(DataSpecError, match="offset 5000"):
        make_loader("mnist5k", offset=5000)
    with pytest.raises(DataSpecError, match="limit 0"):
        make_loader("mnist5k", limit=0)
    with pytest.raises(DataSpecError, match="batch size 0"):
        make_loader("mnist5k", batch_size=0)


def test_help_lists_spellings() -> None:
    for spelling in ("mnist5k", "fashion-mnist:DIR", "imagefolder:DIR"):
        assert spelling in DATA_SPECS_HELP


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} absent "
                    "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist() -> None:
    train = load_dataset(f"fashion-mnist:{FASHION_DIR}", split="train")
    test = load_dataset(f"fashion-mnist:{FASHION_DIR}", split="test")
    assert (len(train), len(test)) == (60000, 10000)
    image, label = test[0]
    assert image.shape == (1, 28, 28) and 0 <= label <= 9
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    counts = np.bincount(test.labels.numpy(), minlength=10)
    assert counts.tolist() == [1000] * 10
