"""Where a result came from: the CT (DICOM UIDs or a file checksum), the model, the software, the time.

Every results.json carries this under ``"provenance"``; the CSV repeats the identifying
fields on each row; the Slicer module puts it on its results table as node attributes::

    from m3netcore.provenance import provenance
    record = provenance(image, "/data/ct-folder", model, "cpu", model_source="demo")
    record["input"]["study_instance_uid"]

A DICOM input is identified by its UIDs (read from the series' first file header, not the
pixels), so a result can be matched to the series in a PACS; a file is identified by its
SHA-256 (and its data file's, for a ``.mhd`` or ``.nhdr`` header), since a path says
nothing once the file has moved.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

import SimpleITK as sitk

from m3netcore.checkpoint import Model, bundled_registry, file_sha256
from m3netcore.io import series_uid_of

# DICOM tag (group|element as SimpleITK names it) -> key in the provenance record
DICOM_TAGS = {
    "0010|0020": "patient_id",
    "0020|000d": "study_instance_uid",
    "0020|000e": "series_instance_uid",
    "0020|0052": "frame_of_reference_uid",
    "0008|0060": "modality",
}
# The keys the CSV repeats on every row (flattened from the record).
CSV_FIELDS = (
    "patient_id",
    "study_instance_uid",
    "series_instance_uid",
    "frame_of_reference_uid",
    "input_sha256",
    "model_sha256",
    "software_version",
    "device",
    "time",
)


def software_version() -> str:
    """m3netcore's version: the installed distribution's, else the package's own constant."""
    try:
        return metadata.version("m3net-core")
    except metadata.PackageNotFoundError:
        import m3netcore

        return m3netcore.__version__


def provenance(
    image: sitk.Image,
    source_path: str | os.PathLike | None,
    model: Model,
    device: str,
    *,
    model_source: str | os.PathLike | None = None,
    time: datetime.datetime | None = None,
    known_sha256: Mapping[str, str] | None = None,
    dicom_files: Sequence[str] | None = None,
) -> dict:
    """The provenance record of one prediction run (JSON-ready).

    Args:
        image: the CT as read by :func:`m3netcore.read_image` (its series UID is used to
            pick the series' files in a folder with several).
        source_path: what the CT was read from: a DICOM folder (or one of its files) or an
            image file; ``None`` for a volume that has no file.
        model: the model used.
        device: the device the model ran on (e.g. ``"cpu"``, ``"cuda:0"``).
        model_source: what the model was loaded from (a bundled name or a file path); its
            file's SHA-256 is recorded. Without it, the SHA-256 of the weights is recorded
            (``model.weights_sha256``), which identifies the network but not the file.
        time: when the run happened (default: now, UTC).
        known_sha256: ``{absolute path: SHA-256}`` of files the caller hashed already (a batch
            worker hashes each CT's files for its own record and its model file once), so
            they are not read again.
        dicom_files: the files of the series the image was read from
            (:func:`m3netcore.io.read_image_and_files`), so the folder is not scanned again.

    Returns:
        ``{"time", "software": {"name", "version"}, "device", "model": {...},
        "input": {"kind": "dicom", ...UIDs...} | {"kind": "file", "path", "sha256"}}``.
    """
    when = (time or datetime.datetime.now(datetime.timezone.utc)).isoformat(timespec="seconds")
    return {
        "time": when,
        "software": {"name": "m3net-core", "version": software_version()},
        "device": str(device),
        "model": model_provenance(model, model_source, known_sha256=known_sha256),
        "input": input_provenance(image, source_path, known_sha256=known_sha256, dicom_files=dicom_files),
    }


def model_provenance(model: Model, model_source: str | os.PathLike | None = None, *,
                     known_sha256: Mapping[str, str] | None = None) -> dict:  # fmt: skip
    """The model's name, version, architecture and checksum (``known_sha256``: as for :func:`provenance`)."""
    record = {"name": model.name, "version": model.version, "architecture": model.architecture}
    registry = bundled_registry()
    if isinstance(model_source, str) and model_source in registry:
        record["source"] = f"bundled:{model_source}"
        record["sha256"] = registry[model_source]["sha256"]  # load_model checked the file against it
    elif model_source is not None and Path(model_source).is_file():
        record["source"] = str(model_source)
        record["sha256"] = _sha256(model_source, known_sha256)
    else:
        record["weights_sha256"] = weights_sha256(model)
    return record


