"""Paired AUC difference of two ``m3net cv`` folders on the same nodules, with a patient-bootstrap 95% CI.

Each folder's ``oof.csv`` (recalibrated, pooled out-of-fold logits) is read; the
difference is AUC(A) - AUC(B) on the nodules both hold, resampling whole patients.

Run: ``.venv/bin/python benchmarks/compare_cv.py CV_A CV_B``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from m3netcore.data.manifest import read_rows_csv
from m3netcore.evaluation.comparison import paired_by_nodule
from m3netcore.evaluation.cv import format_difference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="cv folder A")
    parser.add_argument("b", type=Path, help="cv folder B (the reference)")
    args = parser.parse_args(argv)
    scores, labels, patients = [], {}, {}
    for folder in (args.a, args.b):
        if not (folder / "oof.csv").is_file():
            parser.exit(2, f"compare_cv: {folder} holds no oof.csv (run m3net cv first)\n")
        rows = read_rows_csv(folder / "oof.csv")
        scores.append({str(r["nodule_id"]): float(r["logit"]) for r in rows})
        labels |= {str(r["nodule_id"]): int(r["label"]) for r in rows}
        patients |= {str(r["nodule_id"]): str(r["patient_id"]) for r in rows}
    paired = paired_by_nodule(scores[0], scores[1], labels, patients)
    print(f"AUC({args.a.name}) - AUC({args.b.name}) on {paired['nodules']} shared nodules: "
          f"{format_difference(paired)} (95% CI, patient bootstrap); "
          f"{'excludes' if paired['excludes_zero'] else 'includes'} 0")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
