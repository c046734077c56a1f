"""Reading users' checkpoints, and saving and loading converted models.

A converted checkpoint is one safetensors file: the tensors of the converted
model plus, in the file's metadata, a JSON recipe that says how to build the
original architecture (``arch``, a ``module:callable``) and which layers became
which factorized form at which rank. Loading it builds the original, swaps in
empty factorized modules from the recipe and fills every tensor; nothing is
unpickled and nothing is decomposed again.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import first_line
from .files import OutputExists, write_atomically
from .fold import folded_layers, restore_structure
from .graph import replace_module
from .layers import FactorizedConv2d, build_empty, conv_spec

logger = logging.getLogger(__name__)

FORMAT = "dwconvert.converted"
FORMAT_VERSION = 1
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "weights")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# --- building the original architecture -------------------------------------------------


def import_callable(spec: str) -> Callable[..., nn.Module]:
    """Resolve ``"package.module:attribute"`` (e.g. ``torchvision.models:resnet18``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CheckpointError(
            f"arch {spec!r} is not of the form MODULE:CALLABLE, e.g. 'torchvision.models:resnet18'"
        )
    # Like other tools that take MODULE:CALLABLE, look in the working directory too,
    # so a user's own model file next to the checkpoint can be named.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CheckpointError(
            f"cannot import module {module_name!r} of arch {spec!r} ({err}); install the "
            "package that defines the model or put it on PYTHONPATH"
        ) from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise CheckpointError(
                f"module {module_name!r} has no attribute {attr!r} (arch {spec!r})"
            )
        target = getattr(target, part)
    if not callable(target):
        raise CheckpointError(f"arch {spec!r} names {type(target).__name__}, not a callable")
    return target


def build_model(arch: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a fresh model from an ``arch`` spec and keyword arguments."""
    factory = import_callable(arch)
    try:
        model = factory(**(kwargs or {}))
    except TypeError as err:
        raise CheckpointError(f"calling arch {arch!r} with {kwargs or {}} failed: {err}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"arch {arch!r} returned {type(model).__name__}, not an nn.Module")
    return model


# --- reading users' checkpoints ------------------------------------------------------------


def read_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False):
    """Read a state_dict, a training checkpoint holding one, or (opt-in) a pickled module.

    Returns:
        Either a state_dict (``dict`` of tensors) or, with ``allow_pickle``, an
        ``nn.Module`` when the file holds a whole pickled model.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:
        text = first_line(err)
        if not allow_pickle and "Unsupported global" in str(err):
            raise CheckpointError(
                f"{str(path)!r} holds Python objects beyond tensors and cannot be loaded "
                "safely; if it is a whole pickled model that you trust, pass --allow-pickle"
            ) from None
        if "weights_only" in str(err):  # not a pickle at all, or a damaged one
            text = f"not a PyTorch checkpoint, or a damaged one ({type(err).__name__})"
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {text}") from None
    if isinstance(obj, nn.Module):
        return obj
    return _find_state_dict(obj, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {err}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                logger.info("using the state_dict under key %r of %s", key, path)
                return obj[key]
        keys = ", ".join(map(repr, list(obj)[:8]))
        raise CheckpointError(
            f"{str(path)!r} is a dict without a state_dict (keys: {keys}); expected a "
            f"state_dict or a checkpoint with one under {', '.join(STATE_DICT_KEYS)}"
        )
    raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, not a state_dict")


ZOO_PACKAGES = ("torchvision", "timm")


def _trusted_arch(spec: str) -> bool:
    """Whether a recipe's arch may be called unasked: an nn.Module class or a zoo entry."""
    try:
        target = import_callable(spec)
    except CheckpointError:
        return True  # build_model reports it
    if isinstance(target, type) and issubclass(target, nn.Module):
        return True
    return getattr(target, "__module__", "").split(".")[0] in ZOO_PACKAGES


def _build_layer(layer: Any, conv: nn.Module, name: str, path) -> FactorizedConv2d:
    """An empty factorized module from a recipe entry, with errors for damaged entries."""
    try:
        rank = layer["rank"]
        if not isinstance(rank, int) or not 1 <= rank <= conv.in_channels * conv.out_channels:
            raise ValueError(f"rank {rank!r} out of range")
        return build_empty(layer, device=conv.weight.device, dtype=conv.weight.dtype)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise CheckpointError(f"damaged recipe in {str(path)!r} for layer {name!r}: "
                              f"{type(err).__name__}: {err}") from None


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, *,
                 assign: bool = False) -> None:
    """``model.load_state_dict(state_dict)`` with an error naming the keys that do not fit.

    With ``assign`` the model takes the given tensors themselves (their dtype too).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
        raise CheckpointError(
            f"the weights in {source} do not fit the model {type(model).__name__}: "
            f"{', '.join(parts)} keys; check --arch and its arguments"
        )
    try:
        model.load_state_dict(state_dict, strict=True, assign=assign)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise CheckpointError(f"the weights in {source} do not fit the model: {first}") from None


# --- converted checkpoints -----------------------------------------------------------------


def recipe(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The factorized layers of ``model``: qualified name -> :meth:`FactorizedConv2d.spec`."""
    layers = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FactorizedConv2d):
            layers[name] = module.spec()
    return layers


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a converted model to ``path`` (a ``.safetensors`` file), atomically.

    Args:
        model: a model returned by :func:`dwconvert.convert`.
        path: the file to write. An existing file is kept unless ``overwrite``.
        arch: ``module:callable`` that builds the original architecture. Defaults
            to the model's class, which works when it takes no arguments.
        arch_kwargs: keyword arguments for ``arch`` (JSON-serialisable).
        overwrite: replace ``path`` if it exists.
        extra: more JSON-serialisable information to keep in the metadata.

    The data goes to a temporary file beside ``path`` that is renamed over it only
    once complete, so an interrupted save never leaves a half-written file.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(path)
    if arch is None:
        cls = type(model)
        arch = f"{cls.__module__}:{cls.__qualname__}"
        required = [p.name for p in inspect.signature(cls).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                           p.KEYWORD_ONLY)]
        if required:
            logger.warning(
                "%s needs the arguments %s, so load() cannot rebuild it from %s alone; pass "
                "arch='module:factory' (and arch_kwargs) to save(), or model= to load()",
                cls.__name__, ", ".join(required), arch,
            )
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": arch_kwargs or {},
        "layers": recipe(model),
        "folded_bn": folded_layers(model),
        "extra": extra or {},
    }
    state = model.state_dict()
    tensors, tied = _untie(state)
    meta["tied"] = tied
    # safetensors stores tensors contiguous; remember which were channels_last.
    meta["channels_last"] = [k for k, v in state.items() if v.ndim == 4 and
                             v.is_contiguous(memory_format=torch.channels_last)
                             and not v.is_contiguous()]
    metadata = {"dwconvert": json.dumps(meta)}

    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                     replace=overwrite)
    logger.info("saved %d tensors and %d converted layers to %s", len(tensors),
                len(meta["layers"]), path)
    return path


