"""Results as DICOM objects a PACS keeps: one TID 1500 Measurement Report and a Parametric Map per nodule.

``m3net predict CT_FOLDER --dicom`` writes them into ``OUT/dicom/``::

    from m3netcore.dicom_out import read_series_headers, write_dicom_results
    ct = read_series_headers("ct-folder", series_uid)
    written = write_dicom_results(results, labels, ct, "out/dicom", model=model, provenance=record)

The report (Comprehensive 3D SR, highdicom's TID 1500) holds one measurement group
(TID 1501) per nodule:

- Tracking Identifier (the point's label) and Tracking Unique Identifier (a new UID);
- Finding (DCM 121071) = Nodule (SCT 27925004), Finding Site = Lung (SCT 39607008);
- Probability of cancer (DCM 111047, unit UCUM "1"): the calibrated probability, the
  one DICOM concept for "how likely is this finding cancer" (CAD SR uses it); it is
  INFERRED FROM the point, a SCOORD3D POINT in the CT's Frame of Reference (LPS mm, which is
  DICOM's patient coordinate system, so no conversion);
- Impression (DCM 121073) = Benign (SCT 30807003) or Malignant (SCT 21594007): the call at
  the model's operating threshold; the two values are SNOMED's, the ones DICOM's result
  context group (CID 6063) lists;
- micro / meso / macro scale attention (private codes ``99M3NET`` M3N-ATT-*, unit "1"):
  no public code says "weight of an input scale in a network's fusion", so a private
  coding scheme (DICOM reserves designators starting "99" for that) is declared in the
  SR's Coding Scheme Identification Sequence;
- Algorithm Identification (TID 4019): the model's name and version, with m3netcore's
  version and the operating threshold as parameters;
- an IMAGE item (99M3NET M3N-HEATMAP) referencing that nodule's Parametric Map.

The evidence (Current Requested Procedure Evidence Sequence) lists every CT slice and every
Parametric Map. Patient, study and frame of reference are copied from the CT.

The combined heatmap is a float Parametric Map, not a SEG: Grad-CAM relevance is a
continuous quantity with no boundary; thresholding it would invent a region that the
model never outlined. A map keeps the values (real world value mapping: unit "1",
range 0..1) and shows in a viewer as a colour overlay. Each map lies on its own grid (the
combined heatmap's 96 mm cube, LPS-aligned, centred on the point) in the CT's Frame of
Reference, so nothing is resampled.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m3netcore.atomic import atomic_path
from m3netcore.errors import M3NetInputError
from m3netcore.predict import NoduleResult

PRIVATE_SCHEME = "99M3NET"
MANUFACTURER = "M3NetSlicer project"
MODEL_NAME = "m3net-core"
SR_SERIES_NUMBER = 9701
MAP_SERIES_NUMBER = 9702
NOT_FOR_CLINICAL_USE = "research software, not for clinical use"


@dataclass(frozen=True)
class DicomWritten:
    """What :func:`write_dicom_results` wrote: the SR and the maps, files and UIDs."""

    sr_path: Path
    sr_sop_instance_uid: str
    sr_series_instance_uid: str
    map_paths: tuple[Path, ...]
    map_sop_instance_uids: tuple[str, ...]
    map_series_instance_uid: str | None

    @property
    def paths(self) -> list[Path]:
        """Every file, maps first and the SR last (the order to store them in)."""
        return [*self.map_paths, self.sr_path]


def read_series_headers(folder: str | os.PathLike, series_uid: str | None = None) -> list:
    """The headers (no pixels) of a DICOM series' files, in slice order.

    Raises:
        M3NetInputError: no series, or the files are not readable DICOM with patient and
            study identifiers and a frame of reference.
    """
    import pydicom

    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ())
    uid = series_uid if series_uid in ids else (ids[0] if len(ids) == 1 else None)
    if uid is None:
        raise M3NetInputError(f"{folder}: no DICOM series {series_uid or ''} to describe in DICOM results")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    try:
        headers = [pydicom.dcmread(name, stop_before_pixels=True) for name in files]
    except (OSError, pydicom.errors.InvalidDicomError) as err:
        raise M3NetInputError(f"{folder}: cannot read the series' DICOM headers: {err}") from err
    missing = [k for k in ("StudyInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID") if k not in headers[0]]
    if missing:
        raise M3NetInputError(f"{folder}: the series has no {', '.join(missing)}: cannot reference it in DICOM results")
    for header in headers:
        _fill_type2(header)
    return headers


class DicomWriter:
    """Write each nodule's Parametric Map as it comes, then the SR that references them all.

    Only UIDs and the small results are kept between nodules, not the heatmaps.

    Args:
        out_dir: the folder (created if needed); files are written atomically.
        ct: the CT series' datasets (headers suffice: :func:`read_series_headers`).
        model: the :class:`m3netcore.Model` used (name, version, threshold).
        software_version: m3netcore's version (default: the installed one).
    """

    def __init__(self, out_dir: str | os.PathLike, ct: Sequence, *, model, software_version: str | None = None):
        from pydicom.uid import generate_uid

        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ct = list(ct)
        self.model = model
        self.version = software_version or _software_version()
        self.map_series_uid = generate_uid()
        self._labels: list[str] = []
        self._results: list[NoduleResult] = []
        self._maps: list = []  # per nodule: the map's identifying attributes, or None
        self._map_paths: list[Path] = []

    def add(self, label: str, result: NoduleResult) -> Path | None:
        """Write this nodule's Parametric Map (if it has a combined heatmap); returns its path."""
        from m3netcore.results import heatmap_filename

        number = len(self._results) + 1
        heatmap = result.heatmaps.get("combined")
        self._labels.append(label)
        self._results.append(replace(result, heatmaps={}))
        if heatmap is None:
            self._maps.append(None)
            return None
        pm = parametric_map(heatmap, self.ct, label=label, series_uid=self.map_series_uid,
                            instance_number=number, software_version=self.version)  # fmt: skip
        path = self.out / heatmap_filename(number, label, "combined").replace("_heatmap_combined.nrrd", "_heatmap.dcm")
        _save(pm, path)
        self._maps.append(_identity(pm))
        self._map_paths.append(path)
        return path

    def close(self) -> DicomWritten:
        """Write ``SR.dcm``; returns what was written."""
        sr = measurement_report(self._results, self._labels, self.ct, self._maps, model=self.model,
                                software_version=self.version)  # fmt: skip
        sr_path = self.out / "SR.dcm"
        _save(sr, sr_path)
        return DicomWritten(
            sr_path=sr_path,
            sr_sop_instance_uid=str(sr.SOPInstanceUID),
            sr_series_instance_uid=str(sr.SeriesInstanceUID),
            map_paths=tuple(self._map_paths),
            map_sop_instance_uids=tuple(str(pm.SOPInstanceUID) for pm in self._maps if pm is not None),
            map_series_instance_uid=self.map_series_uid if self._map_paths else None,
        )


