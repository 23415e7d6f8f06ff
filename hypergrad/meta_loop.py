"""The online meta-pretraining loop of Raghu et al. 2021, Algorithm 1, with exact resume.

Each outer iteration: P pre-training steps on L_PT(theta, psi_PT; phi), then one meta step:
the two-stage hypergradient (:func:`hypergrad.pretraining_hypergrad`) on the last PT batch and
one FT-train / FT-val batch pair, an update of phi by the meta optimizer, and psi_FT replaced by
its value after the K FT steps. theta_PT, psi_PT and psi_FT are kept online (never
re-initialised). With ``meta=False`` the same loop is plain pre-training (the baseline and the
denominator of the cost ratio).

Data parallel: wrap both losses with ``hypergrad.distributed.data_parallel`` and give each
rank its shard of every batch; only rank 0 writes checkpoints and shows progress.

Warm-up: ``run(meta_steps, ..., warmup=N)`` first runs N outer iterations of plain PT (P PT
steps each, no meta step), then ``meta_steps`` meta iterations; ``meta_steps`` does not count
the warm-up. History entries say which they were (``"warmup"``).

Resumability: batches come from functions of the step index, and the checkpoint holds
parameters, optimizer states, counters (warm-up position included), history and the global RNG
state, so a run killed and resumed ends where an uninterrupted run with the same seed ends.
State the losses keep themselves (the running statistics of a ``hypergrad.FunctionalModule``
tracked during PT steps, a scheduler) joins the checkpoint through ``extra_state={name: obj}``
(any object with ``state_dict()`` / ``load_state_dict()``).
Checkpoints load with ``torch.load(weights_only=True)`` (a planted pickle cannot run code); an
unreadable one raises :class:`CheckpointError` naming the file and how to start fresh.

Host synchronisations: a PT step has none; a meta step reads all of its metrics (and the last
PT loss) from the device once; a plain outer iteration reads its PT loss once.

Example:
    >>> import torch, hypergrad as hg
    >>> X = torch.randn(64, 4); y = X @ torch.ones(4)
    >>> l2 = lambda p, h: (h["l2"].exp() * p["w"] ** 2).sum()
    >>> pt = lambda p, h, b: ((X[b] @ p["w"] - y[b]) ** 2).mean() + l2(p, h)
    >>> ft = lambda e, hd, b: ((X[b] @ e["w"] + hd["b"] - y[b]) ** 2).mean()
    >>> trainer = hg.MetaPretrainer(pt_loss=pt, ft_loss=ft, pt_params={"w": torch.zeros(4)},
    ...     ft_head={"b": torch.zeros(())}, hparams={"l2": torch.zeros(4)}, P=2, K=1)
    >>> idx = lambda i: torch.arange(16) + 16 * (i % 4)
    >>> hist = trainer.run(3, idx, lambda j: (idx(j), idx(j + 1)), progress=False)
    >>> len(hist), sorted(hist[0])[:3]
    (3, ['hypergrad_norm', 'meta_time', 'pt_loss'])
"""

from __future__ import annotations

import functools
import inspect
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import _checks, distributed, tree
from .implicit import HypergradientError, HypergradientWarning, PendingHealth
from .pretraining import PretrainingHypergrad, _pretraining_hypergrad, validate
from .solvers import SolveResult, adam_preconditioner, neumann
from .tree import Tree

__all__ = ["MetaPretrainer", "CheckpointError"]

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


class CheckpointError(ValueError):
    """A checkpoint could not be used: unreadable, not plain data, or for another trainer.
    The message names the file and how to start fresh."""


def _leaf_copy(t: Tree) -> Tree:
    return tree.map(lambda x: x.detach().clone().requires_grad_(True), t)


