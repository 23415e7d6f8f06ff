"""Synthetic 12-lead, 100 Hz, 10 s ECGs with known ground truth (a stand-in for PTB-XL).

A small parametric beat model: every wave (P, Q, R, S, T) is a Gaussian bump in time whose
12-lead amplitudes are the projections of a 3-D heart vector onto the lead directions; an ST
deviation is a plateau between the J point and the T wave along its own vector. Five binary
labels are thresholds on controllable features:

    timing      TACHY     heart rate > 100 bpm
                LONG_PR   PR interval > 205 ms
                WIDE_QRS  QRS duration > 115 ms
    morphology  ST_DEV    ST elevation/depression of 0.04-0.15 mV along an anterior, inferior
                          or lateral vector (else 0)
                T_INV     T vector reversed and scaled by 0.15-0.6 (else upright, x 0.3-1.2)

Every record belongs to one ground-truth group:

    normal      timing features well inside their normal ranges (HR 55-88 bpm, PR 120-180 ms,
                QRS 70-100 ms), no morphology abnormality: all labels 0
    timing      at least one timing feature in a band straddling its threshold (HR 88-115,
                PR 175-235, QRS 95-135), morphology normal: these labels depend on timing,
                a warp of a few per cent flips them (positives and borderline negatives)
    morphology  timing normal, at least one of ST_DEV / T_INV

Nuisances (the "version 3" generator of tasks/ecg/RESULTS.md; versions 1, 2, 4 and 5 were
removed in issue 15 and are reproduced at commit 6f588f0): a per-record beat-to-beat RR
irregularity (coefficient of variation drawn from 0-20%), per-beat jitter of the PR interval
(8%), QRS width (6%) and QT interval (8%) around the record's values, a per-record QT factor
(0.85-1.15), axis +-10 deg, gain 0.9-1.1, wave amplitudes +-5%, baseline wander 0.02-0.06 mV;
morphology: ST 0.04-0.15 mV, inverted T x 0.15-0.6, upright T x 0.3-1.2.

The labels are thresholds on the record's values (the per-beat means), so the per-beat jitter
changes no label. It is the kind of variation a temporal warp produces, so warp invariance is
meant to help the morphology labels, for which all timing is nuisance, while a strong warp
still flips the borderline timing labels.

A temporal warp stretches QRS complexes, PR and RR intervals: it can flip the labels of the
timing group only, and leaves ST level and T polarity alone. Other nuisances: electrical axis,
amplitudes, rate within its class, baseline wander and white noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LABELS", "TIMING_LABELS", "GROUPS", "SyntheticECG",
           "make_synthetic_ecg", "timing_morphology"]

LABELS = ("TACHY", "LONG_PR", "WIDE_QRS", "ST_DEV", "T_INV")
TIMING_LABELS = (0, 1, 2)
GROUPS = ("normal", "timing", "morphology")
FS = 100
LEAD_NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def timing_morphology(per_label) -> dict[str, float]:
    """Mean of per-label AUROCs (NaN skipped) over the timing labels and over the others."""
    per = np.asarray(per_label, dtype=float)
    morph = [j for j in range(len(per)) if j not in TIMING_LABELS]
    return {"timing": float(np.nanmean(per[list(TIMING_LABELS)])),
            "morphology": float(np.nanmean(per[morph]))}


def _lead_vectors() -> np.ndarray:
    """(12, 3) unit directions; axes x = patient's left, y = inferior, z = anterior."""
    frontal = np.deg2rad([0, 60, 120, -150, -30, 90])
    limb = np.stack([np.cos(frontal), np.sin(frontal), np.zeros(6)], 1)
    horiz = np.deg2rad([120, 95, 75, 60, 30, 0])
    prec = np.stack([np.cos(horiz), 0.15 * np.ones(6), np.sin(horiz)], 1)
    v = np.concatenate([limb, prec])
    return v / np.linalg.norm(v, axis=1, keepdims=True)


