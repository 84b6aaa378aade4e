"""Out-of-fold predictions of an ``m3net cv`` split by a column of the cache's manifest.

For each value of the column (e.g. ``phantom_calcification``: 1 popcorn, 2 laminated,
3 solid, 4 non-central, 5 central, 6 absent): nodules, how many are malignant, the
median and mean calibrated probability, and how many each fold's model called malignant at
its own threshold. A subgroup where a benign pattern is called malignant shows what the
model has not learnt.

Run: ``python benchmarks/subgroups.py --cv CV --data CACHE [--column NAME]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from m3netcore.data.cache import open_cache
from m3netcore.data.manifest import read_rows_csv
from m3netcore.errors import M3NetInputError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", required=True, help="an m3net cv folder (its oof.csv)")
    parser.add_argument("--data", required=True, help="the cache it was run on")
    parser.add_argument("--column", default="phantom_calcification", help="manifest column to split by")
    args = parser.parse_args()
    try:
        print(subgroup_table(Path(args.cv), args.data, args.column))
    except M3NetInputError as err:
        print(f"subgroups: error: {err}", file=sys.stderr)
        return 2
    return 0


def subgroup_table(cv: Path, data: str, column: str) -> str:
    if not (cv / "oof.csv").is_file():
        raise M3NetInputError(f"{cv} holds no oof.csv (not a finished m3net cv)")
    predictions = {row["nodule_id"]: row for row in read_rows_csv(cv / "oof.csv")}
    cache = open_cache(data)
    if column not in cache.rows[0]:
        raise M3NetInputError(f"{cache.path}'s manifest has no column {column!r}")
    groups: dict[object, list[dict]] = defaultdict(list)
    for row in cache.rows:
        if row["nodule_id"] in predictions:
            groups[row[column]].append(predictions[row["nodule_id"]])
    if not groups:
        raise M3NetInputError(f"no nodule of {cv / 'oof.csv'} is in {cache.path}")
    lines = [f"{column:<24} {'nodules':>8} {'malignant':>10} {'median p':>9} {'mean p':>7} {'called malignant':>17}"]
    for value in sorted(groups, key=lambda v: (v is None, str(v))):
        rows = groups[value]
        p = [row["probability"] for row in rows]
        lines.append(f"{str(value):<24} {len(rows):>8} {sum(row['label'] for row in rows):>10} "
                     f"{statistics.median(p):>9.3f} {statistics.fmean(p):>7.3f} "
                     f"{sum(row['called'] for row in rows):>17}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
