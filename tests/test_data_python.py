"""The ``py:MODULE:FUNCTION`` data spec: a user's own data set through the same loaders."""

from __future__ import annotations

import textwrap

import pytest
import torch

from dwconvert.data import DataSpecError, make_loader

MODULE = textwrap.dedent("""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    def images(split="test"):
        g = torch.Generator().manual_seed(0 if split == "test" else 1)
        x = torch.randn(10, 1, 4, 4, generator=g)
        return TensorDataset(x, torch.arange(10))

    def loader():
        return DataLoader(images(), batch_size=3)

    def not_data():
        return [1, 2, 3]
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_data.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_data"


def test_dataset_function_with_split_limit_and_offset(user_module):
    batches = list(make_loader("py:user_data:images", batch_size=4, offset=2, limit=5,
                               split="train"))
    x = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    g = torch.Generator().manual_seed(1)
    assert torch.equal(x, torch.randn(10, 1, 4, 4, generator=g)[2:7])
    assert labels.tolist() == [2, 3, 4, 5, 6]


def test_a_dataloader_gives_its_dataset(user_module):
    (x, labels), = list(make_loader("py:user_data:loader", batch_size=10))
    assert labels.tolist() == list(range(10)) and x.shape == (10, 1, 4, 4)


@pytest.mark.parametrize("spec, message", [
    ("py:user_data:not_data", "returned list"),
    ("py:user_data:missing", "has no function 'missing'"),
    ("py:no_such_module_here:f", "cannot import module 'no_such_module_here'"),
    ("py:images", "py:MODULE:FUNCTION"),
])
def test_bad_specs(user_module, spec, message):
    with pytest.raises(DataSpecError, match=message):
        make_loader(spec)


def test_normalisation_belongs_in_the_function(user_module):
    with pytest.raises(DataSpecError, match="normalise"):
        make_loader("py:user_data:images", mean=(0.5,), std=(0.2,))
