"""A training run's resumable state: one file, written atomically each epoch, loaded without executing code.

``RUN/checkpoint.pt`` holds the network, optimiser and scheduler states, each process's
random-number states (torch, numpy, Python; CUDA where used), the epochs done, the best
epoch so far with its weights, and the metrics history. It is written with ``torch.save``
to a temporary name and moved into place (``os.replace``), so an interruption leaves the
previous epoch's checkpoint whole, and read with ``torch.load(weights_only=True)``, which
refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from m3netcore.atomic import atomic_path
from m3netcore.errors import M3NetInputError

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_NAME = "m3net-train-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (plus the format tag) atomically."""
    with atomic_path(path) as temporary:
        torch.save({"format": FORMAT_NAME, "format_version": FORMAT_VERSION} | state, temporary)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        M3NetInputError: missing, corrupt, or not a training checkpoint of this version.
    """
    path = Path(path)
    if not path.is_file():
        raise M3NetInputError(f"no checkpoint {path} to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not usable"
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]  # torch adds lines of advice
        raise M3NetInputError(f"{path} is not a readable training checkpoint: {first_line}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
        raise M3NetInputError(f"{path} is not an m3net training checkpoint")
    if state.get("format_version") != FORMAT_VERSION:
        raise M3NetInputError(f"{path} is checkpoint version {state.get('format_version')}, not {FORMAT_VERSION}")
    return state


def rng_state() -> dict:
    """This process's random-number states as tensors and plain containers (weights_only-safe)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
