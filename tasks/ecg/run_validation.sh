#!/bin/bash
# Synthetic validation of the ECG reproduction (two resumable processes sharing runs/ecg_val).
cd "$(dirname "$0")/../.."
export PYTHONPATH=.
OUT=runs/ecg_val
COMMON="--synthetic --config default --seeds 3 --out $OUT --no-progress"
( nice -n 10 python -m tasks ecg --method no_pt,simclr_nowarp,simclr --n-ft 100,250,500 $COMMON > $OUT.p1.log 2>&1 ) &
( nice -n 10 python -m tasks ecg --method meta_simclr --n-ft 100,250,500 $COMMON > $OUT.p2.log 2>&1
  nice -n 10 python -m tasks ecg --method meta_simclr_partial --n-ft 500 $COMMON > $OUT.p3.log 2>&1 ) &
wait
nice -n 10 python -m tasks ecg --method meta_simclr --n-ft 100 --synthetic --config default --seeds 1 --out $OUT --no-progress --time-ratio 10 > $OUT.p4.log 2>&1
nice -n 10 python -m tasks ecg --method no_pt,simclr_nowarp,simclr,meta_simclr,meta_simclr_partial --n-ft 100,250,500 $COMMON --summary-only