class MetaPretrainer:
    """Online meta-pretraining (see module docstring). Losses take a batch as last argument:
    ``pt_loss(pt_params, hparams, batch)`` and ``ft_loss(enc_params, ft_head, batch)``.

    Optimizers are factories ``tensors -> torch.optim.Optimizer``. The default solver is a
    3-term Neumann series whose step is the PT learning rate (as in the authors' code);
    ``alpha="auto"`` or CG are one ``functools.partial`` away. A solve whose relative residual
    exceeds ``max_solve_residual`` raises (divergence: stop rather than train on garbage); a
    residual in (1, max_solve_residual] warns once (negative curvature of an unconverged PT).

    ``ift_preconditioner="adam"`` gives the solver (``neumann``) the PT Adam state's diagonal
    :func:`hypergrad.adam_preconditioner` at every meta step, so the series is the response of
    the optimizer PT actually runs rather than of plain gradient descent at the PT lr; a
    callable ``trainer -> tree`` supplies any other diagonal.

    ``warm_start=True`` (AmIGO, Arbel & Mairal 2022) starts each meta step's solve at the
    previous meta step's solution (``x0=`` of ``hg.cg`` / ``hg.neumann``; its own matvec). A
    stale start is worse than none (its residual ``||b - H x0||`` exceeds a cold start's
    ``||b||``), which happens when the right-hand side turned (a new FT batch, a big phi or
    theta step); the solve therefore starts from 0 whenever ``||b - b_prev|| >=
    warm_start_reset * ||b||`` (decided on the device). The metric ``warm_started`` says which
    it was; the start is checkpointed for exact resume. Off by default, because on online PT
    (far from a minimum, indefinite Hessian) it changes what a truncated series computes: warm
    Neumann steps add up to one long series, i.e. toward the full H^{-1} b, and away from the
    short J-step response that works as Algorithm 1's meta direction. Measured on the tasks
    (studies/warm_start.py): the Neumann residual a warm step reaches costs a cold series
    25.6x (rotation), 1.7x (noisy labels), 10.8x (PPI) more HVPs, but the task metrics fell
    (noisy clean/noisy AUROC 0.99 -> 0.55-0.62, PPI relevance AUROC 0.86-1.00 -> 0.61-0.80);
    MINRES/CG to a tolerance gained nothing (0.91-0.96x), the systems change too much between
    meta steps. Use it where the inner problem is near a strict minimum and the solver runs to
    a tolerance (AmIGO's setting: the answer is then the same within the tolerance).

    ``products="finite_difference"`` forms every second-order product of the meta step from
    first-order gradients (see :func:`hypergrad.pretraining_hypergrad`): for models with no
    double backward; ``fd_eps`` sets their relative step (default ``hg.default_fd_step``).
    """

    def __init__(
        self,
        *,
        pt_loss: Callable[[Tree, Tree, Any], torch.Tensor],
        ft_loss: Callable[[Tree, Tree, Any], torch.Tensor],
        pt_params: Tree,
        ft_head: Tree,
        hparams: Tree,
        encoder: Callable[[Tree], Tree] | None = None,
        pt_optimizer: OptimizerFactory | None = None,
        meta_optimizer: OptimizerFactory | None = None,
        P: int = 10,
        K: int = 1,
        ft_lr: float = 1e-2,
        head_only: bool = True,
        solver: Callable[..., SolveResult] | None = None,
        meta: bool = True,
        max_solve_residual: float = 10.0,
        ift_preconditioner: str | Callable[[MetaPretrainer], Tree] | None = None,
        warm_start: bool = False,
        warm_start_reset: float = 1.0,
        products: str = "exact",
        fd_eps: float | None = None,
        extra_state: dict[str, Any] | None = None,
    ) -> None:
        self.P = _checks.positive_int(P, "P")
        self.K = _checks.nonneg_int(K, "K")
        # validated once here, under these names; meta steps trust them (no re-validation)
        validate(pt_loss, ft_loss, ft_loss, pt_params, ft_head, hparams, encoder=encoder,
                 ft_steps=K, ft_lr=ft_lr, head_only=bool(head_only), solver=solver,
                 products=products, fd_eps=fd_eps)
        self.products = products
        self.fd_eps = None if fd_eps is None else float(fd_eps)
        self.extra_state = _check_extra_state(extra_state)
        self.pt_loss, self.ft_loss, self.encoder = pt_loss, ft_loss, encoder
        self.ft_lr = float(ft_lr)
        self.head_only, self.meta = bool(head_only), bool(meta)
        self.pt_params = _leaf_copy(pt_params)
        self.ft_head = _leaf_copy(ft_head)
        self.hparams = _leaf_copy(hparams)
        pt_optimizer = pt_optimizer or (lambda ts: torch.optim.Adam(ts, lr=1e-3))
        meta_optimizer = meta_optimizer or (lambda ts: torch.optim.Adam(ts, lr=1e-2))
        self.pt_opt = pt_optimizer(tree.leaves(self.pt_params))
        self.meta_opt = meta_optimizer(tree.leaves(self.hparams))
        if solver is None:
            lr = float(self.pt_opt.param_groups[0]["lr"])
            solver = functools.partial(neumann, iterations=3, alpha=lr)
        self.solver = solver
        if ift_preconditioner is not None:
            if ift_preconditioner != "adam" and not callable(ift_preconditioner):
                raise ValueError(
                    "`ift_preconditioner` must be None, 'adam' or a callable trainer -> tree, "
                    f"got {ift_preconditioner!r}"
                )
            if "preconditioner" not in inspect.signature(solver).parameters:
                raise ValueError(
                    "`ift_preconditioner` needs a solver with a `preconditioner` argument "
                    "(hypergrad.neumann), got `solver` without one"
                )
        self.ift_preconditioner = ift_preconditioner
        if not isinstance(warm_start, bool):
            raise TypeError(f"`warm_start` must be True or False, got {warm_start!r}")
        if warm_start and "x0" not in inspect.signature(solver).parameters:
            raise ValueError(
                "`warm_start=True` needs a solver with an `x0` argument (hypergrad.cg, "
                "hypergrad.neumann), got `solver` without one"
            )
        self.warm_start = warm_start
        self.warm_start_reset = _checks.positive_number(warm_start_reset, "warm_start_reset")
        # the previous meta step's solution and right-hand side (warm starts); checkpointed
        self._warm: dict[str, Tree] | None = None
        self.max_solve_residual = _checks.positive_number(max_solve_residual, "max_solve_residual")
        self.pt_steps_done = 0
        self.outer_steps_done = 0  # outer iterations, warm-up included
        self.meta_steps_done = 0  # meta steps taken
        self.warmup: int | None = None  # the warm-up length of the current run
        self.in_warmup = False  # True during a warm-up iteration (for overriding subclasses)
        self.history: list[dict[str, Any]] = []
        self._pending_reads: dict[str, torch.Tensor] = {}
        self._read: dict[str, float] = {}

    # --- one PT step and one meta step -------------------------------------------------------
    def pt_step(self, batch: Any) -> torch.Tensor:
        """One optimizer step on L_PT(theta, psi_PT; phi) with phi fixed. Returns the loss
        before the step (0-dim, detached): no host synchronisation."""
        self.pt_opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = _checks.scalar_loss(
                self.pt_loss(self.pt_params, tree.detach(self.hparams), batch), "pt_loss"
            )
            loss.backward()
        self.pt_opt.step()
        self.pt_steps_done += 1
        return loss.detach()

    def ift_solver(self) -> Callable[..., SolveResult]:
        """The solver the next meta step uses: ``solver`` with the current IFT preconditioner
        (``ift_preconditioner``) bound, if any, started from the previous meta step's solution
        when ``warm_start`` is on. Calling it changes nothing in the trainer."""
        return self._ift_solver({})

    def _ift_solver(self, seen: dict[str, Tree]) -> Callable[..., SolveResult]:
        """:meth:`ift_solver` that reports the right-hand side and solution of its solve in
        ``seen`` (what the next warm start needs)."""
        solver = self.solver
        if self.ift_preconditioner == "adam":
            solver = functools.partial(
                solver, preconditioner=adam_preconditioner(self.pt_opt, self.pt_params))
        elif callable(self.ift_preconditioner):
            solver = functools.partial(solver, preconditioner=self.ift_preconditioner(self))
        if not self.warm_start:
            return solver
        return functools.partial(_warm_solve, solver, self._warm, self.warm_start_reset, seen)

    def hypergradient(self, pt_batch: Any, ft_train_batch: Any, ft_val_batch: Any
                      ) -> PretrainingHypergrad:
        """The hypergradient the next meta step would take on these batches (nothing moves).

        The trees were validated when the trainer was built, so nothing is checked again here.
        One host read (the IFT solve's health check).
        """
        pending: list[PendingHealth] = []
        res = self._hypergradient(pt_batch, ft_train_batch, ft_val_batch, {}, pending)
        for p in pending:
            p.health.read()
            p.complete()
        return res

    def _hypergradient(self, pt_batch: Any, ft_train_batch: Any, ft_val_batch: Any,
                       seen: dict[str, Tree], pending: list[PendingHealth]
                       ) -> PretrainingHypergrad:
        return _pretraining_hypergrad(
            lambda p, h: self.pt_loss(p, h, pt_batch),
            lambda e, hd: self.ft_loss(e, hd, ft_train_batch),
            lambda e, hd: self.ft_loss(e, hd, ft_val_batch),
            self.pt_params, self.ft_head, self.hparams,
            encoder=self.encoder, ft_steps=self.K, ft_lr=self.ft_lr,
            head_only=self.head_only, solver=self._ift_solver(seen), on_failure="ignore",
            stationarity_tol=None, products=self.products, fd_eps=self.fd_eps, pending=pending,
        )

    def meta_step(self, pt_batch: Any, ft_train_batch: Any, ft_val_batch: Any) -> dict[str, float]:
        """One hypergradient (Algorithm 1) and one meta-optimizer step; psi_FT kept online.

        Every metric of the step, the finiteness of the hypergradient and the IFT solve's
        whole health check are gathered into one tensor and read on the host once; the checks
        below use that copy.
        """
        seen: dict[str, Tree] = {}
        pending: list[PendingHealth] = []
        res = self._hypergradient(pt_batch, ft_train_batch, ft_val_batch, seen, pending)
        hyper = tree.leaves(res.hypergrad)
        # the IFT's health check (no solve: val_loss does not reach phi) and ours, read together
        health = pending[0].health if pending else _checks.Health()
        solve = pending[0].solve if pending else None
        health.add("meta:val_loss", res.val_loss)
        health.add("meta:hypergrad_norm", tree.norm(res.hypergrad))
        # NaN/inf anywhere in the hypergradient or the new head (one sum per leaf)
        health.add_finite("meta:finite", hyper + tree.leaves(res.ft_head))
        # the loop's values to read (the last PT loss) ride along: one read per outer iteration
        extra, self._pending_reads = self._pending_reads, {}
        if self.warm_start and solve is not None:
            extra = {**extra, "warm_started": (solve.stats or {})["warm_start"]}
        for k, v in extra.items():
            health.add("extra:" + k, v.detach())
        health.read()  # the one host synchronisation of a meta step
        for p in pending:
            p.complete()  # the IFT's own findings (errors naming a NaN/inf input first)
        val_loss, hnorm = health["meta:val_loss"], health["meta:hypergrad_norm"]
        residual_f = health.get("residual_norm", float("nan"))
        self._read = {k: health["extra:" + k] for k in extra}
        warm_started = self._read.pop("warm_started", None)
        self._check_solve(residual_f, solve is not None)
        if health.first_nonfinite("meta:finite") is not None:
            raise FloatingPointError(
                f"non-finite hypergradient or FT head at meta step {self.meta_steps_done}; "
                "lower the ft_lr, the "
                "meta learning rate or the Neumann alpha (solver diagnostics: "
                f"{ {k: v for k, v in res.info.items() if k != 'solve'} })"
            )
        self.meta_opt.zero_grad(set_to_none=True)
        for p, g in zip(tree.leaves(self.hparams), hyper):
            p.grad = g.detach().clone()
        self.meta_opt.step()
        with torch.no_grad():
            for p, new in zip(tree.leaves(self.ft_head), tree.leaves(res.ft_head)):
                p.copy_(new)
        if self.warm_start and "x" in seen:
            self._warm = seen
        self.meta_steps_done += 1
        out = {"val_loss": val_loss, "hypergrad_norm": hnorm, "solve_residual": residual_f}
        if warm_started is not None:
            out["warm_started"] = warm_started  # 1.0: the solve began at the last solution
        return out

    def _check_solve(self, residual: float, solved: bool) -> None:
        if not solved:
            return
        if not residual <= self.max_solve_residual:
            # ||b - H x|| far above ||b||: the series/iteration diverged (alpha too large).
            raise HypergradientError(
                f"the IFT solve diverged at meta step {self.meta_steps_done} (relative residual "
                f"{residual:.3g} > max_solve_residual={self.max_solve_residual:g}); lower the "
                "Neumann `alpha` (it must be below 2 / lambda_max of the PT Hessian) or use "
                "alpha='auto' or CG"
            )
        if residual > 1.0:
            # Online PT is not at a minimum: with negative curvature b^T H b < 0 even a short,
            # small-step Neumann series has ||b - H x|| slightly above ||b||. Not divergence,
            # but worth knowing about once.
            warnings.warn(
                "the IFT solve's relative residual exceeded 1 (the PT Hessian has negative "
                "curvature along the hypergradient direction); see the 'solve_residual' metric",
                HypergradientWarning, stacklevel=3,
            )

    # --- the loop ----------------------------------------------------------------------------
    def run(
        self,
        meta_steps: int,
        pt_batch_fn: Callable[[int], Any],
        ft_batch_fn: Callable[[int], tuple[Any, Any]],
        *,
        warmup: int = 0,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        progress: bool = True,
        callback: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Run outer iterations until ``warmup + meta_steps`` are done (resuming from
        ``checkpoint`` if it exists).

        Outer iteration ``j`` (0-based, counted over the whole run, warm-up included) is P PT
        steps on ``pt_batch_fn(i)`` (``i`` = the global PT step) followed, unless it is a
        warm-up iteration (``j < warmup``) or ``meta=False``, by one meta step on
        ``ft_batch_fn(j)``. So ``meta_steps`` counts the iterations *after* the warm-up, and
        ``run(M, warmup=N)`` takes exactly the steps of ``N`` plain-PT iterations followed by
        ``M`` meta iterations. ``outer_steps_done`` counts every outer iteration and
        ``meta_steps_done`` the meta steps taken; ``in_warmup`` is True during a warm-up
        iteration (its PT steps and its callback). Every history entry (the dict given to
        ``callback(j, metrics)``, which may add to it: it is checkpointed) has ``"warmup"``.

        The checkpoint (``torch.load(weights_only=True)``; written every ``checkpoint_every``
        outer iterations and at the end) holds the whole state, warm-up position included, so
        a run killed in its warm-up or later resumes where it stopped and ends exactly as an
        uninterrupted one. Resuming with another ``warmup`` than the checkpoint's is refused.
        """
        meta_steps = _checks.nonneg_int(meta_steps, "meta_steps")
        warmup = _checks.nonneg_int(warmup, "warmup")
        checkpoint_every = _checks.positive_int(checkpoint_every, "checkpoint_every")
        _checks.callable_(pt_batch_fn, "pt_batch_fn")
        _checks.callable_(ft_batch_fn, "ft_batch_fn")
        path = Path(checkpoint) if checkpoint is not None else None
        if path is not None and path.exists():
            self.load_checkpoint(path, warmup=warmup)
        self.warmup = warmup
        total = warmup + meta_steps
        bar = None
        if progress and distributed.is_main():
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=min(self.outer_steps_done, total),
                       desc="meta-PT" if self.meta else "PT", leave=False)
        try:
            while self.outer_steps_done < total:
                j = self.outer_steps_done
                metrics = self._outer_iteration(j, j < warmup, pt_batch_fn, ft_batch_fn)
                self.history.append(metrics)
                if callback is not None:
                    self.in_warmup = j < warmup
                    callback(j, metrics)
                self.in_warmup = False
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(pt_loss=f"{metrics['pt_loss']:.4f}")
                done = self.outer_steps_done
                if path is not None and distributed.is_main() and (
                    done % checkpoint_every == 0 or done == total
                ):
                    # rank 0 writes; every rank holds identical state (see hypergrad.distributed)
                    _atomic_save(self.state_dict(), path)
        finally:
            self.in_warmup = False
            if bar is not None:
                bar.close()
        return self.history

    def _outer_iteration(self, j: int, warm: bool, pt_batch_fn, ft_batch_fn) -> dict[str, Any]:
        """P PT steps, then the meta step unless ``warm`` or ``meta=False``."""
        self.in_warmup = warm
        t0 = time.perf_counter()
        for _ in range(self.P):
            batch = pt_batch_fn(self.pt_steps_done)
            pt_loss = self.pt_step(batch)
        t1 = time.perf_counter()
        self.in_warmup = False
        metrics: dict[str, Any] = {"pt_loss": pt_loss, "pt_time": t1 - t0}
        self._read = {}
        if self.meta and not warm:
            ft_train, ft_val = ft_batch_fn(j)
            if isinstance(pt_loss, torch.Tensor):  # an overriding pt_step may return a float
                self._pending_reads = {"pt_loss": pt_loss}
            metrics.update(self.meta_step(batch, ft_train, ft_val))
            self._pending_reads = {}
        # read with the meta step's metrics (an overriding meta_step may not: read it here)
        metrics["pt_loss"] = self._read.get("pt_loss", None)
        if metrics["pt_loss"] is None:
            metrics["pt_loss"] = float(pt_loss)
        metrics["meta_time"] = time.perf_counter() - t1
        metrics["warmup"] = warm
        self.outer_steps_done += 1
        return metrics

    # --- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "pt_params": tree.detach(self.pt_params),
            "ft_head": tree.detach(self.ft_head),
            "hparams": tree.detach(self.hparams),
            "pt_opt": self.pt_opt.state_dict(),
            "meta_opt": self.meta_opt.state_dict(),
            "pt_steps_done": self.pt_steps_done,
            "outer_steps_done": self.outer_steps_done,
            "meta_steps_done": self.meta_steps_done,
            "warmup": self.warmup,
            "warm_start": self._warm,
            "history": list(self.history),
            "rng": torch.get_rng_state(),
            "extra_state": {k: v.state_dict() for k, v in self.extra_state.items()},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        with torch.no_grad():
            for name in ("pt_params", "ft_head", "hparams"):
                mine = getattr(self, name)
                tree.check_same_structure(mine, sd[name], names=(name, f"checkpoint {name}"))
                for p, v in zip(tree.leaves(mine), tree.leaves(sd[name])):
                    p.copy_(v)
        self.pt_opt.load_state_dict(sd["pt_opt"])
        self.meta_opt.load_state_dict(sd["meta_opt"])
        self.pt_steps_done = int(sd["pt_steps_done"])
        self.history = list(sd["history"])
        if "outer_steps_done" in sd:
            self.outer_steps_done = int(sd["outer_steps_done"])
            self.meta_steps_done = int(sd["meta_steps_done"])
        else:  # written before warm-up existed: "meta_steps_done" counted outer iterations
            self.outer_steps_done = int(sd["meta_steps_done"])
            self.meta_steps_done = sum(1 for m in self.history if "hypergrad_norm" in m)
        self.warmup = sd.get("warmup")
        self._warm = sd.get("warm_start")
        torch.set_rng_state(sd["rng"])
        saved = sd.get("extra_state", {})
        missing = sorted(set(self.extra_state) - set(saved))
        if missing:
            raise KeyError(f"the checkpoint has no extra_state for {missing}")
        for k, obj in self.extra_state.items():
            obj.load_state_dict(saved[k])

    def load_checkpoint(self, path: str | os.PathLike, *, warmup: int | None = None) -> None:
        """Restore the state saved at ``path`` (``torch.load(weights_only=True)``: a checkpoint
        cannot run code). Anything unreadable raises one :class:`CheckpointError` naming the
        file and how to start fresh; ``warmup`` (if given) must match the checkpoint's."""
        path = Path(path)
        fresh = "delete it (or pass another `checkpoint=`) to start fresh"
        try:
            sd = torch.load(path, weights_only=True, map_location=_device_of(self.pt_params))
        except Exception as e:  # truncated, garbage, or a pickle that is not plain data
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"cannot read the checkpoint {str(path)!r} ({type(e).__name__}: {reason[:200]}); "
                f"it is truncated, corrupt or not a MetaPretrainer checkpoint: {fresh}"
            ) from None
        if not isinstance(sd, dict):
            raise CheckpointError(
                f"the checkpoint {str(path)!r} holds a {type(sd).__name__}, not a MetaPretrainer "
                f"state: {fresh}")
        stored = sd.get("warmup")
        if warmup is not None and stored is not None and stored != warmup:
            raise CheckpointError(
                f"the checkpoint {str(path)!r} was written by a run with warmup={stored}, this "
                f"run asks for warmup={warmup}; resume with warmup={stored}, or {fresh}")
        try:
            self.load_state_dict(sd)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(
                f"the checkpoint {str(path)!r} does not fit this trainer ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''}); {fresh}") from None


