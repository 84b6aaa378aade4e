"""The user's model registry: names for model files made with ``m3net bundle``, outside the package.

``--model NAME`` looks a name up first among the models bundled with the package, then
here; bundled names keep priority and cannot be registered. The registry is a folder with
a ``registry.json`` of the same form as the package's::

    {"lidc-phantom-v2": {"file": "/data/models/m3net-lidc-phantom-v2.safetensors",
                         "sha256": "9c1f...", "version": "2"}}

The folder is ``$M3NET_MODELS`` if set, else ``$XDG_CONFIG_HOME/m3net/models`` (by default
``~/.config/m3net/models``). A relative ``file`` is relative to that folder. Every load
checks the file's SHA-256 against the entry, as for bundled models: a model file changed
after it was registered is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from m3netcore.atomic import write_text_atomic
from m3netcore.checkpoint import REGISTRY_FILE, ModelFileError, bundled_registry, read_registry, verified_file
from m3netcore.errors import M3NetInputError

ENVIRONMENT_VARIABLE = "M3NET_MODELS"


def user_registry_folder() -> Path:
    """The folder of the user's ``registry.json`` (see the module docstring)."""
    chosen = os.environ.get(ENVIRONMENT_VARIABLE)
    if chosen:
        return Path(chosen).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "m3net" / "models"


def user_registry() -> dict[str, dict]:
    """The user's registered names -> ``{"file", "sha256", "version"}``; none registered -> empty."""
    path = user_registry_folder() / REGISTRY_FILE
    try:
        return read_registry(path)
    except ModelFileError as err:
        raise ModelFileError(f"the user model registry {path} is not readable: {err}") from err


def user_model_path(name: str) -> Path | None:
    """The checked file of the registered ``name``, or None if the user registered no such name.

    Raises:
        ModelFileError: the registered file is missing or its SHA-256 differs from the entry's.
    """
    entry = user_registry().get(name)
    if entry is None:
        return None
    path = Path(entry["file"]).expanduser()
    if not path.is_absolute():
        path = user_registry_folder() / path
    return verified_file(path, entry["sha256"], f"registered model {name!r}",
                         " (changed after `m3net bundle --register`?)")  # fmt: skip


def register_model(name: str, file: str | os.PathLike, sha256: str, version: str) -> Path:
    """Add (or replace) ``name`` in the user's registry; returns the registry file written.

    Raises:
        M3NetInputError: ``name`` is a bundled model's name, or ``file`` does not exist.
    """
    if name in bundled_registry():
        raise M3NetInputError(f"{name!r} is the name of a bundled model, which keeps priority: choose another --name")
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise M3NetInputError(f"no model file {path} to register")
    folder = user_registry_folder()
    registry = user_registry()
    registry[name] = {"file": str(path), "sha256": sha256, "version": version}
    folder.mkdir(parents=True, exist_ok=True)
    registry_path = folder / REGISTRY_FILE
    write_text_atomic(registry_path, json.dumps(registry, indent=2, sort_keys=True) + "\n")
    return registry_path
