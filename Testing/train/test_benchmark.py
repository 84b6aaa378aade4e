"""`m3net benchmark accuracy`: reference rows, network rows by CV, rows that cannot run say why."""

from __future__ import annotations

import json

import pytest

from m3netcore.cli import main
from m3netcore.evaluation.benchmark import NETWORK_ROWS
from m3netcore.models.registry import ARCHITECTURES


def test_every_network_row_names_a_registered_architecture():
    assert all(row.architecture in ARCHITECTURES for row in NETWORK_ROWS)
    names = {row.architecture for row in NETWORK_ROWS}
    assert {"m3net-no-micro", "m3net-no-meso", "m3net-no-macro", "resnet18x3", "single-micro"} <= names


def test_table_has_reference_network_and_not_run_rows(two_fold_cache, tmp_path, capsys):
    out = tmp_path / "bench"
    (tmp_path / "quick.json").write_text(json.dumps({"batch_size": 8, "log_every": 100}))
    rows = ["majority class", "diameter only (logistic regression)",
            "diameter + readers' other ratings (logistic regression)", "m3net without micro",
            "resnet18x3 (authors' shape)"]  # fmt: skip
    argv = ["benchmark", "accuracy", "--data", str(two_fold_cache), "--protocol", "mean-excl3", "--out", str(out),
            "--json", str(tmp_path / "rows.json"), "--config", str(tmp_path / "quick.json"), "--epochs", "1",
            "--device", "cpu", "--seeds", "1", "--rows", *rows]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = {row["name"]: row for row in json.loads((tmp_path / "rows.json").read_text())}
    assert list(table) == rows
    majority = table["majority class"]
    assert 0.0 <= majority["accuracy"] <= 1.0 and majority["auc_ci"][0] <= majority["auc"] <= majority["auc_ci"][1]
    assert table["diameter only (logistic regression)"]["auc"] > 0.9  # the tiny cache's malignant nodules are larger
    assert "no column" in table["diameter + readers' other ratings (logistic regression)"]["not_run"]
    network = table["m3net without micro"]
    assert network["nodules"] == majority["nodules"] and 0.0 <= network["sensitivity"] <= 1.0
    assert network["training_seconds"] > 0
    assert network["parameters"] > 0 and network["gflops"] > 0
    assert (out / "m3net-without-micro" / "oof.csv").is_file()
    assert network["seeds"] == [0] and network["fold_auc"]["n"] == 2 and len(network["fold_aucs"]) == 2
    assert "intercept and a temperature" in network["pooling"]
    versus = network["versus_diameter"]
    assert versus["reference"] == "diameter only (logistic regression)" and versus["nodules"] == network["nodules"]
    assert versus["difference"] == pytest.approx(network["auc"] - table[versus["reference"]]["auc"])
    assert versus["ci"][0] <= versus["difference"] <= versus["ci"][1]
    assert majority["versus_diameter"]["ci"][1] < 0  # a constant against a diameter that separates the classes
    assert "versus_diameter" not in table["diameter only (logistic regression)"]
    assert majority["fold_auc"]["mean"] == 0.5 and table[versus["reference"]]["fold_auc"]["n"] == 2
    assert table["resnet18x3 (authors' shape)"]["not_run"].startswith("needs GPU")
    assert "| majority class |" in printed and "not run: needs GPU" in printed
    markdown = (out / "table.md").read_text()
    assert "SEMI-SYNTHETIC" in markdown and "| vs diameter only (95% CI) |" in markdown
    assert "Seeds per fold: 1" in markdown


