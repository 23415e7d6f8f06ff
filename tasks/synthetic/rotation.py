"""Learned rotation (Raghu et al. 2021, synthetic experiment 1): recover the FT rotation.

Pre-training (PT) classifies digits whose images are rotated by ``angle_i ~ N(phi, 1 deg^2)``;
fine-tuning (FT) classifies digits rotated by ``N(90, 1 deg^2)`` from a small labelled set,
starting from the pre-trained network. ``phi`` (a scalar, in **degrees**) is the
meta-parameter: Algorithm 1 (``hg.MetaPretrainer``) moves it so that the network pre-trained on
phi-rotated digits serves the 90-degree FT task best; it should end near 90.

Choices (the paper's appendix is not available; RESULTS.md says why and what else we tried):
- data: sklearn digits, upsampled 2x (16x16, smooth strokes) and padded to 24x24 so every
  rotation keeps the digit in the frame and bilinear resampling barely blurs it (at 8x8,
  multiples of 90 degrees are the only angles that do not blur, which makes them spurious
  local optima); MNIST idx files with ``data_dir``.
- network: a 2-layer ELU MLP on raw pixels (rotation-sensitive by construction) with a linear
  PT head. PT and FT are the same 10-way task, so FT continues the PT classifier
  ("shared_head": psi_FT is a per-class bias; "new_head", a fresh linear head on the encoder,
  is an option). FT sets are small (100 train, 200 val), so PT matters.
- Algorithm 1's loop as in the paper: P = 10 PT steps per meta step, K = 1 head-only FT step,
  Adam for PT (lr 1e-3) and for phi (1 degree per step, cosine-decayed to 0.05).
- d theta_PT / d phi (``ift``): by default a forward-mode tangent carried along the PT run
  (forward.py: ``hg.step_jvp`` on each Adam step), because the IFT's short-horizon response
  points the wrong way far from 90 degrees (measured in RESULTS.md). ``ift="neumann"`` is
  Algorithm 1 exactly (MetaPretrainer's IFT: 3-term Neumann, alpha = the PT learning rate); the
  Adam-preconditioned variants use ``ift_preconditioner="adam"`` (precond.py adds momentum).
  Plain-SGD PT is an option (with ``ift="neumann"``).
- the error is the circular distance |phi - 90| (mod 360).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import hypergrad as hg
from models import digits as M
from tasks.common import mean_std, seed_everything, write_json
from tasks.harness import cached, check_fields, read_json, run_seeds, time_ratio
from tasks.paired import paired_difference
from tasks.results_table import plumbing_title

from . import data as D
from .forward import ForwardModeTrainer
from .precond import IFT_LABELS, IFT_NAMES, solver_for_ift
from .rotate import rotate, rotate_with_tangent, sample_angles
from .shared import batch_generator, cosine_lr, ft_logits, init_classifier, probe_accuracy

__all__ = ["RotationConfig", "CONFIGS", "build", "run_one", "run", "angle_error", "modes",
           "mirror_basin"]

@dataclass(frozen=True)
class RotationConfig:
    meta_steps: int = 400
    P: int = 10
    K: int = 1
    head_only: bool = True
    ft_lr: float = 0.5
    ft_wd: float = 0.0            # L2 on the FT head weights in the FT-train loss
    pt_lr: float = 1e-3
    pt_optimizer: str = "adam"    # or "sgd" (ablation in RESULTS.md: no better)
    pt_wd: float = 0.0            # L2 on all PT parameters in the PT loss
    meta_lr: float = 1.0          # degrees per step at the start (Adam)
    meta_lr_final: float = 0.05   # cosine decay to this
    neumann_iterations: int = 3   # MetaPretrainer's default solver: Neumann, alpha = pt_lr ...
    neumann_alpha_scale: float = 1.0  # ... times this (SGD at the edge of stability has
    #                                   lambda_max ~ 2 / pt_lr: there alpha = pt_lr diverges)
    ift: str = "forward"          # precond.IFT_NAMES says what each computes; alpha scales:
    #   precond_scale (adam_*), neumann_alpha_scale (neumann, library_adam)
    tangent_decay: float = 1.0    # forward: T <- decay * T - ... at every PT step
    precond_scale: float = 1.0    # adam_*: D = this * lr / (sqrt(v_hat) + eps)
    batch_size: int = 128
    n_ft_train: int = 100
    n_ft_val: int = 200
    n_test: int = 300
    scale: int = 2
    blur: float = 0.0             # Gaussian blur (pixels) of every image before any rotation
    width: int = 64
    depth: int = 2
    act: str = "elu"
    encoder_kind: str = "mlp"     # or "cnn" (models/digits.py: 2 convs + pooling)
    pt_label_smoothing: float = 0.0
    ft_angle: float = 90.0
    angle_std: float = 1.0
    ft_mode: str = "shared_head"  # FT continues the PT classifier, psi_FT = a per-class bias
    #                               (PT and FT share the 10 digit classes); or "new_head"
    init_angles: tuple = tuple(float(a) for a in np.arange(0, 180, 18))  # 10 over [0, 180)
    data_dir: str | None = None
    mnist_limit: int = 6000
    checkpoint_every: int = 25
    dtype: str = "float32"
    warmup: int = 0               # outer iterations of plain PT before the first meta step
    time_ratio_steps: int = 30    # meta steps per timing run (0 = skip the measurement)
    also_ift: str = "none"        # a second hypergradient run side by side on the same seeds
    #   (paper / smoke: "neumann", Algorithm 1's IFT); each writes <out>/<ift>/, "none": one run

    def __post_init__(self) -> None:
        check_fields(self, positive=("P", "batch_size", "n_ft_train", "n_ft_val", "n_test",
                                     "scale", "width", "depth", "checkpoint_every", "mnist_limit",
                                     "neumann_iterations", "pt_lr", "meta_lr"),
                     nonneg=("meta_steps", "K", "warmup", "time_ratio_steps", "ft_lr", "ft_wd",
                             "pt_wd", "angle_std", "blur", "meta_lr_final"),
                     fraction=("pt_label_smoothing",),
                     choices={"ift": tuple(IFT_NAMES), "also_ift": ("none", *IFT_NAMES),
                              "pt_optimizer": ("adam", "sgd"),
                              "ft_mode": ("shared_head", "new_head"), "act": tuple(M.ACTIVATIONS),
                              "encoder_kind": ("mlp", "cnn"),
                              "dtype": ("float32", "float64")})
        for key in ("ift", "also_ift"):
            if getattr(self, key) not in ("neumann", "none") and self.pt_optimizer != "adam":
                raise ValueError(f"{key}={getattr(self, key)!r} needs pt_optimizer='adam', got "
                                 f"{self.pt_optimizer!r}")

CONFIGS = {
    "paper": RotationConfig(also_ift="neumann"),
    "smoke": RotationConfig(meta_steps=150, meta_lr=2.0, time_ratio_steps=20, also_ift="neumann"),
    "tiny": RotationConfig(meta_steps=3, P=2, n_ft_train=20, n_ft_val=20, n_test=20,
                           batch_size=16, width=16, time_ratio_steps=2, checkpoint_every=1),
}

def angle_error(phi: float, target: float = 90.0) -> float:
    """Circular distance in degrees."""
    d = (phi - target) % 360.0
    return float(min(d, 360.0 - d))

class RotationTask:
    """Data, losses and batch functions of one seed (everything a MetaPretrainer needs)."""

    def __init__(self, cfg: RotationConfig, seed: int, device: str | torch.device = "cpu"
                 ) -> None:
        self.cfg, self.seed, self.device = cfg, seed, torch.device(device)
        dtype = getattr(torch, cfg.dtype)
        if cfg.data_dir is None:
            ds = D.load_digits(scale=cfg.scale, dtype=dtype, blur=cfg.blur)
        else:
            ds = D.load_mnist(cfg.data_dir, limit=cfg.mnist_limit, dtype=dtype)
        self.side = ds.x.shape[-1]
        sp = D.split(ds, cfg.n_ft_train, cfg.n_ft_val, cfg.n_test, seed=seed)
        g = torch.Generator().manual_seed(seed + 17)
        ft_rot = lambda d: rotate(d.x, cfg.ft_angle + cfg.angle_std * torch.randn(  # noqa: E731
            len(d), generator=g).to(dtype))
        dev = self.device  # everything is drawn on the CPU (same numbers), then moved
        self.pt = D.Dataset(sp.pt.x.to(dev), sp.pt.y.to(dev))
        self.ft = {k: (ft_rot(d).to(dev), d.y.to(dev)) for k, d in
                   (("train", sp.ft_train), ("val", sp.ft_val), ("test", sp.test))}
        gp = torch.Generator().manual_seed(seed)
        self.pt_params0, self.ft_head0 = (
            {k: v.to(dev) for k, v in p.items()} for p in init_classifier(
                cfg.encoder_kind, self.side, cfg.width, cfg.depth, cfg.ft_mode, gp, dtype))

    @property
    def encoder(self):
        return None if self.cfg.ft_mode == "shared_head" else M.encoder_part

    def pt_loss(self, params, hparams, batch) -> torch.Tensor:
        idx, eps = batch
        angles = sample_angles(hparams["phi"], eps, self.cfg.angle_std)
        return self.pt_loss_x(params, rotate(self.pt.x[idx], angles), batch)

    def pt_inputs(self, hparams, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated PT images and their derivative in phi (for the forward-mode tangent)."""
        idx, eps = batch
        angles = sample_angles(hparams["phi"], eps, self.cfg.angle_std)
        return rotate_with_tangent(self.pt.x[idx], angles)

    def pt_loss_x(self, params, x, batch) -> torch.Tensor:
        idx, _ = batch
        loss = F.cross_entropy(M.linear(params, "pt", M.features(params, x, self.cfg.act)),
                               self.pt.y[idx], label_smoothing=self.cfg.pt_label_smoothing)
        if self.cfg.pt_wd:
            loss = loss + self.cfg.pt_wd * sum((v**2).sum() for v in params.values())
        return loss

    def ft_loss(self, enc, head, which) -> torch.Tensor:
        x, y = self.ft[which]
        loss = F.cross_entropy(ft_logits(enc, head, x, self.cfg.act), y)
        if which == "train" and self.cfg.ft_wd and "ft.weight" in head:
            loss = loss + self.cfg.ft_wd * (head["ft.weight"] ** 2).sum()
        return loss

    def pt_batch(self, i: int):
        g = batch_generator(self.seed, i)
        idx = torch.randint(len(self.pt), (self.cfg.batch_size,), generator=g)
        eps = torch.randn(self.cfg.batch_size, generator=g).to(self.pt.x.dtype)
        return idx.to(self.device), eps.to(self.device)

    @staticmethod
    def ft_batch(j: int):
        return "train", "val"  # full FT-train / FT-val sets (small)

    def trainer(self, init_angle: float, meta: bool = True) -> hg.MetaPretrainer:
        cfg = self.cfg
        cls = hg.MetaPretrainer
        solver, extra = solver_for_ift(cfg.ift, cfg.neumann_iterations, cfg.pt_lr,
                                   cfg.precond_scale if cfg.ift.startswith("adam_")
                                   else cfg.neumann_alpha_scale)
        if cfg.ift == "forward":
            cls, extra = ForwardModeTrainer, {"tangent_decay": cfg.tangent_decay,
                                              "pt_split": (self.pt_inputs, self.pt_loss_x)}
        return cls(
            pt_loss=self.pt_loss, ft_loss=self.ft_loss,
            pt_params=self.pt_params0, ft_head=self.ft_head0,
            hparams={"phi": torch.tensor(float(init_angle), dtype=self.pt.x.dtype,
                                         device=self.device)},
            encoder=self.encoder,
            pt_optimizer=(lambda ts: torch.optim.SGD(ts, lr=cfg.pt_lr)) if cfg.pt_optimizer == "sgd"
            else (lambda ts: torch.optim.Adam(ts, lr=cfg.pt_lr)),
            meta_optimizer=lambda ts: torch.optim.Adam(ts, lr=cfg.meta_lr),
            P=cfg.P, K=cfg.K, ft_lr=cfg.ft_lr, head_only=cfg.head_only, solver=solver,
            meta=meta, **extra,
        )

    def probe_accuracy(self, pt_params) -> float:
        return probe_accuracy(pt_params, self.ft, self.cfg.act)