def _check_extra_state(extra: Any) -> dict[str, Any]:
    """``extra_state``: a dict name -> object with ``state_dict()`` and ``load_state_dict()``."""
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"`extra_state` must be a dict name -> object, got {type(extra).__name__}")
    for k, v in extra.items():
        if not isinstance(k, str) or not (callable(getattr(v, "state_dict", None))
                                          and callable(getattr(v, "load_state_dict", None))):
            raise TypeError(
                f"`extra_state[{k!r}]` must have state_dict() and load_state_dict() (a "
                f"hypergrad.FunctionalModule, an nn.Module, a scheduler), got {type(v).__name__}")
    return dict(extra)


def _warm_solve(solver: Callable[..., SolveResult], warm: dict[str, Tree] | None, reset: float,
                seen: dict[str, Tree], matvec: Callable[[Tree], Tree], b: Tree, **kw: Any
                ) -> SolveResult:
    """``solver(matvec, b, x0=...)`` from the previous solution (AmIGO's warm start), or from 0
    when the right-hand side moved by ``||b - b_prev|| >= reset ||b||`` since then (the previous
    solution is then stale: if H barely changed, its residual ||b - H x_prev|| ~ ||b - b_prev||
    is no better than a cold start's ||b||). Decided on the device: no host read."""
    if warm is None:
        res = solver(matvec, b, **kw)
        keep = None
    else:
        db = tree.sub(b, warm["b"])
        keep = tree.vdot(db, db) < reset**2 * tree.vdot(b, b)
        x0 = tree.map(lambda x: torch.where(keep, x, torch.zeros_like(x)), warm["x"])
        res = solver(matvec, b, x0=x0, **kw)
    seen["x"], seen["b"] = tree.detach(res.solution), tree.detach(b)
    stats = dict(res.stats or {})
    stats["warm_start"] = keep if keep is not None else torch.tensor(False)
    return res._replace(stats=stats)


def _device_of(t: Tree) -> torch.device:
    return tree.leaves(t)[0].device


def _atomic_save(obj: Any, path: Path) -> None:
    """Write then rename (a killed run never leaves half a file); the temporary name is per
    process, so concurrent writers of one path cannot collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