def test_unknown_rows_and_protocols_are_one_line_errors(two_fold_cache, tmp_path, capsys):
    base = ["benchmark", "accuracy", "--data", str(two_fold_cache), "--out", str(tmp_path / "b")]
    assert main([*base, "--protocol", "mean-excl3", "--rows", "nonsense"]) == 2
    assert "unknown row(s) ['nonsense']" in capsys.readouterr().err
    assert main([*base, "--protocol", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_rows_trained_in_parallel_processes_match_rows_trained_one_after_another(two_fold_cache, tmp_path):
    from m3netcore.data.manifest import read_rows_csv
    from m3netcore.evaluation.benchmark import accuracy_table
    from m3netcore.train.config import RunConfig

    config = RunConfig(batch_size=8, epochs=1, log_every=100)
    rows = ["single-micro", "m3net without meso"]
    kept: list[str] = []
    serial = accuracy_table(two_fold_cache, "mean-excl3", tmp_path / "serial", rows=rows, config=config,
                            device="cpu", log=kept.append)  # fmt: skip
    parallel = accuracy_table(two_fold_cache, "mean-excl3", tmp_path / "parallel", rows=rows, config=config,
                              device="cpu", jobs=2, log=kept.append)  # fmt: skip
    assert [row["name"] for row in parallel] == rows  # the table's order, whichever row finished first
    for name, one, other in zip(rows, serial, parallel, strict=True):
        assert one["nodules"] == other["nodules"] and "not_run" not in other
        folder = name.replace(" ", "-")
        a = read_rows_csv(tmp_path / "serial" / folder / "oof.csv")
        b = read_rows_csv(tmp_path / "parallel" / folder / "oof.csv")
        assert [r["nodule_id"] for r in a] == [r["nodule_id"] for r in b]
        # the same training in another process (with fewer torch threads): only float rounding differs
        assert max(abs(x["probability"] - y["probability"]) for x, y in zip(a, b, strict=True)) < 1e-3
    assert json.loads((tmp_path / "parallel" / "table.json").read_text())["jobs"] == 2
    assert "2 at a time" in (tmp_path / "parallel" / "table.md").read_text()


def test_rows_that_the_main_cache_cannot_feed_train_on_an_extra_cache(tmp_path):
    import dataclasses

    import pytest

    from m3netcore.crops import default_preprocessing
    from m3netcore.errors import M3NetInputError
    from m3netcore.evaluation.benchmark import accuracy_table
    from m3netcore.train.config import RunConfig

    from .conftest import write_tiny_cache

    full = default_preprocessing()
    micro_only = write_tiny_cache(tmp_path / "micro", 40, seed=1, folds=2,
                                  preprocessing=dataclasses.replace(full, scales=(full.scale("micro"),)))  # fmt: skip
    extra = write_tiny_cache(tmp_path / "all", 40, seed=1, folds=2)
    config = RunConfig(batch_size=8, epochs=1, log_every=100)
    rows = ["single-micro", "single-macro"]
    alone = accuracy_table(micro_only, "mean-excl3", tmp_path / "alone", rows=rows, config=config, device="cpu",
                           log=lambda _: None)  # fmt: skip
    assert "not_run" not in alone[0]
    assert "no cache holds the cubes" in alone[1]["not_run"] and "--model single-macro" in alone[1]["not_run"]
    table = accuracy_table(micro_only, "mean-excl3", tmp_path / "both", rows=rows, config=config, device="cpu",
                           extra_data=[extra], log=lambda _: None)  # fmt: skip
    assert "data" not in table[0] and table[1]["data"] == str(extra) and table[1]["nodules"] == table[0]["nodules"]
    best, other = sorted(table, key=lambda row: -row["auc"])
    assert "versus_best_single_scale" not in best and other["versus_best_single_scale"]["reference"] == best["name"]
    assert other["versus_best_single_scale"]["difference"] == pytest.approx(other["auc"] - best["auc"])
    other_folds = write_tiny_cache(tmp_path / "other", 40, seed=1, folds=5)
    with pytest.raises(M3NetInputError, match="same nodules"):
        accuracy_table(micro_only, "mean-excl3", tmp_path / "bad", rows=rows, config=config, device="cpu",
                       extra_data=[other_folds], log=lambda _: None)  # fmt: skip


def test_a_rerun_keeps_training_times_and_a_new_row_joins_the_earlier_table(two_fold_cache, tmp_path):
    from m3netcore.evaluation.benchmark import accuracy_table
    from m3netcore.train.config import RunConfig

    from .conftest import write_tiny_cache

    config = RunConfig(batch_size=8, epochs=1, log_every=100)
    out = tmp_path / "bench"
    first = accuracy_table(two_fold_cache, "mean-excl3", out, rows=["majority class", "single-micro"], config=config,
                           device="cpu", log=lambda _: None)  # fmt: skip
    seconds = first[1]["training_seconds"]
    assert seconds > 0
    again = accuracy_table(two_fold_cache, "mean-excl3", out, rows=["single-micro"], config=config, device="cpu",
                           log=lambda _: None)  # fmt: skip
    assert [row["name"] for row in again] == ["majority class", "single-micro"]
    assert again[1]["training_seconds"] == seconds  # the folds' own times, though this call trained nothing
    added = accuracy_table(two_fold_cache, "mean-excl3", out, rows=["diameter only (logistic regression)"],
                           config=config, device="cpu", log=lambda _: None)  # fmt: skip
    assert [row["name"] for row in added] == ["majority class", "diameter only (logistic regression)", "single-micro"]
    stored = json.loads((out / "table.json").read_text())["rows"]
    assert stored == json.loads(json.dumps(added)) and added[0] == first[0]
    diameter = added[1]
    assert diameter["parameters"] == 2 and 0 < diameter["gflops"] < 1e-6 and diameter["training_seconds"] >= 0
    said: list[str] = []
    other = accuracy_table(two_fold_cache, "official", out, rows=["majority class"], config=config, device="cpu",
                           log=said.append)  # fmt: skip
    assert [row["name"] for row in other] == ["majority class"]
    assert any("another protocol, other settings, another cache or an older format: replacing it" in line
               for line in said)  # fmt: skip
    said.clear()
    other_cache = write_tiny_cache(tmp_path / "other", 44, seed=1, folds=2)
    accuracy_table(other_cache, "official", out, rows=["diameter only (logistic regression)"], config=config,
                   device="cpu", log=said.append)  # fmt: skip
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert [(row["name"], row["nodules"]) for row in rows] == [("diameter only (logistic regression)", 44)]
    assert any("replacing it" in line for line in said)  # the 40-nodule cache's majority row is not kept


def test_a_cache_without_the_protocols_labels_or_folds_is_a_one_line_error(two_fold_cache, tmp_path, capsys):
    from m3netcore.data.cache import open_cache

    argv = ["benchmark", "accuracy", "--data", str(two_fold_cache), "--out", str(tmp_path / "b"), "--rows",
            "majority class"]  # fmt: skip
    columns = set(open_cache(two_fold_cache).rows[0])
    assert "label_median-excl3" not in columns
    assert main([*argv, "--protocol", "median-excl3"]) == 2
    assert "has no median-excl3 labels (column label_median-excl3)" in capsys.readouterr().err
    from m3netcore.data.baselines import reference_rows
    from m3netcore.errors import M3NetInputError

    rows = [dict(row) for row in open_cache(two_fold_cache).rows]
    rows[0]["fold"] = None  # a labelled nodule outside every fold
    with pytest.raises(M3NetInputError, match="1 labelled nodules have no fold"):
        reference_rows(rows, "mean-excl3")