def input_provenance(image: sitk.Image, source_path: str | os.PathLike | None, *,
                     known_sha256: Mapping[str, str] | None = None,
                     dicom_files: Sequence[str] | None = None) -> dict:  # fmt: skip
    """DICOM UIDs and PatientID of a series (a folder, or one of its files), or the checksum of an image file.

    ``known_sha256``, ``dicom_files``: as for :func:`provenance`.

    ``source_path=None`` (a volume that was never saved, e.g. made in Slicer): only what the
    image itself says, its SeriesInstanceUID if it has one.
    """
    if source_path is None:
        uid = series_uid_of(image)
        return {"kind": "unsaved"} | ({"series_instance_uid": uid} if uid else {})
    path = Path(source_path)
    if path.is_dir() or _is_dicom_file(path):
        record = {"kind": "dicom", "path": str(path)}
        series_uid = series_uid_of(image)
        if series_uid is None and path.is_file():  # e.g. a Slicer volume: the file names its series
            series_uid = _header_value(path, "0020|000e")
        if dicom_files and path.is_dir():  # the series' files as read: its first file's header
            record.update(_identifiers_in(dicom_files[0]))
        else:
            record.update(dicom_identifiers(path if path.is_dir() else path.parent, series_uid))
        return record
    record = {"kind": "file", "path": str(path), "sha256": _sha256(path, known_sha256)}
    data_file = detached_data_file(path)
    if data_file is not None:
        record["data_file"] = str(data_file)
        record["data_file_sha256"] = _sha256(data_file, known_sha256)
    return record


def dicom_identifiers(folder: str | os.PathLike, series_uid: str | None) -> dict:
    """PatientID, Study/Series/Frame of Reference UIDs and modality of a series, from one file's header."""
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
    uid = series_uid if series_uid in ids else (ids[0] if ids else None)
    if uid is None:
        return {}
    return _identifiers_in(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)[0])


def _identifiers_in(first: str) -> dict:
    """The :data:`DICOM_TAGS` of one DICOM file's header ("" where absent)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(first)
    reader.ReadImageInformation()  # the header only
    found = {key: reader.GetMetaData(tag).strip() for tag, key in DICOM_TAGS.items() if reader.HasMetaDataKey(tag)}
    return {key: found.get(key, "") for key in DICOM_TAGS.values()}


def _header_value(path: Path, tag: str) -> str | None:
    """One tag of a DICOM file's header (not its pixels), or None."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else None


def weights_sha256(model: Model) -> str:
    """SHA-256 over the network's tensors (sorted by name): the same weights give the same digest.

    The digest model files record of their weights (``checkpoint``), computed from the network.
    """
    from m3netcore.checkpoint import _weights_digest

    return _weights_digest(model.network.state_dict())


def csv_values(record: dict) -> dict[str, str]:
    """The record's identifying fields as the CSV columns :data:`CSV_FIELDS` (empty where absent)."""
    source = record.get("input", {})
    model = record.get("model", {})
    values = {
        "patient_id": source.get("patient_id", ""),
        "study_instance_uid": source.get("study_instance_uid", ""),
        "series_instance_uid": source.get("series_instance_uid", ""),
        "frame_of_reference_uid": source.get("frame_of_reference_uid", ""),
        "input_sha256": source.get("sha256", ""),
        "model_sha256": model.get("sha256", model.get("weights_sha256", "")),
        "software_version": record.get("software", {}).get("version", ""),
        "device": record.get("device", ""),
        "time": record.get("time", ""),
    }
    return {key: values[key] for key in CSV_FIELDS}


def node_attributes(record: dict, prefix: str = "M3Net.provenance.") -> dict[str, str]:
    """The record flattened into string attributes (``M3Net.provenance.input.study_instance_uid`` ...).

    For MRML node attributes (the Slicer module's results table), which hold strings only.
    """
    flat: dict[str, str] = {}

    def walk(value, name: str) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(inner, f"{name}.{key}" if name else str(key))
        else:
            flat[prefix + name] = "" if value is None else str(value)

    walk(record, "")
    return flat


def _is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: "DICM" after the 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _sha256(path: str | os.PathLike, known: Mapping[str, str] | None) -> str:
    return (known or {}).get(os.path.abspath(path)) or file_sha256(path)


def detached_data_file(header: Path) -> Path | None:
    """The pixel file a ``.mhd`` (ElementDataFile) or ``.nhdr`` (data file) header points to, if one."""
    suffix = header.suffix.lower()
    if suffix not in (".mhd", ".nhdr"):
        return None
    pattern = r"^\s*ElementDataFile\s*=\s*(.+?)\s*$" if suffix == ".mhd" else r"^\s*data ?file\s*:\s*(.+?)\s*$"
    try:
        text = header.read_text(encoding="latin-1", errors="replace")
    except OSError:
        return None
    match = re.search(pattern, text, flags=re.MULTILINE | re.IGNORECASE)
    if match is None or match.group(1) in ("LOCAL", "LIST") or match.group(1).startswith("LIST"):
        return None
    data = header.parent / match.group(1)
    return data if data.is_file() else None
