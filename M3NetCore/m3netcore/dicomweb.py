"""A PACS round trip over DICOMweb: fetch a CT series (WADO-RS), send results back (STOW-RS).

``m3net predict --dicomweb URL --study UID [--series UID] --points FILE --out DIR [--store]``::

    from m3netcore.dicomweb import connect, retrieve_ct_series, store_files
    client = connect("http://pacs:8042/dicom-web")
    series_uid = retrieve_ct_series(client, study_uid, None, download_folder)
    ...
    store_files(client, written.paths)     # heatmaps first, the report last

Credentials never come from the command line (it shows in ``ps`` and shell history) nor
from the URL. They come from the environment:

- ``M3NET_DICOMWEB_TOKEN``: a bearer token; or
- ``M3NET_DICOMWEB_USER`` and ``M3NET_DICOMWEB_PASSWORD``: HTTP basic authentication; or
- ``M3NET_DICOMWEB_CREDENTIALS``: the path of a JSON file ``{"token": ...}`` or
  ``{"username": ..., "password": ...}`` (keep it readable by you alone).

Every failure is one :class:`DicomwebError` line: the server cannot be reached, refuses
the credentials, does not have the study or series, or refuses to store an object. A store
is checked afterwards with QIDO-RS: an object the server answered "stored" for but does not
list counts as refused.

A failed store: the objects go in two requests, the heatmaps (Parametric Maps) first, then
the report (SR) only if every heatmap was stored. So a PACS never holds a report that points
at heatmaps it lacks; a failure leaves at most heatmaps of one series (named in the error,
SeriesDescription "M3Net heatmaps ...", so they can be told apart and deleted), and the
local output folder holds every object to send again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from m3netcore.errors import M3NetInputError

TOKEN_ENV = "M3NET_DICOMWEB_TOKEN"
USER_ENV = "M3NET_DICOMWEB_USER"
PASSWORD_ENV = "M3NET_DICOMWEB_PASSWORD"
CREDENTIALS_FILE_ENV = "M3NET_DICOMWEB_CREDENTIALS"
TIMEOUT_S = (10.0, 300.0)  # to connect; to wait for the next bytes of an answer (a large series)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


class DicomwebError(M3NetInputError):
    """The DICOMweb server could not be reached, or refused or lacked what was asked.

    ``stored``: SOP Instance UIDs the server did store before the failure (a store only).
    """

    def __init__(self, message: str, stored: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.stored = list(stored)


def connect(url: str, environ: dict | None = None):
    """A ``dicomweb_client.DICOMwebClient`` for ``url`` with the credentials of the environment.

    Raises:
        DicomwebError: not an http(s) URL, credentials in the URL, an unreadable
            credentials file, a user without a password.
    """
    from dicomweb_client.api import DICOMwebClient

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DicomwebError(f"--dicomweb {url!r} is not an http:// or https:// URL of a DICOMweb service")
    if parts.username or parts.password:
        raise DicomwebError(
            f"--dicomweb URL carries credentials; give them in {USER_ENV}/{PASSWORD_ENV}, {TOKEN_ENV} "
            f"or a file named by {CREDENTIALS_FILE_ENV}, never on the command line"
        )
    session, headers = _session(credentials(environ))
    client = DICOMwebClient(url=url.rstrip("/"), session=session, headers=headers, timeout=TIMEOUT_S)
    # dicomweb-client retries any failure 5 times over ~30 s; a server that is down should say so
    # at once, and a blip (or a busy server's 503) still gets one more try.
    client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=250)
    client.m3net_url = url.rstrip("/")  # for messages
    return client


def credentials(environ: dict | None = None) -> dict:
    """``{"token": ...}``, ``{"username": ..., "password": ...}`` or ``{}`` from the environment."""
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV):
        return {"token": env[TOKEN_ENV]}
    if env.get(USER_ENV):
        if PASSWORD_ENV not in env:
            raise DicomwebError(f"{USER_ENV} is set but {PASSWORD_ENV} is not")
        return {"username": env[USER_ENV], "password": env[PASSWORD_ENV]}
    path = env.get(CREDENTIALS_FILE_ENV)
    if not path:
        return {}
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DicomwebError(f"{CREDENTIALS_FILE_ENV}={path}: cannot read it as JSON: {err}") from err
    if isinstance(document, dict) and isinstance(document.get("token"), str):
        return {"token": document["token"]}
    if isinstance(document, dict) and isinstance(document.get("username"), str) and isinstance(
        document.get("password"), str
    ):
        return {"username": document["username"], "password": document["password"]}
    raise DicomwebError(f"{CREDENTIALS_FILE_ENV}={path}: expected {{\"token\"}} or {{\"username\", \"password\"}}")


def find_ct_series(client, study_uid: str, series_uid: str | None) -> tuple[str, int]:
    """The CT series of ``study_uid`` that :func:`retrieve_ct_series` would download, and its instance count.

    One QIDO-RS search, nothing downloaded: what a batch run records of a series to know
    on a rerun whether it changed (an image added to the series changes the count).

    Raises:
        DicomwebError: as :func:`retrieve_ct_series`, before any download.
    """
    url = client.m3net_url
    found = _call(lambda: client.search_for_series(study_uid, fields=["Modality", "NumberOfSeriesRelatedInstances"]),
                  url, f"study {study_uid}")  # fmt: skip
    if not found:
        raise DicomwebError(f"{url} has no study {study_uid}")
    series = {_value(item, "0020000E"): _value(item, "00080060") for item in found}
    if series_uid is None:
        ct_series = [uid for uid, modality in series.items() if modality == "CT"]
        if not ct_series:
            raise DicomwebError(f"study {study_uid} on {url} has no CT series (found: {_listing(series)})")
        if len(ct_series) > 1:
            raise DicomwebError(f"study {study_uid} on {url} has {len(ct_series)} CT series; choose one (--series, "
                                f"or a manifest's series_uid): {', '.join(ct_series)}")  # fmt: skip
        series_uid = ct_series[0]
    elif series_uid not in series:
        raise DicomwebError(f"study {study_uid} on {url} has no series {series_uid} (found: {_listing(series)})")
    counts = {_value(item, "0020000E"): _value(item, "00201209") for item in found}
    try:
        instances = int(counts.get(series_uid) or -1)
    except ValueError:
        instances = -1  # the server did not say: the series is then known by its UIDs alone
    return series_uid, instances


def retrieve_ct_series(client, study_uid: str, series_uid: str | None, folder: str | os.PathLike) -> str:
    """Download one CT series of ``study_uid`` into ``folder`` (one file per instance); returns its UID.

    Without ``series_uid`` the study must hold exactly one CT series.

    Raises:
        DicomwebError: server down, credentials refused, no such study or series, several
            CT series and none chosen, a series without CT images.
    """
    series_uid, _ = find_ct_series(client, study_uid, series_uid)
    download_ct_series(client, study_uid, series_uid, folder)
    return series_uid


def download_ct_series(client, study_uid: str, series_uid: str, folder: str | os.PathLike) -> None:
    """Download the CT images of a series already found (:func:`find_ct_series`) into ``folder``.

    Raises:
        DicomwebError: server down, credentials refused, a series without CT images.
    """
    url = client.m3net_url
    datasets = _call(lambda: client.retrieve_series(study_uid, series_uid), url, f"series {series_uid}")
    images = [ds for ds in datasets if ds.get("SOPClassUID") in (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)]
    if not images:
        raise DicomwebError(f"series {series_uid} on {url} holds no CT images")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for number, dataset in enumerate(images, start=1):
        dataset.save_as(out / f"CT{number:05d}.dcm", enforce_file_format=True)


def store_files(client, paths: Sequence[str | os.PathLike]) -> list[str]:
    """STOW-RS the DICOM files ``paths``: every file but the last first, then the last (the report).

    Returns the stored SOP Instance UIDs.

    Raises:
        DicomwebError: the server is down or refused an object; the message says what was
            stored before the failure.
    """
    import pydicom

    datasets = [pydicom.dcmread(p) for p in paths]
    if not datasets:
        return []
    stored: list[str] = []
    for batch in (datasets[:-1], datasets[-1:]):
        if not batch:
            continue
        try:
            stored += _store(client, batch)
        except DicomwebError as err:
            stored += err.stored
            raise DicomwebError(f"{err}; {_what_is_stored(stored, datasets)}", stored=stored) from err
    return stored


def _store(client, datasets: list) -> list[str]:
    url = client.m3net_url
    wanted = [str(ds.SOPInstanceUID) for ds in datasets]
    names = ", ".join(f"{ds.get('Modality', '')} {ds.SOPInstanceUID}" for ds in datasets)
    response = _call(lambda: client.store_instances(datasets), url, f"store of {names}", storing=True)
    failed = {str(item.get("ReferencedSOPInstanceUID", "")): item.get("FailureReason")
              for item in response.get("FailedSOPSequence", [])}  # fmt: skip
    accepted = [str(item.ReferencedSOPInstanceUID) for item in response.get("ReferencedSOPSequence", [])]
    if failed or (response.get("ReferencedSOPSequence") is not None and set(accepted) != set(wanted)):
        reasons = ", ".join(f"{uid or '?'} (failure reason {reason})" for uid, reason in failed.items())
        raise DicomwebError(f"{url} refused to store {reasons or 'some of ' + names}", stored=accepted)
    # Trust, then verify: a server may answer "stored" for an instance it then drops (Orthanc's
    # DICOMweb plugin does so for instances its ReceivedInstanceFilter refuses).
    present = _present(client, datasets)
    missing = [uid for uid in wanted if uid not in present]
    if missing:
        raise DicomwebError(f"{url} answered that it stored {', '.join(missing)} but does not have it "
                            "(refused by a filter or a rule on the server)",
                            stored=[uid for uid in wanted if uid in present])  # fmt: skip
    return wanted


def _present(client, datasets: list) -> set[str]:
    """The SOP Instance UIDs of ``datasets``' series that the server has (QIDO-RS)."""
    url = client.m3net_url
    present: set[str] = set()
    for study, series in sorted({(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)) for ds in datasets}):
        found = _call(lambda study=study, series=series: client.search_for_instances(study, series),
                      url, f"series {series}")  # fmt: skip
        present |= {_value(item, "00080018") for item in found}
    return present


