#!/bin/bash
# The ECG validation of tasks/ecg/RESULTS.md (issue-20 protocol): run seeds 0..SEEDS-1, each on
# its own synthetic data (--vary-data), one seed per process into one resumable --out; then the
# table command, which reuses every finished run, measures the time ratio and writes the JSON
# RESULTS.md renders. Running the table command alone computes the same (one long process).
# 1 torch thread at nice 10.
cd "$(dirname "$0")/.."
export PYTHONPATH=. OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${OUT:-runs/ecg_v}
SEEDS=${SEEDS:-10}
ARGS="--method no_pt,simclr_nowarp,simclr,simclr_oracle,meta_simclr --n-ft 100,250,500 --vary-data"
mkdir -p $OUT
for k in $(seq 0 $((SEEDS - 1))); do
  nice -n 10 python -m tasks ecg $ARGS --seeds $k-$k --out $OUT --no-progress > $OUT.s$k.log 2>&1
done
nice -n 10 python -m tasks ecg $ARGS --seeds 0-$((SEEDS - 1)) --time-ratio 5 --out $OUT \
    --export tasks/ecg/results/validation.json
