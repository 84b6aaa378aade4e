"""Which cached nodules a run trains, validates and tests on, and the views it feeds the network.

Splits are by patient throughout. For held-out fold ``K`` of the cache's stored folds
(``None``: no held-out fold, every fold trains and validates; for a model to ship):

- test: the nodules of fold ``K``; never seen while training, selecting or calibrating;
- validation: inner fold 0 of a stratified, patient-level split of the other folds'
  patients (:func:`m3netcore.data.folds.patient_folds`); model selection and calibration;
- train: the rest of the other folds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from m3netcore.crops import Preprocessing, ScaleSpec
from m3netcore.data.cache import Cache
from m3netcore.data.folds import patient_folds
from m3netcore.data.labels import check_protocol
from m3netcore.errors import M3NetInputError
from m3netcore.train.augment import (
    NoiseBank,
    SpatialTransform,
    check_views_fit,
    draw_transform,
    normalise_hu_tensor,
    resample_views,
)
from m3netcore.train.config import RunConfig


@dataclass(frozen=True)
class Split:
    """Cache indices of each part, and every labelled nodule's 0/1 label by cache index."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    labels: dict[int, int]

    def labels_of(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray([self.labels[int(i)] for i in indices], dtype=np.int64)

    def describe(self) -> dict:
        return {
            part: {"nodules": int(len(idx)), "malignant": int(self.labels_of(idx).sum()) if len(idx) else 0}
            for part, idx in (("train", self.train), ("validation", self.validation), ("test", self.test))
        }


def cache_folds(cache: Cache) -> list[int]:
    """The fold numbers stored in the cache's manifest."""
    folds = sorted({row.get("fold") for row in cache.rows if row.get("fold") is not None})
    if not folds:
        raise M3NetInputError(f"{cache.path} has no fold column: cannot hold out a fold")
    return [int(f) for f in folds]


def split_cache(cache: Cache, protocol: str, fold: int | None, *, validation_folds: int = 5, seed: int = 0) -> Split:
    """Train / validation / test indices for held-out ``fold`` under ``protocol`` (see module docstring).

    Raises:
        M3NetInputError: unknown protocol, a fold the cache does not have, or too few
            patients or classes to split.
    """
    try:
        check_protocol(protocol)
    except ValueError as err:
        raise M3NetInputError(str(err)) from err
    folds = cache_folds(cache)
    if fold is not None and fold not in folds:
        raise M3NetInputError(f"--fold {fold} out of range: {cache.path} has folds {folds[0]}..{folds[-1]}")
    column = f"label_{protocol}"
    labelled = [(i, row) for i, row in enumerate(cache.rows) if row.get(column) is not None]
    if not labelled:
        raise M3NetInputError(f"{cache.path} has no {protocol} labels (column {column})")
    labels = {i: int(row[column]) for i, row in labelled}
    test = np.asarray([i for i, row in labelled if fold is not None and row["fold"] == fold], dtype=np.int64)
    rest = [(i, row) for i, row in labelled if fold is None or row["fold"] != fold]
    rest_labels = [labels[i] for i, _ in rest]
    if len(set(rest_labels)) < 2:
        raise M3NetInputError(f"protocol {protocol}: the training folds hold only one class")
    try:
        inner = patient_folds(
            [str(row["patient_id"]) for _, row in rest], rest_labels, folds=validation_folds, seed=seed
        )
    except ValueError as err:
        raise M3NetInputError(f"cannot split the training folds into a validation set: {err}") from err
    indices = np.asarray([i for i, _ in rest], dtype=np.int64)
    split = Split(train=indices[inner != 0], validation=indices[inner == 0], test=test, labels=labels)
    for part, idx in (("training", split.train), ("validation", split.validation)):
        if len(set(split.labels_of(idx).tolist())) < 2:
            raise M3NetInputError(f"the {part} nodules of fold {fold} hold only one class: too few nodules")
    return split


class ViewSource:
    """Cuts the model's views out of a cache's cubes, with or without augmentation.

    Args:
        cache: an opened cache.
        preprocessing: the model's input spec (its scales are looked up in the cache by name).
        config: the augmentation settings.
        device: where the views are made. On a GPU all the cubes the model needs are copied
            there once (int16), so that a step moves no data; on the CPU they are read from the
            memory-mapped cache batch by batch.
        keep_untransformed: untransformed views are the same each time (validation after
            every epoch, then calibration and the held-out fold): keep them, batch by batch,
            up to ``KEEP_PLAIN_BYTES``, and hand them out again. Callers must not change
            them in place.
    """

    KEEP_PLAIN_BYTES = 512 * 2**20

    def __init__(self, cache: Cache, preprocessing: Preprocessing, config: RunConfig, device: torch.device, *,
                 keep_untransformed: bool = False) -> None:  # fmt: skip
        stored = {entry["name"]: entry for entry in cache.info["pyramid"]}
        missing = [name for name in preprocessing.scale_names if name not in stored]
        if missing:
            raise M3NetInputError(f"{cache.path} has no {', '.join(missing)} cubes that the model needs")
        self.stored_specs = [
            ScaleSpec(name, tuple(stored[name]["field_of_view_mm"]), tuple(stored[name]["grid"]))
            for name in preprocessing.scale_names
        ]
        self.view_specs = list(preprocessing.scales)
        try:
            check_views_fit(self.stored_specs, self.view_specs)
        except ValueError as err:
            raise M3NetInputError(f"{cache.path} does not fit this model: {err}") from err
        self.arrays = [cache.pyramids[name] for name in preprocessing.scale_names]
        self.hu_window = preprocessing.hu_window
        self.config = config
        self.device = device
        self._resident: list[Tensor] | None = None
        self._noise: dict[str, NoiseBank] = {}
        self._plain: dict[tuple[int, ...], list[Tensor]] = {}
        self._plain_bytes = 0
        self._keep_plain = keep_untransformed

    def views(self, indices: Sequence[int], *, epoch: int | None = None) -> list[Tensor]:
        """Normalised views ``(B, 1, d, h, w)`` per scale; augmented when ``epoch`` is given.

        The augmentation of a nodule is drawn from a generator seeded by (run seed, epoch,
        cache index) alone, so it does not depend on the batch, the process or the order:
        one process and several see the same views, and a resumed run draws what the
        uninterrupted one would have drawn.
        """
        indices = [int(i) for i in indices]
        if epoch is None and tuple(indices) in self._plain:
            return self._plain[tuple(indices)]
        cubes = self._cubes(indices)
        if epoch is None:
            transforms = [SpatialTransform.identity()] * len(indices)
            noise = None
        else:
            transforms, noise = self._draw(indices, epoch)
        matrices = torch.as_tensor(np.stack([t.matrix for t in transforms]), dtype=torch.float32, device=self.device)
        shifts = torch.as_tensor(np.stack([t.shift_mm for t in transforms]), dtype=torch.float32, device=self.device)
        views = resample_views(cubes, self.stored_specs, self.view_specs, matrices, shifts)
        if noise is not None:
            choices, std = noise
            for k, (view, spec) in enumerate(zip(views, self.view_specs, strict=True)):
                self._noise_bank(spec).add_to(view, choices[:, k], std)
        views = [normalise_hu_tensor(v, self.hu_window, inplace=True) for v in views]
        size = sum(v.numel() * v.element_size() for v in views)
        if epoch is None and self._keep_plain and self._plain_bytes + size <= self.KEEP_PLAIN_BYTES:
            self._plain[tuple(indices)] = views
            self._plain_bytes += size
        return views

    def _cubes(self, indices: list[int]) -> list[Tensor]:
        """Per scale, the nodules' stored cubes as float HU ``(B, 1, D, H, W)`` on the device."""
        if self.device.type == "cuda":
            if self._resident is None:
                # np.array: a writable copy of the read-only memory map, as torch.from_numpy wants
                self._resident = [torch.from_numpy(np.array(a)).to(self.device) for a in self.arrays]
            picked = torch.as_tensor(indices, device=self.device)
            return [cubes[picked][:, None].float() for cubes in self._resident]
        # int16 HU: half the bytes to move
        return [torch.from_numpy(np.stack([a[i] for i in indices]))[:, None].float() for a in self.arrays]

    def _noise_bank(self, spec: ScaleSpec) -> NoiseBank:
        """The scale's own noise fields (shared fields would correlate the views' noise)."""
        if spec.name not in self._noise:
            stream = [s.name for s in self.view_specs].index(spec.name)
            self._noise[spec.name] = NoiseBank(spec.tensor_shape, self.config.seed, self.device, stream=stream)
        return self._noise[spec.name]

    def _draw(self, indices: list[int], epoch: int) -> tuple[list[SpatialTransform], tuple[np.ndarray, list] | None]:
        """Each nodule's transform and, unless noise is off, its noise choice per scale and its std."""
        c = self.config
        transforms, choices, stds = [], [], []
        for index in indices:
            rng = np.random.default_rng([c.seed, epoch, index])
            transforms.append(
                draw_transform(rng, max_rotation_deg=c.max_rotation_deg, flip=c.flip,
                               max_scale_change=c.max_scale_change, max_shift_mm=c.max_shift_mm)
            )  # fmt: skip
            if c.hu_noise_std == 0:
                continue
            stds.append(rng.uniform(0.0, c.hu_noise_std))
            # a draw per scale, from the scale's own fields: noise shared by the views would let
            # InfoNCE pair them by it
            choices.append(np.stack([self._noise_bank(spec).draw(rng) for spec in self.view_specs]))
        if c.hu_noise_std == 0:
            return transforms, None
        return transforms, (np.stack(choices), stds)
