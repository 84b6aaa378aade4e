"""``m3net demo``: a generated CT with two nodules, the bundled model, every output written."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from m3netcore.atomic import write_text_atomic
from m3netcore.checkpoint import load_model
from m3netcore.data.synthetic import demo_ct
from m3netcore.figure import save_overview_png
from m3netcore.geometry import lps_to_ras
from m3netcore.outputs import OutputFolder
from m3netcore.predict import predict
from m3netcore.results import write_image, write_results


def run_demo(out_dir: str | os.PathLike, *, seed: int = 7, model_name: str = "demo") -> Iterator[str]:
    """Write the demo's CT, points, results, heatmaps and overview PNG; yields progress lines.

    The folder is owned as :class:`m3netcore.outputs.OutputFolder` owns it: locked for the
    run, and its files appear together when the last line has been yielded (none on an error).
    """
    out = Path(out_dir)
    with OutputFolder(out) as staging:
        image, nodules = demo_ct(seed)
        write_image(image, staging / "demo_ct.nrrd")
        labels = [label for label, _, _ in nodules]
        points = [center for _, center, _ in nodules]
        write_text_atomic(staging / "demo_points.mrk.json", json.dumps(_markups(labels, points), indent=2) + "\n")
        yield f"generated CT {image.GetSize()} voxels at {image.GetSpacing()} mm"
        model = load_model(model_name)
        results = predict(model, image, points, coords="LPS", explain=True, device="auto")
        write_results(results, labels, staging, source={"image": "demo_ct.nrrd (generated)", "model": model_name})
        try:
            save_overview_png(image, results, labels, model.preprocessing, staging / "demo_overview.png")
            picture = "demo_overview.png"
        except ImportError:
            picture = "no PNG (needs matplotlib: pip install 'm3net-core[report]')"
        for label, result in zip(labels, results, strict=True):
            attention = ", ".join(f"{k} {v:.2f}" for k, v in (result.scale_attention or {}).items())
            yield f"{label}: probability {result.probability:.3f} ({result.label}); attention {attention}"
    yield f"wrote demo_ct.nrrd, demo_points.mrk.json, results.json, results.csv, heatmaps (NRRD) and {picture} to {out}"
    yield "research software on generated data: not for clinical use"


def _markups(labels: list[str], points_lps: list[tuple[float, float, float]]) -> dict:
    """A Slicer markups point list (LPS, as Slicer writes files) so the CT and points open in Slicer."""
    return {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "controlPoints": [
                    {"id": str(i + 1), "label": label, "position": list(point), "positionStatus": "defined",
                     "description": "RAS {:.1f}, {:.1f}, {:.1f}".format(*lps_to_ras(point))}
                    for i, (label, point) in enumerate(zip(labels, points_lps, strict=True))
                ],
            }
        ],
    }
