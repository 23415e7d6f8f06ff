"""PTB-XL loader (Wagner et al. 2020) for the 100 Hz records, in two label conventions.

Directory layout (as distributed on PhysioNet)::

    DIR/ptbxl_database.csv    index ecg_id; scp_codes = "{'NORM': 100.0, ...}"; strat_fold 1..10;
                              filename_lr = records100/00000/00001_lr
    DIR/scp_statements.csv    first column = SCP code; diagnostic (1.0 or empty); diagnostic_class
    DIR/records100/...        WFDB records, 1000 samples x 12 leads at 100 Hz

``labels="paper"`` (the authors' simclr code): label order NORM, MI, STTC, CD, HYP; records
without any diagnostic code kept as all-zero rows; pre-training pool = folds 1-9, test = fold 10,
D_FT (train/val, 80/20 when |D_FT| >= 50) drawn from the pool; one scalar mean/std over the
pool's signals; signals zero-padded from 1000 to 1024 samples.

``labels="benchmark"`` (the PTB-XL benchmark): label order CD, HYP, MI, NORM, STTC
(MultiLabelBinarizer's sorted classes); records without a superclass dropped; train = folds
1-8, val = fold 9, test = fold 10; scalar mean/std fitted on train; 1000 samples.

In both, every diagnostic code listed in ``scp_codes`` counts, whatever its likelihood.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "PAPER_LABELS",
    "BENCHMARK_LABELS",
    "PTBXLError",
    "ECGData",
    "read_tables",
    "aggregate_superclasses",
    "load_ptbxl",
    "sample_ft_split",
]

PAPER_LABELS = ("NORM", "MI", "STTC", "CD", "HYP")
BENCHMARK_LABELS = ("CD", "HYP", "MI", "NORM", "STTC")
_DB, _SCP = "ptbxl_database.csv", "scp_statements.csv"
_DB_COLUMNS = ("scp_codes", "strat_fold", "filename_lr")


class PTBXLError(ValueError):
    """The PTB-XL directory is missing a file or holds malformed content."""


@dataclass
class ECGData:
    """Standardised signals ``x`` (N, 12, L) float32, labels ``y`` (N, 5), ``fold`` (N,) and
    ``ecg_id`` (N,); ``splits`` maps split names to index arrays into these; ``mean``/``std``
    are the scalar standardisation constants fitted on the training signals."""

    x: np.ndarray
    y: np.ndarray
    fold: np.ndarray
    ecg_id: np.ndarray
    label_names: tuple[str, ...]
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    mean: float = 0.0
    std: float = 1.0
    convention: str = "paper"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise PTBXLError(f"PTB-XL {what} not found: {path} (download PTB-XL 1.0.x from PhysioNet)")
    return path


def _parse_codes(text: object, ecg_id: object) -> dict[str, float]:
    try:
        codes = ast.literal_eval(text) if isinstance(text, str) else None
    except (ValueError, SyntaxError) as e:
        raise PTBXLError(
            f"{_DB}: malformed scp_codes for ecg_id {ecg_id}: {text!r} ({type(e).__name__})"
        ) from None
    if not isinstance(codes, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) for k, v in codes.items()
    ):
        raise PTBXLError(
            f"{_DB}: scp_codes for ecg_id {ecg_id} must be a dict of code -> likelihood, "
            f"got {text!r}"
        )
    return codes


def read_tables(data_dir: str | Path):
    """Read and validate ``ptbxl_database.csv`` (scp_codes parsed to dicts) and the diagnostic
    rows of ``scp_statements.csv``; returns ``(database, statements)`` DataFrames."""
    import pandas as pd

    d = Path(data_dir)
    if not d.is_dir():
        raise PTBXLError(f"PTB-XL directory not found: {d}")
    db_path, scp_path = _require(d / _DB, "database table"), _require(d / _SCP, "statement table")
    db = pd.read_csv(db_path, index_col="ecg_id") if "ecg_id" in _header(db_path) else None
    if db is None:
        raise PTBXLError(f"{db_path}: no 'ecg_id' column")
    missing = [c for c in _DB_COLUMNS if c not in db.columns]
    if missing:
        raise PTBXLError(f"{db_path}: missing column(s) {missing}")
    db["scp_codes"] = [_parse_codes(t, i) for i, t in zip(db.index, db["scp_codes"])]
    folds = pd.to_numeric(db["strat_fold"], errors="coerce")
    bad = db.index[~folds.isin(range(1, 11))]
    if len(bad):
        raise PTBXLError(f"{db_path}: strat_fold must be 1..10; bad for ecg_id {list(bad[:5])}")
    db["strat_fold"] = folds.astype(int)
    scp = pd.read_csv(scp_path, index_col=0)
    for c in ("diagnostic", "diagnostic_class"):
        if c not in scp.columns:
            raise PTBXLError(f"{scp_path}: missing column {c!r}")
    scp = scp[scp["diagnostic"] == 1]
    unknown = set(scp["diagnostic_class"].dropna()) - set(PAPER_LABELS)
    if unknown:
        raise PTBXLError(f"{scp_path}: unknown diagnostic_class value(s) {sorted(unknown)}")
    return db, scp


def _header(path: Path) -> list[str]:
    with open(path) as f:
        return [c.strip().strip('"') for c in f.readline().split(",")]


def aggregate_superclasses(
    codes: dict[str, float], statements, order: tuple[str, ...]
) -> np.ndarray:
    """Multi-hot superclass vector (in ``order``) of one record's ``scp_codes``."""
    y = np.zeros(len(order), dtype=np.float32)
    for code in codes:
        if code in statements.index:
            cls = statements.at[code, "diagnostic_class"]
            if isinstance(cls, str):
                y[order.index(cls)] = 1.0
    return y


