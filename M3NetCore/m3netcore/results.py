"""Write prediction results: results.json, results.csv and one NRRD per heatmap."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import SimpleITK as sitk

from m3netcore.atomic import atomic_path, write_text_atomic
from m3netcore.predict import NoduleResult

CSV_COLUMNS = (
    "label",
    "x_lps",
    "y_lps",
    "z_lps",
    "probability",
    "prediction",
    "attention_micro",
    "attention_meso",
    "attention_macro",
    "model",
    "model_version",
)


def heatmap_filename(number: int, label: str, scale: str) -> str:
    """``<NN>_<label>_heatmap_<scale>.nrrd``: the number keeps names unique, the label readable."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "nodule"
    return f"{number:02d}_{safe}_heatmap_{scale}.nrrd"


def write_results(
    results: Sequence[NoduleResult],
    labels: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    source: dict | None = None,
) -> dict:
    """Write all outputs of one ``predict`` call into ``out_dir``; returns the JSON document.

    Args:
        results: from :func:`m3netcore.predict`.
        labels: one name per result (point labels), used in the tables and file names.
        out_dir: created if needed; files are written atomically.
        source: extra provenance for results.json (e.g. the image path).
    """
    if len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nodules = []
    for number, (label, result) in enumerate(zip(labels, results, strict=True), start=1):
        entry = {"label": label} | result.to_dict()
        files = {}
        for scale, image in result.heatmaps.items():
            name = heatmap_filename(number, label, scale)
            with atomic_path(out / name) as temporary:
                sitk.WriteImage(image, str(temporary), useCompression=True)
            files[scale] = name
        entry["heatmap_files"] = files
        nodules.append(entry)
    document = {"coordinate_system": "LPS", "units": "mm", "source": source or {}, "nodules": nodules}
    write_text_atomic(out / "results.json", json.dumps(document, indent=2) + "\n")
    write_text_atomic(out / "results.csv", results_csv(results, labels))
    return document


def results_csv(results: Sequence[NoduleResult], labels: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for label, result in zip(labels, results, strict=True):
        attention = result.scale_attention or {}
        writer.writerow(
            [
                label,
                *(f"{v:.3f}" for v in result.point_lps),
                f"{result.probability:.4f}",
                result.label,
                *(_optional(attention.get(scale)) for scale in ("micro", "meso", "macro")),
                result.model.get("name", ""),
                result.model.get("version", ""),
            ]
        )
    return buffer.getvalue()


def _optional(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
