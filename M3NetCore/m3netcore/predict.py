"""The one function behind every click, batch run and CLI call: CT + points -> answers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from m3netcore.checkpoint import Model
from m3netcore.crops import extract_crops
from m3netcore.errors import M3NetInputError
from m3netcore.explain import cams_on_grids, gradcam, heatmap_images, signed_target
from m3netcore.geometry import check_inside, lps_to_ras, to_lps
from m3netcore.io import check_image
from m3netcore.models.registry import architecture


@dataclass
class NoduleResult:
    """The answer for one point.

    Attributes:
        point_lps: the point, LPS mm.
        probability: calibrated probability of malignancy, in [0, 1].
        label: "malignant" if ``probability >= threshold`` else "benign".
        logit: the network's raw logit (before temperature).
        scale_attention: {"micro": a, "meso": b, "macro": c} summing to 1, or ``None`` for
            models without scale attention.
        heatmaps: per-scale Grad-CAM images and ``combined`` (empty when ``explain=False``);
            each covers its scale's field of view around the point, values in [0, 1].
        model: the model's name, version, architecture, temperature and threshold.
    """

    point_lps: tuple[float, float, float]
    probability: float
    label: str
    logit: float
    scale_attention: dict[str, float] | None
    heatmaps: dict[str, sitk.Image] = field(default_factory=dict)
    fields_of_view_mm: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    model: dict = field(default_factory=dict)

    @property
    def point_ras(self) -> tuple[float, float, float]:
        return lps_to_ras(self.point_lps)

    def to_dict(self) -> dict:
        """JSON-ready summary (heatmaps are written separately as images).

        The benign/malignant call is under ``"prediction"``, so that files can use
        ``"label"`` for the point's name as the CSV does.
        """
        return {
            "point_lps": list(self.point_lps),
            "point_ras": list(self.point_ras),
            "probability": self.probability,
            "prediction": self.label,
            "logit": self.logit,
            "scale_attention": self.scale_attention,
            "fields_of_view_mm": {k: list(v) for k, v in self.fields_of_view_mm.items()},
            "model": self.model,
        }


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    text = str(device).lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise M3NetInputError(f"device {device!r} requested but no CUDA GPU is available")
        try:
            chosen = torch.device(text)
        except RuntimeError as err:  # "cuda:x", "cuda0"
            raise M3NetInputError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise M3NetInputError(f"device {device!r} requested but this machine has "
                                  f"{torch.cuda.device_count()} CUDA GPU(s) (cuda:0..)")  # fmt: skip
        return chosen
    raise M3NetInputError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


DEFAULT_CHUNK = 16  # points per forward pass: memory stays bounded, a GPU still gets a batch


def predict(
    model: Model | nn.Module,
    image: sitk.Image,
    points: Iterable[Sequence[float]],
    *,
    coords: str = "LPS",
    explain: bool = True,
    device: str | torch.device = "auto",
) -> list[NoduleResult]:
    """Malignancy probability, scale attention and heatmaps for each point on a nodule.

    Args:
        model: from :func:`m3netcore.load_model`, or an untrained network from
            :func:`m3netcore.build_model` (temperature 1, threshold 0.5).
        image: the CT in HU (:func:`m3netcore.read_image`), any spacing and direction.
        points: ``(x, y, z)`` in mm, one per nodule; all share this one image.
        coords: ``"LPS"`` (ITK/DICOM patient coordinates) or ``"RAS"`` (Slicer's world).
        explain: also compute per-scale Grad-CAM heatmaps.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        One :class:`NoduleResult` per point, in order. The list holds every heatmap; for
        many points use :func:`iter_predict`, which keeps one chunk in memory at a time.

    Raises:
        M3NetInputError: a point outside the image, an image that is not one 3D scalar
            volume, a device that is not there, heatmaps asked of a model that has none.

    The network is moved to ``device`` and left in eval mode. Explaining briefly freezes
    its parameters, so do not explain with one network from several threads at once.
    """
    return list(iter_predict(model, image, points, coords=coords, explain=explain, device=device))


def iter_predict(
    model: Model | nn.Module,
    image: sitk.Image,
    points: Iterable[Sequence[float]],
    *,
    coords: str = "LPS",
    explain: bool = True,
    device: str | torch.device = "auto",
    chunk_size: int = DEFAULT_CHUNK,
) -> Iterator[NoduleResult]:
    """:func:`predict` one result at a time, ``chunk_size`` points per forward pass.

    Memory stays the same whatever the number of points: crops, activations and heatmaps
    of one chunk at a time (drop each result once written, as ``m3net predict`` does).
    Everything is checked before the first result (every point inside the image), so a
    bad point fails before any work. Same arguments and errors as :func:`predict`.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    model = as_model(model)
    points_lps = checked_points(model, image, points, coords=coords, explain=explain)
    target = resolve_device(device)
    chunks = (points_lps[start : start + chunk_size] for start in range(0, len(points_lps), chunk_size))
    return (
        result
        for chunk in chunks
        for result in run_network(model, crop_batch(image, chunk, model), chunk, explain=explain, device=target)
    )


def as_model(model: Model | nn.Module) -> Model:
    """A :class:`Model` for a loaded model or an untrained network (temperature 1, threshold 0.5)."""
    if isinstance(model, Model):
        return model
    if not isinstance(model, nn.Module) or not hasattr(model, "architecture_name"):
        raise TypeError(f"model must come from load_model() or build_model(), got {type(model).__name__}")
    name = model.architecture_name
    return Model(network=model, architecture=name, preprocessing=architecture(name).preprocessing())


def checked_points(model: Model, image: sitk.Image, points: Iterable[Sequence[float]], *, coords: str = "LPS",
                   explain: bool = True) -> list[tuple[float, float, float]]:  # fmt: skip
    """The points in LPS after every check :func:`iter_predict` makes before its first result.

    Raises:
        M3NetInputError: an image that is not one 3D scalar volume, a point outside it,
            heatmaps asked of a model that has none.
    """
    check_image(image)
    points_lps = to_lps(points, coords)
    for point in points_lps:
        check_inside(image, point)
    if explain and not architecture(model.architecture).explainable:
        raise M3NetInputError(
            f"{model.architecture} gives no heatmaps (its feature maps do not line up with the input "
            "grid); predict with explain=False (CLI: --no-explain)"
        )
    return [tuple(float(v) for v in point) for point in points_lps]


def crop_batch(image: sitk.Image, points_lps: Sequence[Sequence[float]], model: Model) -> dict[str, np.ndarray]:
    """Each scale's crops around the points, stacked: ``{scale: float32 array [points, z, y, x]}``.

    The CPU half of a prediction; :func:`run_network` is the device half. Batches of
    several CTs are made by concatenating these along the first axis.
    """
    per_point = [extract_crops(image, point, model.preprocessing) for point in points_lps]
    return {name: np.stack([crops[name] for crops in per_point]) for name in model.preprocessing.scale_names}


def run_network(model: Model, crops: dict[str, np.ndarray], points_lps: Sequence[Sequence[float]], *,
                explain: bool = True, device: str | torch.device = "auto") -> list[NoduleResult]:  # fmt: skip
    """The results for stacked crops (:func:`crop_batch`, possibly of several CTs), one per point, in order.

    Each nodule's result depends on its own crops only (the network is in eval mode), so a
    nodule gets the same answer whatever else shares its forward pass.
    """
    preprocessing = model.preprocessing
    target = resolve_device(device)
    network = model.network.to(target).eval()
    described = model.describe() | {"device": str(target)}
    batch = [torch.from_numpy(crops[name])[:, None].to(target) for name in preprocessing.scale_names]

    cams = None
    if explain:
        with gradcam(network) as cam:
            output = network(batch)
            malignant = _probabilities(output.logit.detach(), model) >= model.threshold
            cams = cams_on_grids(cam.maps(signed_target(output.logit, malignant)), preprocessing)
    else:
        with torch.inference_mode():
            output = network(batch)

    logits = output.logit.detach().float().cpu()
    probabilities = _probabilities(logits, model)
    attention = None if output.scale_attention is None else output.scale_attention.detach().float().cpu().numpy()
    results = []
    for i, point in enumerate(points_lps):
        point_tuple = tuple(float(v) for v in point)
        scale_attention = (
            None
            if attention is None
            else {name: float(attention[i, s]) for s, name in enumerate(preprocessing.scale_names)}
        )
        heatmaps = {}
        if cams is not None:
            heatmaps = heatmap_images(
                {name: cams[name][i] for name in preprocessing.scale_names},
                point_tuple,
                preprocessing,
                scale_attention,
            )
        probability = float(probabilities[i])
        results.append(
            NoduleResult(
                point_lps=point_tuple,
                probability=probability,
                label="malignant" if probability >= model.threshold else "benign",
                logit=float(logits[i]),
                scale_attention=scale_attention,
                heatmaps=heatmaps,
                fields_of_view_mm={s.name: tuple(s.field_of_view_mm) for s in preprocessing.scales},
                model=dict(described),
            )
        )
    return results


def _probabilities(logits: torch.Tensor, model: Model) -> torch.Tensor:
    probabilities = torch.sigmoid(logits.float() / model.temperature)
    if not torch.isfinite(probabilities).all():
        raise M3NetInputError("the model produced a non-finite output for this input")
    return probabilities


__all__ = [
    "DEFAULT_CHUNK",
    "NoduleResult",
    "as_model",
    "checked_points",
    "crop_batch",
    "iter_predict",
    "predict",
    "resolve_device",
    "run_network",
]
