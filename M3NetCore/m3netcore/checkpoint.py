"""Model files: weights, architecture config, preprocessing, calibration and a model card.

A model file is one ``.safetensors`` file. Its tensors are the network's state dict; one
metadata entry, ``m3net_model``, holds a JSON document (sorted keys, so saving the same
model twice gives the same bytes) with everything else. Loading it parses JSON and copies tensor
bytes: it never executes code (no pickle). The metadata also carries a SHA-256 of the
weights, so corruption inside the tensor data is caught, and the registry below pins the
SHA-256 of each named file so a swapped or damaged bundled model is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from m3netcore.atomic import atomic_path
from m3netcore.crops import Preprocessing
from m3netcore.errors import ModelFileError
from m3netcore.models.registry import architecture, build_model

FORMAT_NAME = "m3net-model"
METADATA_KEY = "m3net_model"
FORMAT_VERSION = 1
REGISTRY_FILE = "registry.json"
# What a model file may ask for: each view at most 256 voxels a side and 2**24 voxels in
# all (a 256^3 float32 crop is 64 MB per nodule), at most 2 m across; text fields short.
MAX_GRID_SIDE = 256
MAX_GRID_VOXELS = 2**24
MAX_FIELD_OF_VIEW_MM = 2000.0
MAX_SCALES = 8
MAX_NAME_CHARACTERS = 200


@dataclass
class Model:
    """A network with everything needed to use it on a CT.

    Attributes:
        network: the ``nn.Module`` (a registered architecture).
        architecture: its registry name.
        preprocessing: the views and HU window it was trained with.
        temperature: logit temperature fitted on validation data (probability = sigmoid(logit / T)).
        threshold: probability at or above which the label is "malignant".
        name, version: what the user sees in results.
        card: the model card (markdown): how it was made, how well it does, intended use.
        metadata: anything else recorded at training time (JSON-serialisable).
    """

    network: nn.Module
    architecture: str
    preprocessing: Preprocessing
    temperature: float = 1.0
    threshold: float = 0.5
    name: str = "untrained"
    version: str = "0"
    card: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        network_scales = tuple(getattr(self.network, "scale_names", ()))
        if network_scales != self.preprocessing.scale_names:
            raise ValueError(
                f"the network takes views {network_scales} but the preprocessing makes "
                f"{self.preprocessing.scale_names}; they must match in name and order"
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite positive number, got {self.temperature}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    @classmethod
    def untrained(cls, architecture_name: str, config: dict | None = None) -> Model:
        """A freshly initialised network with its architecture's default preprocessing.

        ``config``: field values over the architecture's default config (:func:`build_model`).
        """
        return cls(
            network=build_model(architecture_name, config),
            architecture=architecture_name,
            preprocessing=architecture(architecture_name).preprocessing(),
        )

    def describe(self) -> dict:
        """The metadata a user or a results file sees."""
        return {
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture,
            "temperature": self.temperature,
            "threshold": self.threshold,
        }


def save_model(model: Model, path: str | os.PathLike) -> str:
    """Write ``model`` to ``path`` atomically; returns the file's SHA-256."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.network.state_dict().items()}
    config = getattr(model.network, "config", None)
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": model.architecture,
        "config": _config_dict(config),
        "preprocessing": model.preprocessing.to_dict(),
        "calibration": {"temperature": model.temperature, "threshold": model.threshold},
        "name": model.name,
        "version": model.version,
        "card": model.card,
        "metadata": model.metadata,
        "weights_sha256": _weights_digest(state),
    }
    metadata = {METADATA_KEY: json.dumps(document, sort_keys=True)}
    with atomic_path(path) as temporary:
        save_file(state, str(temporary), metadata=metadata)
        digest = file_sha256(temporary)
    return digest


def load_model(name_or_path: str | os.PathLike = "demo") -> Model:
    """Load a bundled model by name (``"demo"``) or a model file by path.

    A bundled name always means the bundled, checksummed file, whatever lies in the
    working folder; a file of that name is loaded as ``./demo``. Next come the names of the
    user's registry (:mod:`m3netcore.user_models`, checksummed too). Anything else is a path.

    Raises:
        ModelFileError: missing, truncated or corrupt file; another format or version;
            a checksum that does not match; metadata or weights that do not describe a
            usable model. The message is one line.
    """
    text = str(name_or_path)
    registry = bundled_registry()
    if isinstance(name_or_path, str) and text in registry:
        entry = registry[text]
        path = Path(str(resources.files("m3netcore") / "weights" / entry["file"]))
        return read_model_file(verified_file(path, entry["sha256"], f"bundled model {text!r}"))
    if isinstance(name_or_path, str):
        from m3netcore.user_models import user_model_path  # the user's registry (m3net bundle --register)

        registered = user_model_path(text)
        if registered is not None:
            return read_model_file(registered)
    path = Path(text)
    if not path.exists():
        known = ", ".join(sorted(registry)) or "none"
        raise ModelFileError(f"no model file {text!r} (and no bundled or registered model of that name; "
                             f"bundled: {known})")  # fmt: skip
    return read_model_file(path)


