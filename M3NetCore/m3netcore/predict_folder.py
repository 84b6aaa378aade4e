"""Predict the nodules of one CT into one folder, as ``m3net predict IMAGE --points FILE --out DIR`` does.

The shared step of ``m3net predict-many`` (one call per CT, in a worker process that
keeps its model) and of anything else that fills one results folder per CT::

    from m3netcore import load_model
    from m3netcore.predict_folder import predict_to_folder

    model = load_model("demo")
    done = predict_to_folder("out/ct-1", "ct-1.nrrd", model, points_file="points.csv", model_source="demo")
    done.nodules    # how many results were written

The folder is owned with :class:`m3netcore.outputs.OutputFolder`: locked for the call, the
whole set (results.json, results.csv, heatmaps and any ``extra_files``) swapped in at the
end or nothing at all, so a process killed midway leaves the folder as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from m3netcore.checkpoint import Model
from m3netcore.errors import M3NetInputError
from m3netcore.points import LabeledPoint

if TYPE_CHECKING:
    from m3netcore.batching import NoduleBatcher


@dataclass(frozen=True)
class FolderResults:
    """What :func:`predict_to_folder` wrote: the folder, its nodule count and its provenance record."""

    folder: Path
    nodules: int
    heatmaps: int
    provenance: dict


def predict_to_folder(
    out_dir: str | os.PathLike,
    image_path: str | os.PathLike,
    model: Model,
    *,
    points_file: str | os.PathLike | None = None,
    points: Sequence[LabeledPoint] = (),
    series_uid: str | None = None,
    coords: str = "LPS",
    explain: bool = True,
    device: str = "auto",
    model_source: str | os.PathLike | None = None,
    extra_files: Mapping[str, str] | None = None,
    on_result: Callable[[str, object], None] | None = None,
    batcher: NoduleBatcher | None = None,
    dicomweb: str | None = None,
    known_sha256: Mapping[str, str] | None = None,
) -> FolderResults:
    """Read one CT, predict its points and write results.json, results.csv and heatmaps into ``out_dir``.

    Args:
        out_dir: the CT's results folder (created; an earlier set in it is replaced as a whole).
        image_path: a DICOM series folder or an image file.
        model: from :func:`m3netcore.load_model` (load it once, call this per CT).
        points_file: any points file ``m3net predict --points`` reads; a LUNA16/LUNA25 file of
            many series is matched to the image's SeriesInstanceUID (or to ``series_uid``).
        points: further points, already in LPS (``--point`` of ``m3net predict``).
        series_uid: the series to read from a DICOM folder of several; for an image file,
            the series whose rows of a LUNA file are its points.
        coords: the coordinate system of a plain CSV points file ("LPS" or "RAS").
        explain: also write the Grad-CAM heatmaps.
        device: "auto", "cpu" or "cuda".
        model_source: what ``model`` was loaded from (a bundled name or a path), for provenance.
        extra_files: ``{name: text}`` written into the folder after the results, so they appear
            last (a completion record written here means the set before it is whole).
        on_result: called with ``(label, result)`` after each nodule is written (progress lines).
        batcher: run the network through this :class:`m3netcore.batching.NoduleBatcher` (its
            device and ``explain`` then apply), sharing forward passes with other threads' CTs.
        dicomweb: the DICOMweb service ``image_path`` (a DICOM folder) was downloaded from;
            provenance and the tables name the service instead of the temporary folder.
        known_sha256: ``{absolute path: SHA-256}`` of files hashed already (see
            :func:`m3netcore.provenance.provenance`).

    Raises:
        M3NetInputError: unreadable CT or points file, no points, a point outside the CT, a
            folder held by another run.
    """
    from m3netcore.io import read_image_and_files
    from m3netcore.outputs import OutputFolder
    from m3netcore.points import points_for_image, read_points, unique_labels
    from m3netcore.predict import iter_predict, resolve_device
    from m3netcore.provenance import provenance
    from m3netcore.results import ResultsWriter

    image_path = Path(image_path)
    points = list(points)
    if not points and points_file is None:
        raise M3NetInputError(f"no points for {image_path}: give a points file or points")
    folder = OutputFolder(out_dir)
    with folder as staging:  # a second run into the folder is refused here, before any work
        image, files = read_image_and_files(image_path, series_uid=series_uid if image_path.is_dir() else None)
        if points_file is not None:
            if series_uid is not None and not image_path.is_dir():
                points += read_points(points_file, coords=coords, series_uid=series_uid)
            else:  # LUNA16/LUNA25 rows are filtered by the series the image says it is
                points += points_for_image(points_file, image, image_path, coords=coords)
        labels = unique_labels(p.label for p in points)
        ran_on = batcher.device if batcher is not None else resolve_device(device)
        record = provenance(image, image_path, model, str(ran_on), model_source=model_source,
                            known_sha256=known_sha256, dicom_files=files if image_path.is_dir() else None)  # fmt: skip
        if dicomweb:
            record["input"].pop("path", None)
            record["input"]["dicomweb"] = dicomweb
        if batcher is not None:
            results = batcher.iter_predict(image, [p.lps for p in points])
        else:
            results = iter_predict(model, image, [p.lps for p in points], coords="LPS", explain=explain, device=device)
        source = {"image": str(dicomweb or image_path),
                  "model": str(model_source if model_source is not None else model.name)}  # fmt: skip
        with ResultsWriter(staging, source=source, provenance=record) as writer:
            for label, result in zip(labels, results, strict=True):
                writer.add(label, result)
                if on_result is not None:
                    on_result(label, result)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
    return FolderResults(folder=Path(out_dir), nodules=writer.count, heatmaps=writer.heatmaps, provenance=record)


__all__ = ["FolderResults", "predict_to_folder"]
