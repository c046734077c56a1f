"""The resume file of a fine-tuning run: everything needed to continue where it stopped.

The file (``<output stem>.resume.pt`` beside the run's output) is written with
``torch.save`` to a temporary file that is renamed, and read with ``weights_only=True``, so
reading it runs no pickled code. It holds the recipe and process count it was made with,
and a run with other settings is refused rather than continued on the wrong schedule.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .files import write_atomically

STATE_VERSION = 1


def resume_path(output: str | os.PathLike) -> Path:
    """The resume file kept beside ``output``: ``ft.safetensors`` -> ``ft.resume.pt``."""
    output = Path(output)
    return output.with_name(output.stem + ".resume.pt")


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Writes a run's state (tensors, numbers, strings, lists and dicts) atomically."""
    state = {"version": STATE_VERSION, **state}
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def read_state(path: Path, config: dict[str, Any], world_size: int,
               device: torch.device) -> dict[str, Any]:
    """Reads a run's state, refusing one made with other settings or process count."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{str(path)!r} is not a readable resume file ({err}); delete it and "
                         "start again") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"{str(path)!r} is not a resume file of this dwconvert; delete it and "
                         "start again")
    saved = state["config"]
    changed = [name for name in config if saved.get(name) != config[name]]
    if changed:
        raise ValueError(
            f"the run in {str(path)!r} used other settings ("
            + ", ".join(f"{n}={saved.get(n)!r}, now {config[n]!r}" for n in changed)
            + "); resume with the same settings")
    if state["world_size"] != world_size:
        raise ValueError(f"the run in {str(path)!r} had {state['world_size']} processes, this "
                         f"one {world_size}; resume with the same number")
    return state