def write_dicom_results(
    results: Sequence[NoduleResult],
    labels: Sequence[str],
    ct: Sequence,
    out_dir: str | os.PathLike,
    *,
    model,
    provenance: dict | None = None,
) -> DicomWritten:
    """Write ``SR.dcm`` and one ``<NN>_<label>_heatmap.dcm`` per nodule with a heatmap into ``out_dir``.

    Args:
        results: from :func:`m3netcore.predict` on the CT ``ct`` describes.
        labels: one per result (the tracking identifiers).
        ct: the CT series' datasets (headers suffice: :func:`read_series_headers`).
        out_dir: created if needed; files are written atomically.
        model: the :class:`m3netcore.Model` used (name, version, threshold).
        provenance: the run's record (:mod:`m3netcore.provenance`), for the software version.
    """
    if len(labels) != len(results):
        raise ValueError(f"{len(labels)} labels for {len(results)} results")
    version = (provenance or {}).get("software", {}).get("version")
    writer = DicomWriter(out_dir, ct, model=model, software_version=version)
    for label, result in zip(labels, results, strict=True):
        writer.add(label, result)
    return writer.close()


def parametric_map(
    heatmap: sitk.Image,
    ct: Sequence,
    *,
    label: str,
    series_uid: str,
    instance_number: int,
    software_version: str,
):
    """A float Parametric Map of ``heatmap`` on its own grid in the CT's frame of reference."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    direction = np.asarray(heatmap.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = heatmap.GetSpacing()
    array = sitk.GetArrayFromImage(heatmap).astype(np.float32)  # (frames, rows, columns) = (k, j, i)
    positions = [
        hd.PlanePositionSequence(
            coordinate_system="PATIENT",
            image_position=tuple(float(v) for v in heatmap.TransformIndexToPhysicalPoint((0, 0, k))),
        )
        for k in range(array.shape[0])
    ]
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="RELEVANCE",
        lut_explanation="Grad-CAM relevance, attention-weighted over scales, peak 1",
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        source_images=list(ct),
        pixel_array=array,
        series_instance_uid=series_uid,
        series_number=MAP_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=software_version,
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="HEATMAP",
        content_description=_text(f"M3Net heatmap {label}", 64),
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=(float(spacing[1]), float(spacing[0])),  # between rows (j), between columns (i)
            slice_thickness=float(spacing[2]),
            spacing_between_slices=float(spacing[2]),
        ),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system="PATIENT",
            image_orientation=(*direction[:, 0], *direction[:, 1]),
        ),
        plane_positions=positions,
        series_description="M3Net heatmaps (" + NOT_FOR_CLINICAL_USE + ")",
    )
    shared = pm.SharedFunctionalGroupsSequence[0]
    # highdicom copies the CT's pixel measures when the in-plane spacing happens to match,
    # slice thickness included; the map's slices are its own grid's.
    shared.PixelMeasuresSequence[0].SliceThickness = f"{spacing[2]:.6g}"
    # Frame Anatomy: the heatmap's cube lies in the chest, an unpaired region (this also
    # settles the General Series' Laterality condition, which validators otherwise flag).
    anatomy, region = Dataset(), Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "51185008", "SCT", "Chest"
    anatomy.AnatomicRegionSequence = [region]
    anatomy.FrameLaterality = "U"
    shared.FrameAnatomySequence = [anatomy]
    return pm


def measurement_report(
    results: Sequence[NoduleResult],
    labels: Sequence[str],
    ct: Sequence,
    maps: Sequence,
    *,
    model,
    software_version: str,
):
    """The TID 1500 Measurement Report (Comprehensive 3D SR) of one CT's results (see the module docstring)."""
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    frame_uid = str(ct[0].FrameOfReferenceUID)
    algorithm = hd.sr.AlgorithmIdentification(
        name=_text(model.name, 64),
        version=_text(model.version, 64),
        parameters=[f"m3netcore {software_version}", f"threshold {model.threshold:g}"],
    )
    groups = []
    for label, result, pm in zip(labels, results, maps, strict=True):
        point = hd.sr.CoordinatesForMeasurement3D(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.asarray([result.point_lps], dtype=np.float64),
            frame_of_reference_uid=frame_uid,
        )
        measurements = [
            hd.sr.Measurement(
                name=codes.DCM.ProbabilityOfCancer,
                value=round(float(result.probability), 6),
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm,
                referenced_coordinates=[point],
            )
        ]
        for scale, weight in (result.scale_attention or {}).items():
            measurements.append(
                hd.sr.Measurement(
                    name=attention_code(scale), value=round(float(weight), 6), unit=codes.UCUM.NoUnits
                )
            )
        call = codes.SCT.Malignant if result.label == "malignant" else codes.SCT.Benign
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=_text(label, 64)),
            finding_type=codes.SCT.Nodule,
            finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=codes.DCM.Impression, value=call)],
        )
        if pm is not None:
            group[0].ContentSequence.append(
                hd.sr.ImageContentItem(
                    name=heatmap_code(),
                    referenced_sop_class_uid=pm.SOPClassUID,
                    referenced_sop_instance_uid=pm.SOPInstanceUID,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            )
        groups.append(group)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=_text(f"M3Net {model.name}", 64), manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )  # fmt: skip
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*ct, *(pm for pm in maps if pm is not None)],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # PRELIMINARY, UNVERIFIED: no person has signed a research model's output
        series_description="M3Net malignancy (" + NOT_FOR_CLINICAL_USE + ")",
    )
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "M3NetSlicer private codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    sr.SoftwareVersions = software_version
    sr.ManufacturerModelName = MODEL_NAME
    return sr