def build(cfg: RotationConfig, seed: int, device: str | torch.device = "cpu") -> RotationTask:
    return RotationTask(cfg, seed, device)

def run_one(cfg: RotationConfig, seed: int, init_angle: float, seed_dir: Path | None = None,
            progress: bool = False, callback=None, device: str | torch.device = "cpu"
            ) -> dict[str, Any]:
    """Meta-learn phi from ``init_angle`` for one seed (resumes from ``seed_dir/ckpt.pt``)."""
    seed_everything(seed)
    task = build(cfg, seed, device)
    tr = task.trainer(init_angle)
    traj: list[float] = []
    sched = cosine_lr(tr, cfg.meta_steps, cfg.meta_lr, cfg.meta_lr_final)

    def cb(j: int, metrics: dict) -> None:
        metrics["phi"] = float(tr.hparams["phi"].detach())  # stored in the history
        if j >= cfg.warmup:
            sched(j - cfg.warmup, metrics)
        if callback is not None:
            callback(j, metrics)

    hist = tr.run(cfg.meta_steps, task.pt_batch, task.ft_batch, warmup=cfg.warmup,
                  checkpoint=None if seed_dir is None else seed_dir / "ckpt.pt",
                  checkpoint_every=cfg.checkpoint_every, progress=progress, callback=cb)
    hist = hist[cfg.warmup:]
    traj = [m["phi"] for m in hist]
    phi = float(tr.hparams["phi"].detach())
    return {
        "init_angle": float(init_angle), "phi": phi, "error": angle_error(phi, cfg.ft_angle),
        "phi_trajectory": traj, "val_loss": [m["val_loss"] for m in hist],
        "final_val_loss": hist[-1]["val_loss"] if hist else float("nan"),
        "probe_test_accuracy": task.probe_accuracy(tr.pt_params),
    }

