"""Is the temporal warp a useful augmentation on the synthetic generator? SimCLR pre-training at
a few fixed warp strengths, each evaluated by (a) a linear probe on frozen features and (b)
whole-network fine-tuning, with AUROC split into the timing and the morphology labels.

    python -m studies.ecg_warp_check --warp 0,25 --seed 0 --out runs/ecg_warpcheck

One pre-training per (warp, seed), stored under OUT (resumable); results in
OUT/g3_w{warp}_s{seed}.json (g3: generator version 3, the only one kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from models.resnet1d import RESNET_CONFIGS, ResNet1d
from tasks.common import atomic_save, mean_std, write_json
from tasks.ecg.methods import CONFIGS, macro_auroc, pretrain, with_overrides
from tasks.ecg.synthetic import timing_morphology
from tasks.ecg.task import synthetic_task


def _split_auroc(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    auc, per = macro_auroc(y, score)
    return {"all": auc, **timing_morphology(per), "per_label": per}


def linear_probe(enc_state, task, cfg, n: int, seed: int) -> dict[str, float]:
    """L2 logistic regression per label on frozen, standardised encoder features of D_FT
    (train + val, ``n`` examples); test macro AUROC."""
    from sklearn.linear_model import LogisticRegression

    enc = ResNet1d(task.x.shape[1], **RESNET_CONFIGS[cfg.encoder])
    enc.load_state_dict(enc_state)
    enc.eval()
    tr, va = task.ft_split(n, seed)
    idx = np.concatenate([tr, va])
    with torch.no_grad():
        f_tr = enc(task.x[idx]).numpy()
        f_te = torch.cat([enc(task.x_test[i:i + 256]) for i in range(0, len(task.x_test), 256)])
    f_te = f_te.numpy()
    mu, sd = f_tr.mean(0), f_tr.std(0) + 1e-6
    f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
    y = task.y[idx].numpy()
    score = np.zeros((len(f_te), y.shape[1]))
    for j in range(y.shape[1]):
        if 0 < y[:, j].sum() < len(y):
            clf = LogisticRegression(C=0.1, max_iter=2000).fit(f_tr, y[:, j])
            score[:, j] = clf.decision_function(f_te)
    return _split_auroc(task.y_test.numpy(), score)


def probe_saved(args) -> int:
    """Linear probes of a CLI run's saved SimCLR encoders (``--methods``); mean +- std over
    seeds, and every method's paired difference to the first one."""
    cfg = CONFIGS["default"]
    task = synthetic_task(2000, 1000)
    ns = [int(v) for v in args.n_ft.split(",")]
    res: dict = {}
    methods = args.methods.split(",")
    for name in methods:
        for s in range(args.seeds):
            path = Path(args.pt_dir) / "pt" / f"{name}_s{s}.pt"
            enc_state = torch.load(path, weights_only=True)["enc_state"]
            for n in ns:
                res.setdefault(name, {}).setdefault(n, []).append(
                    linear_probe(enc_state, task, cfg, n, s))
    summary = {name: {n: {k: mean_std([r[k] for r in rs]) for k in ("all", "timing", "morphology")}
                      for n, rs in by_n.items()} for name, by_n in res.items()}
    base = methods[0]
    diff = {m: {n: {k: [a[k] - b[k] for a, b in zip(res[m][n], res[base][n])]
                    for k in ("all", "timing", "morphology")} for n in ns} for m in methods[1:]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "probe_saved.json", {"summary": summary, f"paired_diff_minus_{base}": diff,
                                          "per_run": res, "pt_dir": args.pt_dir})
    for m, by_n in diff.items():
        for n, d in by_n.items():
            print(f"{m} - {base}, N={n}:", {k: f"{100 * np.mean(v):+.1f} +- "
                                            f"{100 * np.std(v, ddof=1):.1f}" for k, v in d.items()},
                  flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studies.ecg_warp_check")
    p.add_argument("--warp", default="0,25", help="comma-separated fixed warp strengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-ft", default="100,250,500")
    p.add_argument("--ft-n", default="100", help="|D_FT| values also fine-tuned (slow)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--pt-dir", help="probe the saved SimCLR pre-trainings of a CLI run instead "
                   "(DIR/pt/{method}_s*.pt) for seeds 0..--seeds-1")
    p.add_argument("--methods", default="simclr_nowarp,simclr",
                   help="saved pre-trainings to probe (DIR/pt/{method}_s{seed}.pt); differences "
                   "are taken to the first")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.pt_dir:
        return probe_saved(args)
    torch.set_num_threads(1)
    from tasks.ecg.methods import finetune
    from tasks.harness import apply_overrides

    cfg = apply_overrides(CONFIGS["default"], args.set)
    task = synthetic_task(2000, 1000)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ns = [int(v) for v in args.n_ft.split(",")]
    ft_ns = [int(v) for v in args.ft_n.split(",") if v]
    for w in [float(v) for v in args.warp.split(",")]:
        key = f"g3_w{w:g}_s{args.seed}"  # generator version 3, the only one kept
        path = out / f"{key}.pt"
        if path.exists():
            pt = torch.load(path, weights_only=True)
        else:
            pt = pretrain("simclr", task.x[task.pt_idx], with_overrides(cfg, warp=w), args.seed,
                          progress=False)
            pt = {"enc_state": pt["enc_state"], "wall_time": pt["wall_time"]}
            atomic_save(pt, path)
        r = {"warp": w, "seed": args.seed, "generator": 3,
             "pt_wall_time": pt["wall_time"]}
        for n in ns:
            r[f"probe_n{n}"] = linear_probe(pt["enc_state"], task, cfg, n, args.seed)
        for n in ft_ns:
            tr, va = task.ft_split(n, args.seed)
            ft = finetune(pt["enc_state"], (task.x[tr], task.y[tr]), (task.x[va], task.y[va]),
                          (task.x_test, task.y_test), cfg, 1000 * args.seed)
            per = ft["test_auroc_per_label"]
            r[f"ft_n{n}"] = {"all": ft["test_auroc"], "per_label": per, **timing_morphology(per)}
        write_json(out / f"{key}.json", r)
        print(key, {k: (round(v["timing"], 3), round(v["morphology"], 3))
                    for k, v in r.items() if isinstance(v, dict)}, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