def verified_file(path: Path, sha256: str, what: str, hint: str = "") -> Path:
    """``path``, after checking that it exists and has the SHA-256 a registry recorded for it.

    Raises:
        ModelFileError: the file is missing or its SHA-256 differs (``hint`` says why that may be).
    """
    if not path.is_file():
        raise ModelFileError(f"{what} is missing its file {path}")
    actual = file_sha256(path)
    if actual != sha256:
        raise ModelFileError(f"{what} ({path}) failed its checksum: sha256 {actual}, expected {sha256}{hint}")
    return path


def read_model_file(path: str | os.PathLike) -> Model:
    """Read one model file (see the module docstring for its layout)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{path} is not a readable model file (truncated or corrupt?): {_one_line(err)}") from err

    try:
        document = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path} is not an M3Net model file (no '{METADATA_KEY}' metadata)") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} is not an M3Net model file (no '{FORMAT_NAME}' format tag)")
    version = document.get("format_version", "?")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has model-file format version {version!r}; this m3net-core reads version {FORMAT_VERSION}"
        )
    if document.get("weights_sha256") != _weights_digest(state):
        raise ModelFileError(f"{path}: the weights do not match their recorded checksum (corrupt file)")
    try:
        fields = _checked_document(document, default_name=path.stem)
    except (KeyError, ValueError, TypeError) as err:
        raise ModelFileError(f"{path}: {_one_line(err)}") from err
    architecture_name = fields["architecture"]
    state = _upgraded(architecture_name, state)
    try:
        # Shapes first, on the meta device (no memory): a config asking for a huge network
        # allocates nothing unless the file holds weights of that size.
        with torch.device("meta"):
            shapes_only = build_model(architecture_name, document.get("config") or None)
        mismatch = _state_mismatch(shapes_only, state)
        if mismatch:
            raise ModelFileError(f"{path}: the weights are not those of a {architecture_name} network: {mismatch}")
        network = build_model(architecture_name, document.get("config") or None)
        network.load_state_dict(state, strict=True)
        model = Model(network=network, architecture=architecture_name, **fields["model"])
    except ModelFileError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as err:
        raise ModelFileError(f"{path}: model file content does not fit this m3net-core: {_one_line(err)}") from err
    network.eval()
    return model


def _checked_document(document: dict, *, default_name: str = "unnamed") -> dict:
    """The model-file fields, validated before anything is built from them.

    Raises:
        ValueError / TypeError / KeyError: with a one-line reason naming the field.
    """
    architecture_name = document["architecture"]
    if not isinstance(architecture_name, str):
        raise TypeError(f"architecture must be a name, got {architecture_name!r}")
    architecture(_printable(architecture_name, "architecture"))  # unknown names fail here, listing the known
    if not isinstance(document.get("config", {}), dict):
        raise TypeError("config must be a mapping")
    calibration = document["calibration"]
    if not isinstance(calibration, dict):
        raise TypeError("calibration must be a mapping")
    temperature = _number(calibration["temperature"], "calibration temperature")
    threshold = _number(calibration["threshold"], "calibration threshold")
    if not temperature > 0:
        raise ValueError(f"calibration temperature must be a finite positive number, got {temperature!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"calibration threshold must be in [0, 1], got {threshold!r}")
    preprocessing = document["preprocessing"]
    if not isinstance(preprocessing, dict) or not isinstance(preprocessing.get("scales"), list):
        raise TypeError("preprocessing must be a mapping with a list of scales")
    scales = preprocessing["scales"]
    if not 1 <= len(scales) <= MAX_SCALES:
        raise ValueError(f"preprocessing has {len(scales)} views; a model has 1 to {MAX_SCALES}")
    for scale in scales:
        _check_scale(scale)
    for key in ("hu_window", "outside_hu"):
        values = preprocessing[key] if isinstance(preprocessing[key], list) else [preprocessing[key]]
        for value in values:
            _number(value, f"preprocessing {key}")
    metadata = document.get("metadata", {})
    if not isinstance(metadata, dict):
        raise TypeError("metadata must be a mapping")
    card = document.get("card", "")
    if not isinstance(card, str):
        raise TypeError("the model card must be text")
    _printable(card, "the model card", allow="\n\t\r")
    return {
        "architecture": architecture_name,
        "model": {
            "preprocessing": Preprocessing.from_dict(preprocessing),
            "temperature": temperature,
            "threshold": threshold,
            "name": _short_text(document.get("name", default_name), "name"),
            "version": _short_text(document.get("version", "0"), "version"),
            "card": card,
            "metadata": metadata,
        },
    }


def _check_scale(scale: object) -> None:
    if not isinstance(scale, dict):
        raise TypeError(f"a preprocessing view must be a mapping, got {scale!r}")
    name = _short_text(scale["name"], "view name")
    grid, fov = scale["grid"], scale["field_of_view_mm"]
    if not (isinstance(grid, list) and len(grid) == 3 and all(type(n) is int for n in grid)):
        raise ValueError(f"view {name!r}: grid must be 3 whole numbers, got {grid!r}")
    if not all(1 <= n <= MAX_GRID_SIDE for n in grid) or math.prod(grid) > MAX_GRID_VOXELS:
        raise ValueError(
            f"view {name!r}: grid {grid} is outside 1..{MAX_GRID_SIDE} voxels a side, {MAX_GRID_VOXELS} in all"
        )
    if not (isinstance(fov, list) and len(fov) == 3):
        raise ValueError(f"view {name!r}: field_of_view_mm must be 3 numbers, got {fov!r}")
    if not all(0 < _number(v, f"view {name!r} field_of_view_mm") <= MAX_FIELD_OF_VIEW_MM for v in fov):
        raise ValueError(f"view {name!r}: field_of_view_mm {fov} is outside (0, {MAX_FIELD_OF_VIEW_MM:g}] mm")


def _number(value: object, what: str) -> float:
    """A finite int or float from JSON (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _short_text(value: object, what: str) -> str:
    """A name or version: text, at most ``MAX_NAME_CHARACTERS``, nothing a terminal would act on."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be text, got {value!r}")
    if not value.strip() or len(value) > MAX_NAME_CHARACTERS:
        raise ValueError(f"{what} must be 1 to {MAX_NAME_CHARACTERS} characters, got {len(value)}")
    return _printable(value, what)


def _printable(text: str, what: str, *, allow: str = "") -> str:
    """``text`` unless it holds control or format characters (escape sequences, bidi overrides)."""
    for character in text:
        if character not in allow and unicodedata.category(character) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            raise ValueError(f"{what} holds the control character {character!r}; it would be printed to terminals")
    return text


def _state_mismatch(network: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Why ``state`` cannot load into ``network``, in one line; empty when it can."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{key} {tuple(state[key].shape)} (the network has {tuple(expected[key].shape)})"
        for key in sorted(set(expected) & set(state))
        if tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    for count, what, examples in (
        (len(missing), "missing", missing),
        (len(unexpected), "unexpected", unexpected),
        (len(shapes), "of another shape", shapes),
    ):
        if count:
            problems.append(f"{count} tensor(s) {what} (e.g. {', '.join(examples[:2])})")
    return "; ".join(problems)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, KeyError):
        return f"no {text} entry"
    return text or type(err).__name__


def _upgraded(architecture_name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights of an earlier M3Net head, renamed for the current one (the same function).

    Files made before the per-scale votes hold ``classifier.*``: one linear layer on the
    attention-weighted mix of value vectors. Because the weights sum to 1,
    ``W (sum_s a_s v_s) + b == sum_s a_s (W v_s + b)``, which is the current head with
    ``vote = classifier``: such files give the same answers, so they still load.
    """
    if architecture_name != "m3net" or "classifier.weight" not in state or "vote.weight" in state:
        return state
    return {("vote." + key[len("classifier.") :] if key.startswith("classifier.") else key): value
            for key, value in state.items()}  # fmt: skip


def bundled_registry() -> dict[str, dict]:
    """Names of the models shipped with the package -> ``{"file", "sha256", ...}``."""
    return read_registry(Path(str(resources.files("m3netcore") / "weights" / REGISTRY_FILE)))


def read_registry(registry_path: Path) -> dict[str, dict]:
    """A registry file: ``{name: {"file": ..., "sha256": ..., ...}}``; missing -> empty."""
    if not registry_path.is_file():
        return {}
    try:
        registry = json.loads(registry_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFileError(f"the bundled model registry {registry_path} is corrupt: {err}") from err
    if not isinstance(registry, dict) or not all(
        isinstance(entry, dict) and {"file", "sha256"} <= set(entry) for entry in registry.values()
    ):
        raise ModelFileError(f"the bundled model registry {registry_path} has entries without file and sha256")
    return registry


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _config_dict(config: object) -> dict:
    import dataclasses

    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