def _call(action, url: str, what: str, *, storing: bool = False):
    """Run a DICOMweb request; any failure becomes one DicomwebError line."""
    import requests

    try:
        return action()
    except requests.exceptions.ConnectionError as err:
        raise DicomwebError(f"cannot reach the DICOMweb server {url} (is it running? is the URL right?)") from err
    except requests.exceptions.Timeout as err:
        raise DicomwebError(f"the DICOMweb server {url} did not answer in time ({what})") from err
    except requests.exceptions.HTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            raise DicomwebError(
                f"{url} refused the credentials (HTTP {status}); set {USER_ENV}/{PASSWORD_ENV}, {TOKEN_ENV} "
                f"or {CREDENTIALS_FILE_ENV}"
            ) from err
        if status == 404 and not storing:
            raise DicomwebError(f"{url} has no {what} (HTTP 404)") from err
        verb = "refused the " if storing else "failed on "
        raise DicomwebError(f"{url} {verb}{what} (HTTP {status})") from err
    except requests.exceptions.RequestException as err:
        raise DicomwebError(f"DICOMweb request to {url} failed ({what}): {err}") from err


def _what_is_stored(stored: list[str], datasets: list) -> str:
    if not stored:
        return "nothing was stored"
    series = sorted({str(ds.SeriesInstanceUID) for ds in datasets if str(ds.SOPInstanceUID) in stored})
    return (f"stored before the failure: {len(stored)} object(s) of series {', '.join(series)} "
            "(heatmaps; the report was not stored)")  # fmt: skip


def _value(item: dict, tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _listing(series: dict) -> str:
    return ", ".join(f"{uid} ({modality or '?'})" for uid, modality in series.items()) or "none"


def _session(secret: dict):
    from dicomweb_client.session_utils import create_session, create_session_from_user_pass

    if "username" in secret:
        return create_session_from_user_pass(secret["username"], secret["password"]), None
    headers = {"Authorization": f"Bearer {secret['token']}"} if "token" in secret else None
    return create_session(), headers
