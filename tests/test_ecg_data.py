"""PTB-XL loader on a tiny PTB-XL-shaped directory written with wfdb.wrsamp + the two CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

wfdb = pytest.importorskip("wfdb")
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword:Warning")

from tasks.ecg.data import (  # noqa: E402
    BENCHMARK_LABELS,
    PAPER_LABELS,
    PTBXLError,
    load_ptbxl,
    sample_ft_split,
)

LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]
# ecg_id -> (scp_codes, strat_fold)
RECORDS = {
    1: ("{'NORM': 100.0, 'SR': 0.0}", 1),
    2: ("{'IMI': 50.0, 'NDT': 100.0}", 2),  # MI + STTC
    3: ("{'SR': 0.0}", 3),  # no diagnostic code: all-zero row (paper) / dropped (benchmark)
    4: ("{'CLBBB': 100.0, 'LVH': 0.0}", 9),  # CD + HYP (likelihood 0 still counts)
    5: ("{'NORM': 80.0}", 10),
    6: ("{'NDT': 100.0}", 8),
}
STATEMENTS = [  # code, diagnostic, diagnostic_class
    ("NORM", 1.0, "NORM"), ("IMI", 1.0, "MI"), ("NDT", 1.0, "STTC"),
    ("CLBBB", 1.0, "CD"), ("LVH", 1.0, "HYP"), ("SR", None, None),
]


def _write_ptbxl(root: Path, records=RECORDS, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, signals = [], {}
    for ecg_id, (codes, fold) in records.items():
        rel = f"records100/00000/{ecg_id:05d}_lr"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sig = np.round(rng.normal(0, 0.5, size=(1000, 12)), 3) + 0.1 * ecg_id
        wfdb.wrsamp(Path(rel).name, fs=100, units=["mV"] * 12, sig_name=LEADS, p_signal=sig,
                    fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12,
                    write_dir=str((root / rel).parent))
        signals[ecg_id] = sig
        rows.append({"ecg_id": ecg_id, "patient_id": 100 + ecg_id, "scp_codes": codes,
                     "strat_fold": fold, "filename_lr": rel,
                     "filename_hr": f"records500/00000/{ecg_id:05d}_hr"})
    pd.DataFrame(rows).to_csv(root / "ptbxl_database.csv", index=False)
    st = pd.DataFrame(STATEMENTS, columns=["scp", "diagnostic", "diagnostic_class"])
    st.to_csv(root / "scp_statements.csv", index=False)
    return signals


@pytest.fixture()
def ptbxl_dir(tmp_path: Path) -> tuple[Path, dict[int, np.ndarray]]:
    return tmp_path, _write_ptbxl(tmp_path)


def test_paper_convention(ptbxl_dir):
    root, signals = ptbxl_dir
    d = load_ptbxl(root, "paper")
    assert d.label_names == PAPER_LABELS == ("NORM", "MI", "STTC", "CD", "HYP")
    assert d.x.shape == (6, 12, 1024) and d.x.dtype == np.float32
    assert np.all(d.x[:, :, 1000:] == 0)  # zero-padded to 1024
    assert list(d.ecg_id) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(d.y[0], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(d.y[1], [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(d.y[2], [0, 0, 0, 0, 0])  # kept as an all-zero row
    np.testing.assert_array_equal(d.y[3], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(d.splits["pool"], [0, 1, 2, 3, 5])  # folds 1-9
    np.testing.assert_array_equal(d.splits["test"], [4])
    # one scalar mean/std fitted on the pool; signals read back through wfdb
    raw = np.stack([signals[i].T for i in (1, 2, 3, 4, 6)])
    assert d.mean == pytest.approx(raw.mean(), abs=1e-4)
    assert d.std == pytest.approx(raw.std(), rel=1e-4)
    np.testing.assert_allclose(d.x[0, :, :1000], (signals[1].T - d.mean) / d.std, atol=1e-4)
    pool = d.x[d.splits["pool"], :, :1000]
    assert abs(pool.mean()) < 1e-5 and pool.std() == pytest.approx(1.0, rel=1e-4)


def test_benchmark_convention(ptbxl_dir):
    root, _ = ptbxl_dir
    d = load_ptbxl(root, "benchmark")
    assert d.label_names == BENCHMARK_LABELS == ("CD", "HYP", "MI", "NORM", "STTC")
    assert d.x.shape == (5, 12, 1000)
    assert list(d.ecg_id) == [1, 2, 4, 5, 6]  # record 3 (no superclass) dropped
    np.testing.assert_array_equal(d.y[1], [0, 0, 1, 0, 1])
    np.testing.assert_array_equal(d.y[2], [1, 1, 0, 0, 0])
    np.testing.assert_array_equal(d.fold[d.splits["train"]], [1, 2, 8])
    np.testing.assert_array_equal(d.fold[d.splits["val"]], [9])
    np.testing.assert_array_equal(d.fold[d.splits["test"]], [10])
    assert abs(d.x[d.splits["train"]].mean()) < 1e-5


def test_cache_roundtrip(ptbxl_dir, tmp_path):
    root, _ = ptbxl_dir
    cache = tmp_path / "cache" / "x.npz"
    a = load_ptbxl(root, cache=cache)
    assert cache.exists()
    b = load_ptbxl(root, cache=cache)
    np.testing.assert_array_equal(a.x, b.x)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(PTBXLError, match="directory not found"):
        load_ptbxl(tmp_path / "nope")
    _write_ptbxl(tmp_path)
    (tmp_path / "scp_statements.csv").unlink()
    with pytest.raises(PTBXLError, match="scp_statements.csv"):
        load_ptbxl(tmp_path)
    _write_ptbxl(tmp_path)
    (tmp_path / "records100/00000/00004_lr.hea").unlink()
    with pytest.raises(PTBXLError, match="ecg_id 4 not found.*00004_lr"):
        load_ptbxl(tmp_path)


@pytest.mark.parametrize(
    "codes, match",
    [("{'NORM': 100.0", "malformed scp_codes for ecg_id 2"),
     ("['NORM']", "ecg_id 2 must be a dict"),
     ("{'NORM': 'high'}", "ecg_id 2 must be a dict")],
)
def test_malformed_codes_name_the_row(tmp_path, codes, match):
    recs = dict(RECORDS)
    recs[2] = (codes, 2)
    _write_ptbxl(tmp_path, recs)
    with pytest.raises(PTBXLError, match=match):
        load_ptbxl(tmp_path)


def test_bad_columns_and_folds(tmp_path):
    _write_ptbxl(tmp_path)
    db = pd.read_csv(tmp_path / "ptbxl_database.csv")
    db.loc[0, "strat_fold"] = 11
    db.to_csv(tmp_path / "ptbxl_database.csv", index=False)
    with pytest.raises(PTBXLError, match=r"strat_fold must be 1..10.*\[1\]"):
        load_ptbxl(tmp_path)
    db.drop(columns=["filename_lr"]).to_csv(tmp_path / "ptbxl_database.csv", index=False)
    with pytest.raises(PTBXLError, match="missing column.*filename_lr"):
        load_ptbxl(tmp_path)
    with pytest.raises(ValueError, match="`labels`"):
        load_ptbxl(tmp_path, labels="superdiagnostic")


def test_wrong_sampling_rate_is_reported(tmp_path):
    _write_ptbxl(tmp_path)
    wfdb.wrsamp("00001_lr", fs=500, units=["mV"] * 12, sig_name=LEADS,
                p_signal=np.zeros((1000, 12)), fmt=["16"] * 12, adc_gain=[1000.0] * 12,
                baseline=[0] * 12, write_dir=str(tmp_path / "records100/00000"))
    with pytest.raises(PTBXLError, match="must be 100 Hz.*fs=500"):
        load_ptbxl(tmp_path)


def test_ft_split_sizes():
    pool = np.arange(1000, 2000)
    tr, va = sample_ft_split(pool, 100, seed=0)
    assert len(tr) == 80 and len(va) == 20 and not set(tr) & set(va)
    assert set(tr) <= set(pool)
    tr2, _ = sample_ft_split(pool, 100, seed=0)
    np.testing.assert_array_equal(tr, tr2)
    assert [len(a) for a in sample_ft_split(pool, 25, 1)] == [15, 10]
    with pytest.raises(ValueError, match="`n`"):
        sample_ft_split(pool, 5000, 0)