def measure_time_ratio(cfg: RotationConfig, seed: int = 0, device: str | torch.device = "cpu"
                       ) -> dict[str, Any]:
    """Meta-PT / plain-PT wall time at the configured P and K (paper: under 2x at P=10, K=1)."""
    task = build(cfg, seed, device)

    def make(meta: bool):
        tr = task.trainer(45.0, meta=meta)
        return lambda: tr.run(cfg.time_ratio_steps, task.pt_batch, task.ft_batch, progress=False)

    return time_ratio(make, device=task.device, outer=cfg.time_ratio_steps, P=cfg.P, K=cfg.K)

def modes(cfg: RotationConfig) -> list[str]:
    """The hypergradients a run computes: ``cfg.ift``, then ``cfg.also_ift`` unless "none"."""
    return [cfg.ift] + ([cfg.also_ift] if cfg.also_ift not in ("none", cfg.ift) else [])


def mirror_basin(phi: float, target: float = 90.0) -> bool:
    """Whether ``phi`` ended nearer the mirror solution ``target - 180`` (-90 for the FT angle
    90: the same digits rotated by 180 more) than ``target`` itself."""
    return angle_error(phi, target - 180.0) < angle_error(phi, target)


def run(cfg: RotationConfig, seeds: list[int], out: Path, progress: bool = True,
        aggregate: bool = True, device: str | torch.device = "cpu", plumbing: bool = False
        ) -> dict[str, Any] | None:
    """Every seed (init angle ``init_angles[seed % 10]``), then metrics.json and the plot
    (``aggregate=False``: the seeds only, as one rank of a seed-parallel run).

    With ``cfg.also_ift`` set (the paper and smoke configs: Algorithm 1's IFT), each
    hypergradient of :func:`modes` runs in ``out/<ift>/`` on the same seeds, and
    ``out/metrics.json`` holds the first one's fields (as a single run's), ``per_mode`` (every
    mode's metrics), the paired difference of the errors (second - first) and the starts that
    ended in the mirror basin; the plot shows the modes side by side. ``plumbing`` (tiny
    configs) puts "plumbing check: not a result" into the plot titles."""
    out = Path(out)
    ms = modes(cfg)
    if len(ms) == 1:
        return _run_mode(cfg, seeds, out, progress, aggregate, device, plumbing)
    per_mode = {m: _run_mode(dataclasses.replace(cfg, ift=m, also_ift="none"), seeds, out / m,
                             progress, aggregate, device, plumbing) for m in ms}
    if not aggregate:
        return None
    first, second = (per_mode[m] for m in ms)
    errs = {m: dict(zip(seeds, per_mode[m]["errors"])) for m in ms}
    diff = paired_difference(errs, ms[1], ms[0])
    metrics = {k: v for k, v in first.items() if k not in ("config", "time_ratio")}
    metrics.update(
        config=dataclasses.asdict(cfg), modes=ms, per_mode=per_mode,
        paired={"method": ms[1], "baseline": ms[0], "mean": diff.mean, "lo": diff.lo,
                "hi": diff.hi, "n": diff.n, "level": diff.level},
        mirror={m: [s for s, phi in zip(seeds, per_mode[m]["final_phi"])
                    if mirror_basin(phi, cfg.ft_angle)] for m in ms})
    if "time_ratio" in first:
        metrics["time_ratio"] = first["time_ratio"]
    write_json(out / "metrics.json", metrics)
    from .plots import plot_rotation_modes

    plot_rotation_modes({m: [read_json(out / m / f"seed{s}" / "result.json") for s in seeds]
                         for m in ms}, {m: IFT_LABELS[m] for m in ms}, cfg.ft_angle,
                        out / "rotation.png", suptitle=_plot_title(cfg, seeds, plumbing))
    return metrics


