#!/bin/bash
# Synthetic validation of the ECG reproduction (tasks/ecg/RESULTS.md, round 2): two resumable processes
# sharing one output directory, with disjoint job lists; then the interleaved time ratio and
# the table. Each process runs on 1 torch thread at nice 10.
cd "$(dirname "$0")/.."
export PYTHONPATH=. OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${OUT:-runs/ecg_val2}
SEEDS=${SEEDS:-5}
mkdir -p $OUT
COMMON="--synthetic --config default --seeds $SEEDS --out $OUT --no-progress"
( nice -n 10 python -m tasks ecg --method no_pt,simclr_nowarp,simclr --n-ft 100,250,500 $COMMON > $OUT.p1.log 2>&1
  nice -n 10 python -m tasks ecg --method meta_simclr --n-ft 100 $COMMON >> $OUT.p1.log 2>&1
  nice -n 10 python -m studies.ecg_ratio_variants --out $OUT/ratio > $OUT.ratio.log 2>&1 ) &
( nice -n 10 python -m tasks ecg --method meta_simclr --n-ft 250,500 $COMMON > $OUT.p2.log 2>&1 ) &
wait
nice -n 10 python -m tasks ecg --method no_pt,simclr_nowarp,simclr,meta_simclr --n-ft 100,250,500 $COMMON --summary-only
