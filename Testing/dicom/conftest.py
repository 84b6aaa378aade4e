"""DICOM results tests: a small CT series written with pydicom, and one `m3net predict --dicom --report` run on it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from dicom_series import NODULES_LPS, write_ct_series

from m3netcore.cli import main


@pytest.fixture(scope="session")
def dicom_ct(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("dicom-ct") / "ct"
    uids = write_ct_series(folder)
    uids.folder = folder
    return uids


@pytest.fixture(scope="session")
def predicted(dicom_ct, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One `m3net predict CT --dicom --report` with the demo model: its folder and results.json."""
    out = tmp_path_factory.mktemp("predicted") / "out"
    points = [f"--point={x},{y},{z}" for x, y, z in NODULES_LPS.values()]
    status = main(["predict", str(dicom_ct.folder), *points, "--device", "cpu", "--dicom", "--report",
                   "--out", str(out)])  # fmt: skip
    assert status == 0
    return SimpleNamespace(out=out, document=json.loads((out / "results.json").read_text()))
