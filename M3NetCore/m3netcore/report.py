"""A report per CT that a person reads: one overview PNG per nodule and one self-contained HTML page.

``m3net predict ... --report`` (and the batch script's ``--report``) write, beside
results.json::

    01_N-1_overview.png    three planes through the point for every scale (figure.save_nodule_png)
    report.html            the table, the pictures (inline, as data: URIs), provenance,
                           the model card and the not-for-clinical-use statement

The page needs nothing else: no scripts, no fonts, no links to fetch, so it can be mailed,
archived or opened offline, and it shows the same thing in ten years.

    writer = ReportWriter(out_dir, image, model, provenance=record)
    for label, result in zip(labels, results):
        writer.add(label, result)          # writes that nodule's PNG now
    writer.close()                          # writes report.html
"""

from __future__ import annotations

import base64
import html
import os
import re
from pathlib import Path

import SimpleITK as sitk

from m3netcore.atomic import write_text_atomic
from m3netcore.checkpoint import Model
from m3netcore.predict import NoduleResult
from m3netcore.results import LABEL_IN_FILENAME

REPORT_NAME = "report.html"
NOT_FOR_CLINICAL_USE = (
    "Research software, not for clinical use. The probabilities come from a model trained on "
    "research data; they are not a diagnosis and must not guide the care of a patient."
)


def overview_filename(number: int, label: str) -> str:
    """``<NN>_<label>_overview.png`` (the label cleaned as in the heatmap file names)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")[:LABEL_IN_FILENAME].strip("._") or "nodule"
    return f"{number:02d}_{safe}_overview.png"


class ReportWriter:
    """Write each nodule's overview PNG as it comes, then the HTML page that shows them all.

    Args:
        out_dir: the folder (a run's staging folder).
        image: the CT the results are on.
        model: the model used (its card goes on the page).
        provenance: the run's record (:mod:`m3netcore.provenance`), shown on the page.
        title: the page's heading (default: the CT's identifiers).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        image: sitk.Image,
        model: Model,
        *,
        provenance: dict | None = None,
        title: str | None = None,
    ) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.image = image
        self.model = model
        self.provenance = provenance or {}
        self.title = title
        self.rows: list[dict] = []

    def add(self, label: str, result: NoduleResult) -> Path:
        """Write this nodule's overview PNG; keep its table row (not its heatmaps)."""
        from m3netcore.figure import save_nodule_png

        number = len(self.rows) + 1
        path = self.out / overview_filename(number, label)
        save_nodule_png(self.image, result, label, self.model.preprocessing, path)
        self.rows.append({
            "label": label,
            "point_lps": result.point_lps,
            "probability": result.probability,
            "prediction": result.label,
            "attention": result.scale_attention or {},
            "png": path.name,
        })  # fmt: skip
        return path

    def close(self) -> Path:
        """Write report.html with every PNG inlined; returns its path."""
        path = self.out / REPORT_NAME
        write_text_atomic(path, self.html())
        return path

    def html(self) -> str:
        """The page as text."""
        source = self.provenance.get("input", {})
        title = self.title or _default_title(source)
        scales = [spec.name for spec in self.model.preprocessing.scales]
        rows = "\n".join(self._table_row(row, scales) for row in self.rows)
        pictures = "\n".join(self._figure(row) for row in self.rows)
        head = "".join(f"<th>{html.escape(name)} attention</th>" for name in scales)
        return _PAGE.format(
            title=html.escape(title),
            statement=html.escape(NOT_FOR_CLINICAL_USE),
            head=head,
            rows=rows or f'<tr><td colspan="{5 + len(scales)}">no nodules</td></tr>',
            pictures=pictures,
            provenance=_definition_list(_flatten(self.provenance)),
            model=html.escape(f"{self.model.name} {self.model.version} ({self.model.architecture}), "
                              f"operating threshold {self.model.threshold:g}"),  # fmt: skip
            card=html.escape(self.model.card.strip() or "This model file has no model card."),
        )

    def _table_row(self, row: dict, scales: list[str]) -> str:
        point = ", ".join(f"{v:.1f}" for v in row["point_lps"])
        attention = "".join(
            f"<td>{row['attention'][s]:.2f}</td>" if s in row["attention"] else "<td>-</td>" for s in scales
        )
        return (f'<tr><td>{html.escape(row["label"])}</td><td>{point}</td><td>{row["probability"]:.3f}</td>'
                f'<td class="{row["prediction"]}">{row["prediction"]}</td>{attention}'
                f'<td><a href="#{_anchor(row["png"])}">picture</a></td></tr>')  # fmt: skip

    def _figure(self, row: dict) -> str:
        data = base64.b64encode((self.out / row["png"]).read_bytes()).decode("ascii")
        caption = f"{row['label']}: p = {row['probability']:.3f} ({row['prediction']})"
        return (f'<figure id="{_anchor(row["png"])}"><img alt="{html.escape(caption)}" '
                f'src="data:image/png;base64,{data}">'
                f'<figcaption>{html.escape(caption)}</figcaption></figure>')  # fmt: skip


def _default_title(source: dict) -> str:
    if source.get("kind") == "dicom":
        return f"Patient {source.get('patient_id') or '-'}, series {source.get('series_instance_uid') or '-'}"
    return Path(str(source.get("path", "CT"))).name or "CT"


def _anchor(name: str) -> str:
    return "n-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _flatten(record: dict, prefix: str = "") -> list[tuple[str, str]]:
    items = []
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items += _flatten(value, name + ".")
        else:
            items.append((name, str(value)))
    return items


def _definition_list(items: list[tuple[str, str]]) -> str:
    if not items:
        return "<p>No provenance recorded.</p>"
    body = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items)
    return f"<dl>{body}</dl>"


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>M3Net report: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; max-width: 70em; }}
.warning {{ background: #fff3cd; border: 2px solid #c77c00; padding: 0.6em 1em; font-weight: bold; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }}
th {{ background: #eee; }}
td:first-child {{ text-align: left; }}
td.malignant {{ color: #a00; font-weight: bold; }}
figure {{ display: inline-block; margin: 0.5em; }}
figcaption {{ text-align: center; }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: 0.1em 1em; font-size: 0.9em; }}
dt {{ font-weight: bold; }}
dd {{ margin: 0; font-family: monospace; word-break: break-all; }}
pre {{ background: #f6f6f6; padding: 0.8em; white-space: pre-wrap; }}
</style>
</head>
<body>
<h1>M3Net lung nodule report</h1>
<p class="warning">{statement}</p>
<h2>{title}</h2>
<table>
<tr><th>nodule</th><th>point (LPS mm)</th><th>p(malignant)</th><th>call</th>{head}<th></th></tr>
{rows}
</table>
<h2>Pictures</h2>
<p>Axial, coronal and sagittal planes through each point, for each scale's field of view; the
overlay is each scale's Grad-CAM times its attention weight, on one colour scale. Patient left
is on the right of axial and coronal planes.</p>
{pictures}
<h2>Provenance</h2>
{provenance}
<h2>Model</h2>
<p>{model}</p>
<pre>{card}</pre>
<p class="warning">{statement}</p>
</body>
</html>
"""