def _plot_title(cfg: RotationConfig, seeds: list[int], plumbing: bool) -> str:
    from tasks.paired_table import seed_range

    return plumbing_title(f"Meta-learned PT rotation: seeds {seed_range(seeds)}, "
                          f"{cfg.meta_steps} meta steps, meta lr {cfg.meta_lr:g}", plumbing)


def _run_mode(cfg: RotationConfig, seeds: list[int], out: Path, progress: bool,
              aggregate: bool, device: str | torch.device, plumbing: bool
              ) -> dict[str, Any] | None:
    def one(seed: int, seed_dir: Path) -> dict[str, Any]:
        init = cfg.init_angles[seed % len(cfg.init_angles)]
        return run_one(cfg, seed, init, seed_dir, progress=progress, device=device)

    results = run_seeds(out, seeds, one, progress=progress, desc=f"rotation seeds ({cfg.ift})")
    if not aggregate:
        return None
    errors = [r["error"] for r in results]
    mean, std = mean_std(errors)
    metrics: dict[str, Any] = {
        "experiment": "rotation", "config": dataclasses.asdict(cfg), "seeds": seeds,
        "ift": cfg.ift, "angle_unit": "degrees", "target_angle": cfg.ft_angle,
        "init_angles": [r["init_angle"] for r in results],
        "final_phi": [r["phi"] for r in results], "errors": errors,
        "error_mean": mean, "error_std": std, "error_median": float(np.median(errors)),
        "paper_error": "7.2 +- 1.5", "target_met": bool(mean < 7.2),
        "probe_test_accuracy": [r["probe_test_accuracy"] for r in results],
    }
    if cfg.time_ratio_steps > 0:
        metrics["time_ratio"] = cached(out / "time_ratio.json",
                                       lambda: measure_time_ratio(cfg, device=device))
    write_json(out / "metrics.json", metrics)
    from .plots import plot_rotation

    plot_rotation(results, cfg.ft_angle, out / "rotation.png",
                  title=f"{IFT_LABELS[cfg.ift]}\n{_plot_title(cfg, seeds, plumbing)}")
    return metrics