_LEADS = _lead_vectors()
# mean wave vectors (mV): P, Q, R, S, T
_WAVES = {
    "P": np.array([0.10, 0.12, 0.02]),
    "Q": np.array([-0.08, -0.02, 0.10]),
    "R": np.array([0.90, 0.75, -0.45]),
    "S": np.array([-0.20, -0.25, 0.35]),
    "T": np.array([0.25, 0.25, 0.10]),
}
_ST_DIRS = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # ant., inf., lat.


@dataclass
class SyntheticECG:
    """``x`` (N, 12, L) float32 in mV, ``y`` (N, 5) float32, ``group`` (N,) int indexing GROUPS,
    ``features`` dict of (N,) arrays: hr (bpm), pr, qrs (ms), st (mV), t_sign."""

    x: np.ndarray
    y: np.ndarray
    group: np.ndarray
    features: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx: np.ndarray) -> SyntheticECG:
        return SyntheticECG(self.x[idx], self.y[idx], self.group[idx],
                            {k: v[idx] for k, v in self.features.items()})


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * z))


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    cx, cy, cz = np.cos(a)
    sx, sy, sz = np.sin(a)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# timing features: (normal range, borderline band straddling the threshold, threshold)
TIMING = {"hr": ((55.0, 88.0), (88.0, 115.0), 100.0),  # bpm
          "pr": ((120.0, 180.0), (175.0, 235.0), 205.0),  # ms
          "qrs": ((70.0, 100.0), (95.0, 135.0), 115.0)}  # ms


_ST, _T_INV, _T_UP = (0.04, 0.15), (0.15, 0.6), (0.3, 1.2)  # mV, scale, scale
_RR_CV_MAX, _JITTER_PR, _JITTER_QRS, _JITTER_QT, _QT_FACTOR = 0.20, 0.08, 0.06, 0.08, (0.85, 1.15)
_AXIS_DEG, _GAIN, _AMP_JITTER, _WANDER = 10.0, (0.9, 1.1), 0.05, (0.02, 0.06)


def _sample_features(rng: np.random.Generator, group: int) -> dict[str, float]:
    """Features of one record of ``group`` (0 normal, 1 timing, 2 morphology)."""
    st_r, inv_r, up_r = _ST, _T_INV, _T_UP
    f = {k: rng.uniform(*normal) for k, (normal, _, _) in TIMING.items()}
    f["st"], f["t_sign"] = 0.0, rng.uniform(*up_r)
    if group == 1:  # at least one timing feature in its borderline band
        pick = np.zeros(3, bool)
        while not pick.any():
            pick = rng.random(3) < 0.6
        for k, p in zip(TIMING, pick):
            if p:
                f[k] = rng.uniform(*TIMING[k][1])
    elif group == 2:  # at least one morphology abnormality
        pick = np.zeros(2, bool)
        while not pick.any():
            pick = rng.random(2) < 0.6
        if pick[0]:
            f["st"] = rng.uniform(*st_r) * rng.choice([-1.0, 1.0])
        if pick[1]:
            f["t_sign"] = -rng.uniform(*inv_r)
    return f


def labels_of(f: dict[str, float]) -> np.ndarray:
    """The 5 labels are thresholds on the features (ground truth)."""
    return np.array([f["hr"] > TIMING["hr"][2], f["pr"] > TIMING["pr"][2],
                     f["qrs"] > TIMING["qrs"][2], f["st"] != 0.0, f["t_sign"] < 0], dtype=float)


