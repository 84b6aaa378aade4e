"""`m3net predict --dicomweb ... --store` against a real Orthanc with its DICOMweb plugin, on localhost.

Orthanc runs for this module with a temporary configuration and storage folder, on a free
loopback port, with HTTP basic authentication (so the credentials path is the real one) and a
Lua filter that refuses SR objects of one patient (so a refused store is a real refusal).
"""

from __future__ import annotations

import csv
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from dicom_series import NODULES_LPS, write_ct_series

from m3netcore.cli import main
from m3netcore.dicomweb import PASSWORD_ENV, USER_ENV, connect

ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).exists()),
                                          None)  # fmt: skip
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "m3net", "not-a-secret"
REFUSED_PATIENT = "M3NET-NO-SR"
REFUSE_SR_LUA = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.Modality == 'SR' and dicom.PatientID == '{REFUSED_PATIENT}' then
    return false
  end
  return true
end
"""

pytestmark = pytest.mark.skipif(
    ORTHANC is None or not DICOMWEB_PLUGIN.exists(),
    reason="Orthanc with its DICOMweb plugin is not installed (Debian: orthanc, orthanc-dicomweb; .ci/run has them)",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    """A running Orthanc; yields its DICOMweb URL. Stopped (and its storage deleted) after the module."""
    home = tmp_path_factory.mktemp("orthanc")
    (home / "refuse-sr.lua").write_text(REFUSE_SR_LUA)
    port = _free_port()
    config = {
        "Name": "m3net-test", "StorageDirectory": str(home / "db"), "IndexDirectory": str(home / "db"),
        "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "LuaScripts": [str(home / "refuse-sr.lua")], "HttpCompressionEnabled": False,
    }  # fmt: skip
    (home / "orthanc.json").write_text(json.dumps(config))
    log = open(home / "orthanc.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([ORTHANC, str(home / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"Orthanc exited: {(home / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{base}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not answer in 30 s: {(home / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"{base}/dicom-web"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv(USER_ENV, USER)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)


def _upload_ct(url: str, folder: Path, **kwargs):
    """A pydicom-written CT series, stored with STOW-RS as a scanner's export would be."""
    uids = write_ct_series(folder, **kwargs)
    connect(url).store_instances([pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))])
    return uids


def _series_of(url: str, study: str) -> dict[str, str]:
    found = connect(url).search_for_series(study, fields=["Modality"])
    return {item["0020000E"]["Value"][0]: item["00080060"]["Value"][0] for item in found}


def _predict(url: str, study: str, out: Path, *extra: str) -> int:
    points = [f"--point={x},{y},{z}" for x, y, z in NODULES_LPS.values()]
    return main(["predict", "--dicomweb", url, "--study", study, *points, "--device", "cpu", "--out", str(out),
                 *extra])  # fmt: skip


def test_round_trip_from_a_stored_ct_to_the_sr_in_the_study(orthanc, credentials, tmp_path, capsys):
    ct = _upload_ct(orthanc, tmp_path / "ct")
    assert _series_of(orthanc, ct.study) == {ct.series: "CT"}
    assert _predict(orthanc, ct.study, tmp_path / "out", "--store") == 0
    printed = capsys.readouterr().out
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    assert document["provenance"]["input"]["series_instance_uid"] == ct.series
    assert document["provenance"]["input"]["dicomweb"] == orthanc
    series = _series_of(orthanc, ct.study)
    sr_series = [uid for uid, modality in series.items() if modality == "SR"]
    assert len(series) == 3 and len(sr_series) == 1  # the CT, the heatmaps, the SR
    client = connect(orthanc)
    (stored_sr,) = client.retrieve_series(ct.study, sr_series[0])
    local_sr = pydicom.dcmread(tmp_path / "out" / "dicom" / "SR.dcm")
    assert stored_sr.SOPInstanceUID == local_sr.SOPInstanceUID and stored_sr.SOPInstanceUID in printed
    import highdicom as hd
    from pydicom.sr.codedict import codes

    groups = hd.sr.Comprehensive3DSR.from_dataset(stored_sr).content.get_image_measurement_groups()
    probabilities = [g.get_measurements(name=codes.DCM.ProbabilityOfCancer)[0].value for g in groups]
    assert probabilities == pytest.approx([n["probability"] for n in document["nodules"]], abs=1e-6)
    assert {item.ReferencedSOPInstanceUID for item in stored_sr.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0].ReferencedSOPSequence} <= set(ct.sop) | {
        p.SOPInstanceUID for p in map(pydicom.dcmread, (tmp_path / "out" / "dicom").glob("*_heatmap.dcm"))}