MIRROR_WHY = (
    "Why: Algorithm 1's IFT is a 3-term Neumann series, the PT solution's response to phi over a "
    "few tiny gradient steps. Far from 90 degrees that short-horizon response points away from "
    "90 (measured: tasks/synthetic/HISTORY.md), so from some starts phi walks to the mirror "
    "solution near -90 (the FT digits rotated by 180 more), a second basin of the meta-objective. "
    "The forward-mode tangent follows the PT run's whole response to phi and reaches +90.")


def summary(metrics: dict[str, Any]) -> str:
    plumbing = metrics.get("plumbing", False)
    if "per_mode" not in metrics:
        return _summary_one(metrics, plumbing)
    ms = metrics["modes"]
    per = [metrics["per_mode"][m] for m in ms]
    lines = [plumbing_title("two hypergradients on the same seeds", plumbing)]
    lines += [f"  {m}: {IFT_NAMES[m]}" for m in ms]
    w = max(len(m) for m in ms) + 11
    lines.append(f"recovered angle (target {metrics['target_angle']:.0f} deg):")
    lines.append("  seed  init" + "".join(f"{m + ' phi':>{w}}{'|phi-90|':>10}" for m in ms)
                 + f"{'  ' + ms[1] + ' - ' + ms[0]:>{w}}")
    for i, (seed, init) in enumerate(zip(metrics["seeds"], metrics["init_angles"])):
        row = f"  {seed:4d} {init:5.0f}"
        for p in per:
            row += f"{p['final_phi'][i]:{w}.2f}{p['errors'][i]:10.2f}"
        mark = " (mirror)" if any(seed in metrics["mirror"][m] for m in ms) else ""
        lines.append(row + f"{per[1]['errors'][i] - per[0]['errors'][i]:+{w}.2f}{mark}")
    for m, p in zip(ms, per):
        lines.append(f"{m}: |phi - 90| = {p['error_mean']:.2f} +- {p['error_std']:.2f} deg over "
                     f"{len(p['errors'])} runs (paper: 7.2 +- 1.5)")
    d = metrics["paired"]
    ci = "no interval (n=1)" if d["lo"] is None else f"[{d['lo']:+.2f}, {d['hi']:+.2f}]"
    lines.append(f"{ms[1]} - {ms[0]}, paired over seeds: {d['mean']:+.2f} deg, 95% t-CI {ci} "
                 f"(n={d['n']})")
    for m in ms:
        starts = [f"{init:.0f}" for s, init in zip(metrics["seeds"], metrics["init_angles"])
                  if s in metrics["mirror"][m]]
        if starts:
            lines.append(f"{m}: the starts at {', '.join(starts)} deg ended in the mirror basin "
                         f"near {metrics['target_angle'] - 180:.0f} deg.")
    if any(metrics["mirror"][m] for m in ms):
        lines.append(MIRROR_WHY)
    for m, p in zip(ms, per):
        if "time_ratio" in p:
            t = p["time_ratio"]
            lines.append(f"meta-PT / plain-PT wall time at P={t['P']}, K={t['K']}, {m}: "
                         f"{t['ratio']:.2f}x (paper: under 2x)")
    return "\n".join(lines)


def _summary_one(metrics: dict[str, Any], plumbing: bool) -> str:
    lines = [plumbing_title(f"hypergradient: {IFT_NAMES[metrics['config']['ift']]}", plumbing),
             f"recovered angle (target {metrics['target_angle']:.0f} deg):"]
    for init, phi, err in zip(metrics["init_angles"], metrics["final_phi"], metrics["errors"]):
        lines.append(f"  init {init:6.1f} -> phi {phi:7.2f}  |phi - 90| = {err:5.2f}")
    lines.append(f"|phi - 90| = {metrics['error_mean']:.2f} +- {metrics['error_std']:.2f} deg "
                 f"over {len(metrics['errors'])} runs (paper: 7.2 +- 1.5)")
    if "time_ratio" in metrics:
        t = metrics["time_ratio"]
        lines.append(f"meta-PT / plain-PT wall time at P={t['P']}, K={t['K']}: "
                     f"{t['ratio']:.2f}x (paper: under 2x)")
    return "\n".join(lines)
