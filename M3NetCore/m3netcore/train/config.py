"""The settings of one training run (``m3net train --config FILE``), with their defaults."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from m3netcore.data.labels import DEFAULT_PROTOCOL, check_protocol
from m3netcore.errors import M3NetInputError

_KIND_NAMES = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a string",
               "dict": "a mapping"}


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a training run's result; written to ``RUN/config.json``.

    Args:
        epochs: passes over the training nodules (the schedule is planned for all of them).
        batch_size: nodules per optimiser step over all processes (the global batch); under
            ``torchrun`` each process takes ``batch_size / world size`` of every batch.
        learning_rate: AdamW peak rate, reached after a linear warm-up, then cosine decay to 0.
        warmup_fraction: share of all steps spent warming up.
        weight_decay: AdamW decoupled weight decay.
        mi_weight: lambda, weight of the cross-scale InfoNCE term (0 = the ablation).
        mi_temperature: InfoNCE softmax temperature.
        vote_weight: weight of the per-scale vote loss for models that vote per scale (M3Net):
            each scale's vote must predict the label from its own view, which is what makes
            the scale attention name the deciding view (0 = without it).
        seed: seeds the network's initial weights, the inner validation split, the order of
            the nodules, augmentation and dropout.
        protocol: the label protocol (``m3netcore.data.labels``).
        validation_folds: the training folds' patients are split into this many patient-level,
            stratified inner folds; inner fold 0 is the validation set (model selection,
            temperature, threshold). The held-out fold is never looked at while training.
        max_rotation_deg: rotation about a random 3D axis by up to this angle.
        flip: mirror each axis with probability 1/2.
        max_scale_change: isotropic zoom drawn from ``[1 - s, 1 + s]``.
        max_shift_mm: shift of the view centre along each axis, up to this many mm.
        hu_noise_std: Gaussian noise whose standard deviation (HU) is drawn per nodule from
            ``[0, hu_noise_std]``.
        log_every: a progress line every this many steps.
        model_config: overrides of the architecture's config (e.g. ``{"dropout": 0.0}``).
    """

    epochs: int = 12
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 1e-4
    mi_weight: float = 0.1
    mi_temperature: float = 0.1
    vote_weight: float = 0.5
    seed: int = 0
    protocol: str = DEFAULT_PROTOCOL
    validation_folds: int = 5
    max_rotation_deg: float = 25.0
    flip: bool = True
    max_scale_change: float = 0.1
    max_shift_mm: float = 2.0
    hu_noise_std: float = 20.0
    log_every: int = 20
    model_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                    "mi_temperature": self.mi_temperature, "log_every": self.log_every}  # fmt: skip
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        for name in ("weight_decay", "mi_weight", "vote_weight", "max_rotation_deg", "max_shift_mm", "hu_noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_scale_change < 1.0:
            raise ValueError(f"max_scale_change must be in [0, 1), got {self.max_scale_change}")
        if self.validation_folds < 2:
            raise ValueError(f"validation_folds must be >= 2, got {self.validation_folds}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        check_protocol(self.protocol)

    def _check_types(self) -> None:
        """Refuse a value of the wrong kind (``epochs: 1.5``, ``flip: "no"``); an int is a fine float."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict}[f.type]
            if not isinstance(value, kind) or (isinstance(value, bool) and f.type != "bool"):
                raise ValueError(f"{f.name} must be {_KIND_NAMES[f.type]}, got {value!r}")
            if f.type == "float":
                object.__setattr__(self, f.name, float(value))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes: object) -> RunConfig:
        """A copy with ``changes``; ``None`` values are ignored (unset command-line options)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        """A config from ``values`` over the defaults; unknown keys and bad values raise ``M3NetInputError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise M3NetInputError(f"unknown training setting(s) {unknown}; known: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise M3NetInputError(f"bad training setting: {err}") from err


def read_json_mapping(path: str | os.PathLike) -> dict:
    """The JSON object in a file that m3net wrote (a run's settings, a fold's identity).

    Raises:
        M3NetInputError: the file is missing, unreadable, cut off or not a JSON object.
    """
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise M3NetInputError(f"{path} is missing or damaged: {err}") from err
    if not isinstance(values, dict):
        raise M3NetInputError(f"{path} is damaged: not a JSON object")
    return values


def read_config(path: str | os.PathLike) -> RunConfig:
    """A :class:`RunConfig` from a TOML (``.toml``) or JSON file (any other name).

    Keys are the fields of :class:`RunConfig`.
    """
    path = Path(path)
    if not path.is_file():
        raise M3NetInputError(f"no config file {path}")
    if path.suffix.lower() in (".yaml", ".yml"):
        raise M3NetInputError(f"{path}: config files are JSON or TOML (.toml), not YAML")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise M3NetInputError(f"{path} is not UTF-8 text: {err}") from err
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib  # novermin (Python 3.10 takes the ImportError branch below)
            except ImportError as err:  # Python 3.10
                raise M3NetInputError("TOML configs need Python >= 3.11; use a .json config") from err
            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except ValueError as err:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise M3NetInputError(f"{path} is not valid {kind}: {err}") from err
    if not isinstance(values, dict):
        raise M3NetInputError(f"{path} must hold a mapping of settings")
    return RunConfig.from_dict(values)
