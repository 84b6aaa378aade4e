"""The accuracy benchmark: one table, patient-level k-fold CV, every row beside the model.

Rows: the reference rows (majority class, diameter-only and diameter + ratings logistic
regressions, :mod:`m3netcore.data.baselines`), the single-scale networks, the authors'
``resnet18x3`` shape, M3Net with lambda = 0, M3Net, and M3Net with each scale dropped.
Every network row is ``m3net cv`` (:func:`m3netcore.evaluation.cv.cross_validate`) into its own
folder under ``out``, with ``seeds`` models per fold whose logits are averaged after each
fold model is recalibrated on its own validation split (:mod:`m3netcore.evaluation.pooling`);
an interrupted benchmark continues where it stopped. Columns: pooled out-of-fold AUC with
its patient-bootstrap 95% CI, the mean, SD and range of the per-fold AUCs, the seeds and
each seed's own pooled AUC, the paired AUC difference to the diameter-only regression and
to the best single-scale network on the same nodules (patient-bootstrap 95% CIs,
:mod:`m3netcore.evaluation.comparison`), accuracy with its CI, sensitivity, specificity,
parameters, GFLOPs per nodule and training time. With ``jobs`` > 1 the network rows train that many at a time in
worker processes (small models leave a GPU mostly idle; one process per row fills it). A
row that cannot run (no GPU for a 48-GFLOP model, no cache with the cubes it needs, no
ratings in the cache) says why instead of a number.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from m3netcore.atomic import write_text_atomic
from m3netcore.checkpoint import Model
from m3netcore.data.baselines import REFERENCE_MODELS, reference_rows, reference_scores
from m3netcore.data.cache import Cache, cache_digest, open_cache
from m3netcore.data.labels import check_protocol
from m3netcore.data.manifest import read_rows_csv
from m3netcore.errors import M3NetInputError
from m3netcore.evaluation.comparison import paired_by_nodule, spread
from m3netcore.evaluation.cv import DIAMETER_ROW, cross_validate, format_difference, format_spread
from m3netcore.evaluation.pooling import ENSEMBLE, POOLING
from m3netcore.evaluation.workers import DevicePool, tagged_print
from m3netcore.progress import Countdown
from m3netcore.summary import model_summary
from m3netcore.train.config import RunConfig
from m3netcore.train.dataset import ViewSource, cache_folds

TABLE_VERSION = 3  # 3: folds recalibrated before pooling, seeds, per-fold spread, paired differences
GPU_ONLY_GFLOPS = 10.0  # forward GFLOPs per nodule above which a row is not trained on a CPU


@dataclass(frozen=True)
class NetworkRow:
    name: str
    architecture: str
    settings: dict = field(default_factory=dict)


NETWORK_ROWS = (
    NetworkRow("single-micro", "single-micro"),
    NetworkRow("single-meso", "single-meso"),
    NetworkRow("single-macro", "single-macro"),
    NetworkRow("resnet18x3 (authors' shape)", "resnet18x3"),
    NetworkRow("m3net, lambda=0", "m3net", {"mi_weight": 0.0}),
    NetworkRow("m3net", "m3net"),
    # issue 14's candidate: wider encoders (431k parameters), 0.917 against 0.902 on fold 0 over 3 seeds
    NetworkRow("m3net, wide encoder", "m3net", {"model_config": {"stem_width": 32, "widths": [48, 64]}}),
    NetworkRow("m3net without micro", "m3net-no-micro"),
    NetworkRow("m3net without meso", "m3net-no-meso"),
    NetworkRow("m3net without macro", "m3net-no-macro"),
)
ROW_NAMES = (*REFERENCE_MODELS, *(row.name for row in NETWORK_ROWS))


def accuracy_table(
    data: str | os.PathLike,
    protocol: str,
    out: str | os.PathLike,
    *,
    rows: Sequence[str] | None = None,
    config: RunConfig | None = None,
    device: str = "auto",
    jobs: int = 1,
    extra_data: Sequence[str | os.PathLike] = (),
    seeds: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Every row's cross-validated result on the cache under ``protocol``; writes ``out/table.md|json``.

    Rows of an earlier table in ``out`` (same protocol, settings and cache content) that this
    call does not make are kept, so ``rows=[X]`` adds or redoes row X; the whole table is returned.

    ``jobs``: network rows cross-validated at once, each in its own process (1: one after
    another in this process). ``extra_data``: caches of the same nodules, folds and labels
    with other cubes (``m3net lidc phantom --model resnet18x3``); a network row that ``data``
    cannot feed trains on the first of them that can. ``seeds``: models per fold of every
    network row (their recalibrated logits averaged; each seed's pooled AUC reported too).
    """
    from m3netcore.predict import resolve_device

    wanted = list(rows) if rows else list(ROW_NAMES)
    unknown = [name for name in wanted if name not in ROW_NAMES]
    if unknown:
        raise M3NetInputError(f"unknown row(s) {unknown}; rows: {'; '.join(ROW_NAMES)}")
    if jobs < 1:
        raise M3NetInputError(f"--jobs must be at least 1, got {jobs}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise M3NetInputError(f"--seeds must be a whole number of at least 1, got {seeds!r}")
    try:
        check_protocol(protocol)
    except ValueError as err:
        raise M3NetInputError(str(err)) from err
    cache = open_cache(data)
    cache_folds(cache)  # refuses a cache without folds
    if not any(row.get(f"label_{protocol}") is not None for row in cache.rows):
        raise M3NetInputError(f"{cache.path} has no {protocol} labels (column label_{protocol})")
    caches = [cache, *(open_cache(path) for path in extra_data)]
    for other in caches[1:]:
        _check_same_nodules(cache, other, protocol)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = (config or RunConfig()).replace(protocol=protocol)
    on_gpu = resolve_device(device).type == "cuda"
    table: list[dict] = []
    planned: list[tuple[int, NetworkRow, Path]] = []  # (place in the table, row, its cache) of the rows to train
    columns = set(cache.rows[0]) if cache.rows else set()
    reference = {
        name: {"name": name, "not_run": f"the cache has no column {', '.join(sorted(set(features) - columns))}"}
        for name, features in REFERENCE_MODELS.items()
        if not set(features) <= columns
    }
    runnable = [name for name in REFERENCE_MODELS if name in wanted and name not in reference]
    if runnable:
        reference |= {row["name"]: row for row in reference_rows(cache.rows, protocol, models=runnable)}
    for name in wanted:
        if name in REFERENCE_MODELS:
            table.append(_reference_row(reference[name]))
            continue
        row = next(r for r in NETWORK_ROWS if r.name == name)
        info = model_summary(Model.untrained(row.architecture, row.settings.get("model_config")))
        entry = {"name": name, "architecture": row.architecture, "parameters": info["parameters"],
                 "gflops": info["gflops"]}  # fmt: skip
        feeding, reason = _row_data(row, caches, info["gflops"], on_gpu)
        if reason:
            log(f"{name}: not run: {reason}")
            table.append(entry | {"not_run": reason})
            continue
        if feeding is not cache:
            entry["data"] = str(feeding.path)
        planned.append((len(table), row, feeding.path))
        table.append(entry)
    countdown = Countdown(len(planned))
    for done, (position, result) in enumerate(_cross_validate_rows(planned, out, base, device, jobs, seeds, log), 1):
        table[position] |= result | {"jobs": jobs}
        log(f"accuracy table: {table[position]['name']} finished; rows {countdown.text(done)}")
    identity = {"table_version": TABLE_VERSION, "protocol": protocol, "config": base.to_dict(),
                "cache_digest": cache_digest(cache)}  # fmt: skip
    table = _with_earlier_rows(out / "table.json", table, identity, log)
    _add_paired_differences(table, cache, protocol, out)
    document = {"data": str(cache.path), "semi_synthetic": cache.semi_synthetic, "kind": cache.info.get("kind"),
                **identity, "jobs": max((row.get("jobs", 1) for row in table), default=1), "rows": table}  # fmt: skip
    write_text_atomic(out / "table.json", json.dumps(document, indent=2) + "\n")
    write_text_atomic(out / "table.md", table_markdown(document))
    return table


def _cross_validate_rows(planned: list[tuple[int, NetworkRow, Path]], out: Path, base: RunConfig, device: str,
                         jobs: int, seeds: int, log: Callable[[str], None]) -> Iterator[tuple[int, dict]]:  # fmt: skip
    """``(place, result)`` of each planned row, as they finish."""
    if jobs == 1 or len(planned) <= 1:
        for position, row, data in planned:
            yield position, _cross_validate_row(data, row, out, base, log, device=device, seeds=seeds)
        return
    calls = [(place, _cross_validate_row, (data, row, out, base, functools.partial(tagged_print, row.name)),
              {"seeds": seeds}) for place, row, data in planned]  # fmt: skip
    with DevicePool([device] * min(jobs, len(planned))) as pool:
        yield from pool.run(calls)


def _cross_validate_row(data, row: NetworkRow, out: Path, base: RunConfig, log: Callable[[str], None], *,
                        device: str = "auto", seeds: int = 1) -> dict:  # fmt: skip
    """One network row: ``m3net cv`` into ``out/<row>``; its metrics and its folds' training time."""
    log(f"{row.name}: cross-validating {row.architecture}")
    summary = cross_validate(data, row.architecture, out / _slug(row.name), base.replace(**row.settings),
                             seeds=seeds, device=device, log=log)  # fmt: skip
    metrics = summary["metrics"]
    result = {key: metrics[key]["value"] for key in ("auc", "accuracy", "sensitivity", "specificity")}
    # the folds' own epoch times: a rerun that finds the folds done does not count as 0 s
    return result | {"auc_ci": metrics["auc"]["ci"], "accuracy_ci": metrics["accuracy"]["ci"],
                     "nodules": metrics["nodules"], "training_seconds": summary["training_seconds"],
                     "fold_auc": summary["fold_auc"], "fold_aucs": [f["auc"] for f in summary["per_fold"]],
                     "seeds": summary["seeds"], "single_seed_pooled_auc": summary["single_seed"]["pooled_auc"],
                     "pooled_auc_as_each_run_calibrated_itself": summary["pooled_auc_as_each_run_calibrated_itself"],
                     "pooling": summary["pooling"], "folder": _slug(row.name)}  # fmt: skip


def _add_paired_differences(table: list[dict], cache: Cache, protocol: str, out: Path) -> None:
    """Each row's paired AUC difference to the diameter-only row and to the best single-scale row, in place.

    On the same nodules: the reference rows' out-of-fold scores are fitted again (seconds;
    the diameter-only regression's whether or not its row is in the table), the network
    rows' are their cv folder's ``oof.csv``. The best single scale is the single-scale
    network row of highest pooled AUC in this table.
    """
    labels, patients, scores = {}, {}, {}
    column = f"label_{protocol}"
    for row in cache.rows:
        if row.get(column) is not None:
            labels[str(row["nodule_id"])], patients[str(row["nodule_id"])] = row[column], str(row["patient_id"])
    try:
        scores[DIAMETER_ROW] = reference_scores(cache.rows, protocol, DIAMETER_ROW)
    except M3NetInputError:  # a cache without diameters: no comparison to them
        pass
    for row in table:
        if "not_run" in row or "auc" not in row:
            continue
        folder = out / row.get("folder", _slug(row["name"]))
        if row["name"] in REFERENCE_MODELS:
            scores[row["name"]] = reference_scores(cache.rows, protocol, row["name"])
        elif (folder / "oof.csv").is_file():
            oof = read_rows_csv(folder / "oof.csv")
            scores[row["name"]] = {str(r["nodule_id"]): float(r.get("logit", r["probability"])) for r in oof}
    singles = [row for row in table if row["name"].startswith("single-") and row["name"] in scores]
    best_single = max(singles, key=lambda row: row["auc"])["name"] if singles else None
    for row in table:
        row.pop("versus_diameter", None)
        row.pop("versus_best_single_scale", None)
        for key, reference in (("versus_diameter", DIAMETER_ROW), ("versus_best_single_scale", best_single)):
            if reference is None or reference == row["name"] or row["name"] not in scores or reference not in scores:
                continue
            try:
                paired = paired_by_nodule(scores[row["name"]], scores[reference], labels, patients)
            except ValueError:  # one class among the shared nodules
                continue
            row[key] = paired | {"reference": reference}


def _with_earlier_rows(path: Path, table: list[dict], identity: dict, log: Callable[[str], None]) -> list[dict]:
    """``table`` with the rows of an earlier table in the same folder that this call did not make.

    Only a table of this format with the same protocol, settings and cache content
    (``identity``) is merged (``--rows X`` adds X to it); another one is replaced, and the
    log says so. Rows keep the order of :data:`ROW_NAMES`.
    """
    if not path.is_file():
        return table
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        same = all(earlier.get(key) == value for key, value in identity.items())
        rows = [row for row in earlier["rows"] if isinstance(row, dict) and row.get("name") in ROW_NAMES]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log(f"{path} is not a readable table: replacing it")
        return table
    if not same:
        log(f"{path} holds another protocol, other settings, another cache or an older format: replacing it")
        return table
    made = {row["name"] for row in table}
    merged = {row["name"]: row for row in rows if row["name"] not in made}
    merged |= {row["name"]: row for row in table}
    return [merged[name] for name in ROW_NAMES if name in merged]


def table_markdown(document: dict) -> str:
    """The rows as a markdown table, headed by what the data is, which protocol and how the folds were pooled."""
    kind = "SEMI-SYNTHETIC " if document["semi_synthetic"] else ""
    networks = [row for row in document["rows"] if row.get("seeds")]
    seeds = sorted({len(row["seeds"]) for row in networks})
    lines = [
        f"Accuracy benchmark, {kind}{document['kind']} cache `{document['data']}`, protocol {document['protocol']}, "
        "patient-level folds, pooled out-of-fold predictions, 95% CIs by patient bootstrap. Pooling of the "
        f"networks: {POOLING}; {ENSEMBLE}. Seeds per fold: {', '.join(map(str, seeds)) or 'none run'}. Per-fold "
        "AUC: mean +/- SD (min-max) over the folds. Single seed: each seed's own pooled AUC, mean +/- SD over the "
        "seeds. Paired differences: this row's pooled AUC minus the reference row's, on the same nodules, 95% CI "
        "from resampling patients; the best single scale is the single-scale row of highest pooled AUC. "
        "Networks call malignant at the threshold of best balanced accuracy on their validation split, the "
        "regressions at that of their training folds; the majority class calls every nodule the majority. "
        "Training: the folds' epochs (networks, every seed) or fits (regressions), summed over the folds."
        + (f" Network rows trained up to {document['jobs']} at a time on one device; training times are wall "
           "times under that sharing." if document.get("jobs", 1) > 1 else ""),
        "",
        "| row | pooled AUC (95% CI) | per-fold AUC | seeds | single seed: pooled AUC | vs diameter only "
        "(95% CI) | vs best single scale (95% CI) | accuracy (95% CI) | sensitivity | specificity | parameters | "
        "GFLOPs | training |",
        "| --- | --- | --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in document["rows"]:
        if "not_run" in row:
            cells = [f"not run: {row['not_run']}", "", "", "", "", "", "", "", ""]
        else:
            seeds_run = row.get("seeds")
            single = row.get("single_seed_pooled_auc")
            cells = [
                _with_ci(row["auc"], row["auc_ci"]),
                format_spread(row["fold_auc"]) if row.get("fold_auc") else "",
                str(len(seeds_run)) if seeds_run else "",
                format_spread(single, extent=False) if single and len(seeds_run) > 1 else "",
                _versus(row, "versus_diameter"),
                _versus(row, "versus_best_single_scale"),
                _with_ci(row["accuracy"], row["accuracy_ci"]),
                _number(row.get("sensitivity")),
                _number(row.get("specificity")),
            ]
        size = [f"{row['parameters']:,}" if "parameters" in row else "", _number(row.get("gflops"), 3)]
        seconds = row.get("training_seconds")
        time_cell = "" if seconds is None else f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
        lines.append("| " + " | ".join([row["name"], *cells, *size, time_cell]) + " |")
    best = next((row["versus_best_single_scale"]["reference"] for row in document["rows"]
                 if "versus_best_single_scale" in row), None)  # fmt: skip
    if best:
        lines += ["", f"Best single scale in this table: {best}."]
    return "\n".join(lines) + "\n"


def _versus(row: dict, key: str) -> str:
    paired = row.get(key)
    if paired is None:
        return ""
    return format_difference(paired) + (" *" if paired["excludes_zero"] else "")


def _row_data(row: NetworkRow, caches: Sequence[Cache], gflops: float, on_gpu: bool) -> tuple[Cache | None, str | None]:
    """The first cache that holds the cubes the row's model needs, or why the row cannot run."""
    if gflops > GPU_ONLY_GFLOPS and not on_gpu:
        return None, f"needs GPU ({gflops:.1f} GFLOPs per nodule forward)"
    import torch

    preprocessing = Model.untrained(row.architecture).preprocessing
    problems = []
    for cache in caches:
        try:
            ViewSource(cache, preprocessing, RunConfig(), torch.device("cpu"))
            return cache, None
        except M3NetInputError as err:
            problems.append(str(err))
    hint = "" if len(caches) > 1 else f"; build one with `m3net lidc phantom|prepare --model {row.architecture}`"
    return None, f"no cache holds the cubes it needs ({'; '.join(problems)}){hint}"


def _check_same_nodules(cache: Cache, other: Cache, protocol: str) -> None:
    """Refuse an extra cache whose nodules, patients, folds or labels differ: its rows would not compare."""
    columns = ("nodule_id", "patient_id", "fold", f"label_{protocol}")

    def key(rows: list[dict]) -> list[tuple]:
        return sorted(tuple(str(row.get(c)) for c in columns) for row in rows)

    if key(cache.rows) != key(other.rows):
        raise M3NetInputError(
            f"{other.path} does not hold the same nodules, patients, folds and {protocol} labels as {cache.path}"
        )


def _reference_row(row: dict) -> dict:
    if "not_run" in row:
        return row
    kept = ("name", "auc", "auc_ci", "accuracy", "accuracy_ci", "sensitivity", "specificity", "nodules", "parameters",
            "gflops", "training_seconds", "fold_aucs")  # fmt: skip
    return {key: row[key] for key in kept} | {"fold_auc": spread(row["fold_aucs"])}


def _with_ci(value: float, ci: Sequence[float]) -> str:
    return f"{value:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if math.isfinite(value) else "n/a"


def _number(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")
