"""ECG reproduction of Raghu et al. 2021 (Section 6): SimCLR with meta-learned per-example
warp strength. ``data`` (PTB-XL loader), ``synthetic`` (stand-in with ground truth),
``augment`` (crop, jitter, diffeomorphic warp), ``methods`` (No PT, SimCLR, Meta SimCLR),
``cli`` (``python -m tasks ecg``), ``plots``. Results: ``RESULTS.md``."""