def _read_record(data_dir: Path, rel: str, ecg_id: object) -> np.ndarray:
    import wfdb

    base = data_dir / rel
    if not base.with_suffix(".hea").exists():
        raise PTBXLError(f"record for ecg_id {ecg_id} not found: {base}.hea")
    sig, meta = wfdb.rdsamp(str(base))
    if meta["fs"] != 100 or sig.shape != (1000, 12):
        raise PTBXLError(
            f"record {base} (ecg_id {ecg_id}) must be 100 Hz, 1000 x 12; got fs={meta['fs']}, "
            f"shape {sig.shape}"
        )
    if not np.isfinite(sig).all():
        raise PTBXLError(f"record {base} (ecg_id {ecg_id}) holds non-finite samples")
    return sig.T.astype(np.float32)  # (12, 1000)


def load_ptbxl(
    data_dir: str | Path, labels: str = "paper", *, cache: str | Path | None = None,
    max_records: int | None = None,
) -> ECGData:
    """Load PTB-XL at 100 Hz in the ``labels`` convention (``"paper"`` or ``"benchmark"``).

    ``cache``: an ``.npz`` path holding the raw signals after the first load (reading the
    21,837 records with wfdb takes minutes). ``max_records`` keeps the first records (debugging).
    """
    if labels not in ("paper", "benchmark"):
        raise ValueError(f"`labels` must be 'paper' or 'benchmark', got {labels!r}")
    d = Path(data_dir)
    db, scp = read_tables(d)
    if max_records is not None:
        db = db.iloc[: int(max_records)]
    order = PAPER_LABELS if labels == "paper" else BENCHMARK_LABELS
    if len(db) == 0:
        raise PTBXLError(f"{d / _DB}: no records")
    y = np.stack([aggregate_superclasses(c, scp, order) for c in db["scp_codes"]])
    ids = db.index.to_numpy()
    x = None
    if cache is not None and Path(cache).exists():
        z = np.load(cache)
        if np.array_equal(z["ecg_id"], ids):
            x = z["x"]
    if x is None:
        x = np.stack([_read_record(d, f, i) for i, f in zip(ids, db["filename_lr"])])
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, x=x, ecg_id=ids)
    fold = db["strat_fold"].to_numpy()
    if labels == "benchmark":
        keep = y.sum(1) > 0
        x, y, fold, ids = x[keep], y[keep], fold[keep], ids[keep]
        splits = {"train": np.flatnonzero(fold <= 8), "val": np.flatnonzero(fold == 9),
                  "test": np.flatnonzero(fold == 10)}
        fit = splits["train"]
    else:
        splits = {"pool": np.flatnonzero(fold <= 9), "test": np.flatnonzero(fold == 10)}
        fit = splits["pool"]
    if len(fit) == 0:
        folds = "1-8" if labels == "benchmark" else "1-9"
        raise PTBXLError(f"{d / _DB}: no training records (folds {folds})")
    mean = float(x[fit].mean(dtype=np.float64))
    std = float(x[fit].std(dtype=np.float64))
    x = ((x - mean) / max(std, 1e-8)).astype(np.float32)
    if labels == "paper":
        x = np.pad(x, ((0, 0), (0, 0), (0, 1024 - x.shape[-1])))
    return ECGData(x, y.astype(np.float32), fold, ids, order, splits, mean, std, labels)


def sample_ft_split(pool: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """D_FT of ``n`` examples from ``pool`` indices, split train/val as the authors do:
    80/20 for ``n >= 50``; 15/10 for 25; 5/5 for 10."""
    n = int(n)
    if n < 10 or n > len(pool):
        raise ValueError(f"`n` must be in [10, {len(pool)}] (the pool size), got {n}")
    if n >= 50:
        n_tr = int(0.8 * n)
    elif n >= 25:
        n_tr = n - 10
    else:
        n_tr = n // 2
    idx = np.random.RandomState(seed).permutation(len(pool))
    return pool[idx[:n_tr]], pool[idx[n_tr:n]]