def test_a_refused_store_leaves_the_heatmaps_only_and_says_so(orthanc, credentials, tmp_path, capsys):
    ct = _upload_ct(orthanc, tmp_path / "ct", patient_id=REFUSED_PATIENT)
    assert _predict(orthanc, ct.study, tmp_path / "out", "--store") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("m3net: error: ") and "refused" in err[0], err
    maps = [pydicom.dcmread(p) for p in (tmp_path / "out" / "dicom").glob("*_heatmap.dcm")]
    assert f"series {maps[0].SeriesInstanceUID}" in err[0] and "the report was not stored" in err[0]
    modalities = sorted(_series_of(orthanc, ct.study).values())
    assert "SR" not in modalities and len(modalities) == 2  # the CT and the heatmaps, told apart by series
    assert (tmp_path / "out" / "dicom" / "SR.dcm").is_file()  # the local results are whole, to send again


def test_wrong_uid_server_down_and_wrong_password_are_one_line_each(orthanc, credentials, tmp_path, capsys,
                                                                     monkeypatch):  # fmt: skip
    cases = [
        ((orthanc, "1.2.826.0.1.3680043.8.498.999"), "has no study 1.2.826.0.1.3680043.8.498.999"),
        ((f"http://127.0.0.1:{_free_port()}/dicom-web", "1.2.3"), "cannot reach the DICOMweb server"),
    ]
    for (url, study), expected in cases:
        assert _predict(url, study, tmp_path / "out") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    assert _predict(orthanc, "1.2.3", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused the credentials (HTTP 401)" in err[0], err
    assert not (tmp_path / "out").exists()  # nothing was written for a failed retrieve


def test_credentials_come_from_a_file_never_from_the_url(orthanc, tmp_path, capsys, monkeypatch):
    secret = tmp_path / "dicomweb.json"
    secret.write_text(json.dumps({"username": USER, "password": PASSWORD}))
    monkeypatch.setenv("M3NET_DICOMWEB_CREDENTIALS", str(secret))
    monkeypatch.delenv(USER_ENV, raising=False)
    ct = _upload_ct(orthanc, tmp_path / "ct")
    assert _predict(orthanc, ct.study, tmp_path / "out") == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["provenance"]["input"]["study_instance_uid"] \
        == ct.study  # fmt: skip
    capsys.readouterr()
    with_password = orthanc.replace("http://", f"http://{USER}:{PASSWORD}@")
    assert _predict(with_password, ct.study, tmp_path / "other") == 2
    err = capsys.readouterr().err
    assert "never on the command line" in err and PASSWORD not in err


def test_predict_many_reads_dicomweb_studies_and_reruns_one_whose_series_grew(orthanc, credentials, tmp_path,
                                                                                   capsys):  # fmt: skip
    """A manifest of a study URL and a local DICOM folder; a rerun skips the study until its series changes."""
    from m3netcore.batch import CT_FOLDER, ct_folder_name

    ct = _upload_ct(orthanc, tmp_path / "ct")
    local = _upload_ct(orthanc, tmp_path / "local")
    (tmp_path / "points.csv").write_text("x,y,z\n" + "".join(f"{x},{y},{z}\n" for x, y, z in NODULES_LPS.values()))
    study_url = f"{orthanc}/studies/{ct.study}"
    (tmp_path / "manifest.csv").write_text(f"image,points\n{study_url},points.csv\nlocal,points.csv\n")
    out = tmp_path / "many"
    argv = ["predict-many", str(tmp_path / "manifest.csv"), "--out", str(out), "--device", "cpu", "--workers", "1"]

    assert main(argv) == 0, capsys.readouterr().err
    assert "2 done, 0 finished before, 0 failed; 4 nodules" in capsys.readouterr().out
    assert _predict(orthanc, ct.study, tmp_path / "single") == 0
    capsys.readouterr()
    folder = out / CT_FOLDER / ct_folder_name(study_url, None)
    ours, theirs = (json.loads((f / "results.json").read_text()) for f in (folder, tmp_path / "single"))
    assert ours["provenance"]["input"] == theirs["provenance"]["input"]
    assert ours["provenance"]["input"]["dicomweb"] == orthanc and "path" not in ours["provenance"]["input"]
    assert [n["probability"] for n in ours["nodules"]] == pytest.approx([n["probability"] for n in theirs["nodules"]],
                                                                         abs=1e-6)  # fmt: skip
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({row["image"] for row in rows}) == sorted([study_url, "local"])
    assert {row["series_instance_uid"] for row in rows} == {ct.series, local.series}

    assert main(argv) == 0, capsys.readouterr().err  # the series on the server is as it was: skipped
    assert "0 done, 2 finished before, 0 failed; 4 nodules" in capsys.readouterr().out

    extra = pydicom.dcmread(sorted((tmp_path / "ct").glob("*.dcm"))[-1])  # one more slice arrives at the PACS
    extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    extra.InstanceNumber = int(extra.InstanceNumber) + 1
    extra.ImagePositionPatient = [*extra.ImagePositionPatient[:2], float(extra.ImagePositionPatient[2])
                                  + float(extra.SliceThickness)]  # fmt: skip
    connect(orthanc).store_instances([extra])
    assert main(argv) == 0, capsys.readouterr().err
    assert "1 done, 1 finished before, 0 failed; 4 nodules" in capsys.readouterr().out