def _untie(state: dict[str, torch.Tensor]):
    # safetensors stores each storage once: keep the first key of tied tensors.
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), value.shape,
                 value.stride()) if value.numel() else None
        if ident is not None and ident in seen:
            tied[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = value.detach().contiguous()
    return tensors, tied


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe stored in a converted checkpoint (``None`` entries if not one)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"converted checkpoint {str(path)!r} does not exist or is not a file")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{str(path)!r} is not a readable dwconvert checkpoint (a safetensors file): {err}"
        ) from None
    if "dwconvert" not in metadata:
        raise CheckpointError(f"{str(path)!r} is a safetensors file without a dwconvert recipe")
    try:
        meta = json.loads(metadata["dwconvert"])
    except json.JSONDecodeError:
        meta = None
    if (not isinstance(meta, dict) or not {"arch", "arch_kwargs", "layers"} <= set(meta)
            or not isinstance(meta["arch"], str) or not isinstance(meta["layers"], dict)
            or not isinstance(meta["arch_kwargs"], dict)
            or not isinstance(meta.get("version", 0), int)
            or not isinstance(meta.get("tied", {}), dict)):
        raise CheckpointError(f"the dwconvert recipe in {str(path)!r} is damaged")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} was written by a newer dwconvert (format {meta['version']}); upgrade"
        )
    return meta


def is_converted_checkpoint(path: str | os.PathLike) -> bool:
    try:
        read_recipe(path)
    except CheckpointError:
        return False
    return True


def load(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a converted checkpoint written by :func:`save`.

    Args:
        path: the ``.safetensors`` file.
        model: a freshly built original model to convert into (its weights are
            replaced); by default it is built from the recipe's ``arch``.
        arch: overrides the recipe's ``arch``.
        arch_kwargs: overrides the recipe's ``arch_kwargs``.
        device: where to put the tensors.

    Returns:
        The converted model in eval mode.
    """
    meta = read_recipe(path)

    # 1. The original architecture. A file's own arch is only called if it names a
    #    model class or a model zoo; anything else needs the caller's word.
    if model is None:
        spec = arch or meta["arch"]
        if arch is None and not _trusted_arch(spec):
            raise CheckpointError(
                f"the recipe of {str(path)!r} builds its model with {spec!r}, which is not an "
                f"nn.Module class; pass arch={spec!r} (CLI: --arch) if you trust it"
            )
        model = build_model(spec, arch_kwargs if arch_kwargs is not None else meta["arch_kwargs"])

    # 2. BatchNorms folded into convs: identities in their place, biases on the convs.
    folded = meta.get("folded_bn", {})
    try:
        if not isinstance(folded, dict):
            raise TypeError(f"folded_bn is a {type(folded).__name__}, not a dict")
        restore_structure(model, folded)
    except (AttributeError, TypeError, ValueError) as err:
        raise CheckpointError(f"the folded BatchNorms in the recipe of {str(path)!r} do not "
                              f"fit the model {type(model).__name__} ({err}); check arch") from None

    # 3. Empty factorized layers where the recipe says, each module built once.
    built: dict[int, FactorizedConv2d] = {}
    for name, layer in meta["layers"].items():
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"the recipe of {str(path)!r} converts layer {name!r}, which the model "
                f"{type(model).__name__} does not have; check arch"
            ) from None
        if isinstance(conv, FactorizedConv2d):  # an alias of a module already replaced
            continue
        if not isinstance(conv, nn.Conv2d) or conv_spec(conv) != layer["conv"]:
            raise CheckpointError(
                f"layer {name!r} of the model is {conv}, but the recipe of {str(path)!r} "
                f"was made for Conv2d({layer['conv']}); check arch and its arguments"
            )
        if id(conv) not in built:
            built[id(conv)] = _build_layer(layer, conv, name, path)
        module = built[id(conv)]
        for alias_name, alias in model.named_modules(remove_duplicate=False):
            if alias is conv:
                replace_module(model, alias_name, module)

    # 4. The tensors.
    state = load_file(path, device=str(device))
    for key, source in meta.get("tied", {}).items():
        if source not in state:
            raise CheckpointError(f"damaged recipe in {str(path)!r}: {key!r} is tied to "
                                  f"{source!r}, which the file does not hold")
        state[key] = state[source]
    for key in meta.get("channels_last", []):
        if key in state:
            state[key] = state[key].contiguous(memory_format=torch.channels_last)
    load_weights(model, state, str(path), assign=True)
    model.to(device)
    return model.eval()