def _one_record(rng: np.random.Generator, f: dict[str, float], length: int) -> np.ndarray:
    t = np.arange(length) / FS  # seconds
    hr, pr, qrs, st, t_sign = f["hr"], f["pr"] / 1000, f["qrs"] / 1000, f["st"], f["t_sign"]
    j_pr, j_qrs, j_qt = _JITTER_PR, _JITTER_QRS, _JITTER_QT
    rr = 60.0 / hr
    # beat times with heart-rate variability (a per-record 0-20%), covering the window with
    # margins; the record's rate is the label's rate on average
    cv = rng.uniform(0.0, _RR_CV_MAX)
    n_beats = int(np.ceil((length / FS + 2.0) / rr)) + 2
    rrs = rr * np.clip(1 + cv * rng.standard_normal(n_beats), 0.6, 1.4)
    r_times = -1.0 + rng.uniform(0, rr) + np.concatenate([[0.0], np.cumsum(rrs[:-1])])
    max_deg, gain_r, amp_j, bw_r = _AXIS_DEG, _GAIN, _AMP_JITTER, _WANDER
    rot = _rotation(rng, max_deg)
    gain = rng.uniform(*gain_r)
    vec = {k: gain * rot @ (v * rng.uniform(1 - amp_j, 1 + amp_j)) for k, v in _WAVES.items()}
    vec["T"] = vec["T"] * t_sign
    st_vec = gain * st * _ST_DIRS[rng.integers(3)]
    qt = 0.40 * np.sqrt(rr) * rng.uniform(*_QT_FACTOR)  # Bazett, times a per-record factor
    d = t[None, :] - r_times[:, None]  # (beats, time): time since each R peak
    # per-beat intervals (jittered around the record's values), shape (beats, 1)
    nb = len(r_times)

    def per_beat(v: float, jit: float) -> np.ndarray:
        return (v * (1 + jit * rng.standard_normal(nb)) if jit else np.full(nb, v))[:, None]

    pr_b, qrs_b, qt_b = per_beat(pr, j_pr), per_beat(qrs, j_qrs), per_beat(qt, j_qt)
    # waves: (centre relative to R, std) in seconds
    onset = -qrs_b / 2
    waves = {
        "P": (onset - pr_b + 0.05, 0.022),
        "Q": (-0.36 * qrs_b, qrs_b / 11),
        "R": (0.0, qrs_b / 7.5),
        "S": (0.36 * qrs_b, qrs_b / 11),
        "T": (qt_b - 0.09, 0.045),
    }
    x = np.zeros((12, length))
    for name, (c, s) in waves.items():
        bump = np.exp(-0.5 * ((d - c) / s) ** 2).sum(0)  # (time,)
        x += np.outer(_LEADS @ vec[name], bump)
    if st != 0.0:
        j, t_on = qrs_b / 2, qt_b - 0.09
        plateau = _sigmoid((d - j) / 0.01) * _sigmoid((t_on - d) / 0.03)
        x += np.outer(_LEADS @ st_vec, plateau.sum(0))
    # nuisances: baseline wander (shared + per lead) and white noise
    for _ in range(2):
        f, ph = rng.uniform(0.05, 0.5), rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(*bw_r) * (1 + 0.3 * rng.standard_normal((12, 1)))
        x += amp * np.sin(2 * np.pi * f * t + ph)[None, :]
    x += rng.uniform(0.02, 0.06) * rng.standard_normal(x.shape)
    return x


def make_synthetic_ecg(
    n: int, seed: int = 0, *, length: int = 1000, group_probs: tuple[float, float, float] = (
        0.3, 0.35, 0.35),
) -> SyntheticECG:
    """``n`` synthetic records of ``length`` samples at 100 Hz (see the module docstring)."""
    if int(n) != n or n < 1:
        raise ValueError(f"`n` must be a positive integer, got {n!r}")
    if length < 200:
        raise ValueError(f"`length` must be >= 200 samples (2 s), got {length}")
    p = np.asarray(group_probs, dtype=float)
    if p.shape != (3,) or (p < 0).any() or not np.isclose(p.sum(), 1.0):
        raise ValueError(f"`group_probs` must be 3 non-negative numbers summing to 1, got {p}")
    rng = np.random.default_rng(seed)
    group = rng.choice(3, size=int(n), p=p)
    xs, ys, feats = [], [], {k: [] for k in ("hr", "pr", "qrs", "st", "t_sign")}
    for g in group:
        f = _sample_features(rng, int(g))
        xs.append(_one_record(rng, f, length))
        ys.append(labels_of(f))
        for k in feats:
            feats[k].append(f[k])
    return SyntheticECG(
        np.stack(xs).astype(np.float32), np.stack(ys).astype(np.float32), group.astype(np.int64),
        {k: np.asarray(v) for k, v in feats.items()},
    )
