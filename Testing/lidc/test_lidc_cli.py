"""`m3net lidc nodules | stats | baselines` on the real annotations."""

from __future__ import annotations

import json

import pytest
from conftest import square, write_database

from m3netcore.cli import main
from m3netcore.data.manifest import read_rows_csv


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, lidc_cache_dir, lidc_table):
    """Point the CLI at the session's computed table (``lidc_table`` fills the cache)."""
    monkeypatch.setenv("M3NET_CACHE_DIR", str(lidc_cache_dir))


def test_stats_json(capsys):
    assert main(["lidc", "stats", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["nodules"] == 2652
    assert document["protocols"]["official"] == {"benign": 2006, "malignant": 646, "excluded": 0}
    assert sum(document["readers_per_nodule"].values()) == 2652


def test_nodules_csv_has_one_row_per_nodule(tmp_path, capsys, lidc_table):
    out = tmp_path / "nodules.csv"
    assert main(["lidc", "nodules", "--out", str(out)]) == 0
    rows = read_rows_csv(out)
    assert len(rows) == 2652
    assert rows[0]["nodule_id"] == lidc_table[0]["nodule_id"]
    assert {"label_mean-excl3", "label_official", "fold", "diameter_mm", "centre_z_mm"} <= set(rows[0])
    assert rows[5]["label_mean-excl3"] == lidc_table[5]["label_mean-excl3"]
    # every reader's ratings, one value per reader
    for row in rows[:50]:
        assert len(str(row["texture_ratings"]).split(";")) == row["readers"]
        assert len(str(row["malignancy_ratings"]).split(";")) == row["readers"]


def test_baselines_json_and_text(capsys):
    assert main(["lidc", "baselines", "--protocol", "official", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in table][0] == "majority class"
    assert all({"name", "auc", "accuracy", "auc_ci"} <= set(row) for row in table)
    assert main(["lidc", "baselines"]) == 0
    text = capsys.readouterr().out
    assert "protocol mean-excl3: 2012 nodules" in text and "protocol official: 2652 nodules" in text


def test_too_few_patients_or_one_class_are_one_line_errors(tmp_path, capsys):
    one = {"malignancy": 4, "contours": [(-100.0 + 1.25 * 10, square(100, 100, 4), True)]}
    tiny = write_database(tmp_path / "tiny.sqlite", [one])
    assert main(["lidc", "stats", "--database", str(tiny)]) == 2
    assert "need at least 5 patients" in capsys.readouterr().err
    nothing = write_database(tmp_path / "none.sqlite", [])
    assert main(["lidc", "stats", "--database", str(nothing)]) == 2
    assert "none.sqlite holds no annotated nodules" in capsys.readouterr().err
    off_scale = write_database(tmp_path / "nine.sqlite", [one | {"malignancy": 9}])
    assert main(["lidc", "stats", "--database", str(off_scale)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "malignancy ratings are 1..5, got [9]" in error


def test_bad_protocol_and_database_are_one_line_errors(tmp_path, capsys):
    assert main(["lidc", "baselines", "--protocol", "nope"]) == 2
    assert capsys.readouterr().err.startswith("m3net: error: unknown label protocol")
    junk = tmp_path / "db.sqlite"
    junk.write_text("junk")
    assert main(["lidc", "stats", "--database", str(junk)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not a readable LIDC annotation database" in error