# Type 2 attributes of the Patient and General Study modules (present, possibly empty) that the
# derived objects copy from the CT; some exporters leave them out altogether.
_TYPE2_COPIED = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                 "AccessionNumber", "ReferringPhysicianName")  # fmt: skip


def _fill_type2(header) -> None:
    """Add the copied Type 2 attributes a header lacks, empty (in memory only; the CT files are not touched)."""
    for keyword in _TYPE2_COPIED:
        if keyword not in header:
            setattr(header, keyword, "")


def attention_code(scale: str):
    """The private concept of one scale's attention weight (``99M3NET``, ``M3N-ATT-<SCALE>``)."""
    from pydicom.sr.coding import Code

    return Code(f"M3N-ATT-{scale.upper()}"[:16], PRIVATE_SCHEME, f"{scale} scale attention")


def heatmap_code():
    """The private concept of the IMAGE item that points a measurement group at its heatmap."""
    from pydicom.sr.coding import Code

    return Code("M3N-HEATMAP", PRIVATE_SCHEME, "Grad-CAM heatmap")


def _text(value: str, limit: int) -> str:
    """A DICOM LO/SH value: at most ``limit`` characters, no backslash or control characters."""
    clean = "".join(c if c.isprintable() and c != "\\" else "_" for c in str(value))
    return clean[:limit] or "-"


def _identity(dataset):
    """The attributes an SR needs to reference ``dataset`` (its evidence), without its pixels."""
    from pydicom.dataset import Dataset

    identity = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        setattr(identity, keyword, getattr(dataset, keyword))
    return identity


def _save(dataset, path: Path) -> None:
    with atomic_path(path) as temporary:
        dataset.save_as(temporary, enforce_file_format=True)


def _software_version() -> str:
    from m3netcore.provenance import software_version

    return software_version()
