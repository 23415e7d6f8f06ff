"""An ``nn.Module`` as loss-ready functions of explicit parameters, hyperparameters and buffers.

``FunctionalModule(net, params=..., hparams=..., buffers=...)`` selects, by name or glob
pattern, which of ``net``'s parameters are the inner ``params`` and which are ``hparams``
(every other parameter is a frozen constant), and which buffers are carried as state. It then
offers ``fm.inner(params, hparams, *inputs)`` and ``fm.outer(params, hparams, *inputs)``:
``torch.func.functional_call`` of ``net`` in the train/eval mode chosen for that level, with
the selected tensors substituted. Write losses with them and hand those to any hypergrad
function (``implicit_grad``, ``unroll``, ``MetaPretrainer``, ...).

Buffer policy (BatchNorm running statistics and any other buffer):
- buffers are non-differentiable state, never parameters or hyperparameters;
- each level (``inner``, ``outer``) runs in ``"train"`` or ``"eval"`` mode, chosen once at
  construction (default: inner ``"train"``, batch statistics; outer ``"eval"``, running
  statistics), whatever mode ``net`` itself is in;
- every call runs on copies of the buffers, so running statistics are never updated inside a
  loss evaluation, a Hessian product or a linear solve (a solve must see one fixed function);
- they change only where you say so: calls inside ``with fm.tracking():`` (your real training
  steps) or :meth:`FunctionalModule.update_buffers` commit the updated statistics to
  ``fm.buffers``, the state the next calls read.
Dropout in a ``"train"`` level draws a fresh mask per call, which makes a solve see a different
Hessian at every product: use ``"eval"`` for that level or a network without dropout.

Example:
    >>> import torch, hypergrad as hg
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
    ...                           torch.nn.Linear(4, 1)).double()
    >>> fm = hg.FunctionalModule(net, params="2.*", hparams="0.*")
    >>> sorted(fm.params), sorted(fm.hparams), sorted(fm.buffers)[:2]
    (['2.bias', '2.weight'], ['0.bias', '0.weight'], ['1.num_batches_tracked', '1.running_mean'])
    >>> x = torch.randn(8, 3, dtype=torch.float64)
    >>> inner_loss = lambda p, h: (fm.inner(p, h, x) ** 2).mean()   # train mode: batch stats
    >>> H = hg.make_hvp(inner_loss, fm.params, fm.hparams)
    >>> bool(fm.buffers["1.running_mean"].eq(0).all())   # running statistics untouched
    True
    >>> with fm.tracking():                                 # a real training step: committed
    ...     _ = inner_loss(fm.params, fm.hparams)
    >>> bool(fm.buffers["1.running_mean"].eq(0).all())
    False
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["FunctionalModule"]

Patterns = str | Sequence[str]
_MODES = ("train", "eval")


def _patterns(sel: Patterns | None, name: str) -> list[str]:
    if sel is None:
        return []
    if isinstance(sel, str):
        return [sel]
    if isinstance(sel, Sequence) and all(isinstance(s, str) for s in sel):
        return list(sel)
    raise TypeError(f"`{name}` must be a name, a glob pattern or a list of them, got {sel!r}")


def _select(names: list[str], sel: Patterns | None, arg: str, kind: str) -> list[str]:
    """The names matched by ``sel`` (exact names or ``fnmatch`` globs), in module order; every
    pattern must match something (a typo would otherwise select nothing, silently)."""
    chosen: set[str] = set()
    for pat in _patterns(sel, arg):
        hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            raise ValueError(
                f"`{arg}` pattern {pat!r} matches none of the module's {kind}s; they are: "
                f"{shown or '(none)'}"
            )
        chosen.update(hit)
    return [n for n in names if n in chosen]


class FunctionalModule:
    """``net`` as functions of explicitly selected params, hparams and buffers (see module doc).

    Args:
        module: the ``nn.Module``. It is not modified (its own tensors stay as they are) except
            that :meth:`to_module` writes values back when asked.
        params: names or glob patterns (``fnmatch``, e.g. ``"head.*"``) of the parameters that
            are the inner ``params``. Must select at least one.
        hparams: the same for parameters that are hyperparameters (``None``: none of the
            module's; hyperparameters may live outside the module). Must not overlap
            ``params``.
        buffers: buffers carried as state in ``fm.buffers`` (``None``: all of them; ``()``: none,
            every buffer then stays at its current value forever).
        inner, outer: ``"train"`` or ``"eval"``: the mode of each level's calls.

    Attributes ``params``, ``hparams``, ``buffers``: dicts of detached copies (name -> tensor):
    the starting values and, for ``buffers``, the current state.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        params: Patterns,
        hparams: Patterns | None = None,
        buffers: Patterns | None = None,
        inner: str = "train",
        outer: str = "eval",
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
        for arg, mode in (("inner", inner), ("outer", outer)):
            if mode not in _MODES:
                raise ValueError(f"`{arg}` must be 'train' or 'eval', got {mode!r}")
        if params is None or not _patterns(params, "params"):
            raise ValueError("`params` must select at least one parameter (a name or pattern)")
        named = dict(module.named_parameters())
        names = list(named)
        p_names = _select(names, params, "params", "parameter")
        h_names = _select(names, hparams, "hparams", "parameter")
        overlap = sorted(set(p_names) & set(h_names))
        if overlap:
            raise ValueError(
                f"`params` and `hparams` overlap on {overlap}: a tensor is either an inner "
                "parameter or a hyperparameter; narrow one of the patterns"
            )
        named_b = dict(module.named_buffers())
        b_names = list(named_b) if buffers is None else _select(
            list(named_b), buffers, "buffers", "buffer")
        self.module = module
        self.modes = {"inner": inner, "outer": outer}
        self.params = {n: named[n].detach().clone() for n in p_names}
        self.hparams = {n: named[n].detach().clone() for n in h_names}
        self.buffers = {n: named_b[n].detach().clone() for n in b_names}
        chosen = set(p_names) | set(h_names)
        self._frozen = {n: t.detach().clone() for n, t in named.items() if n not in chosen}
        self._frozen_buffers = {n: t.detach().clone() for n, t in named_b.items()
                                if n not in self.buffers}
        self._tracking = False

    def __repr__(self) -> str:
        return (f"FunctionalModule({type(self.module).__name__}: {len(self.params)} params, "
                f"{len(self.hparams)} hparams, {len(self.buffers)} buffers, "
                f"{len(self._frozen)} frozen; inner={self.modes['inner']!r}, "
                f"outer={self.modes['outer']!r})")

    # --- calls ------------------------------------------------------------------------------
    def inner(self, params: Mapping[str, torch.Tensor], hparams: Any, *args: Any,
              **kwargs: Any) -> Any:
        """``module(*args, **kwargs)`` with ``params`` (and the module's ``hparams``) substituted,
        in the inner level's mode. ``hparams`` is ignored when no module parameter was selected
        as a hyperparameter (pass your loss's own hparams through unchanged)."""
        return self._call("inner", params, hparams, args, kwargs)

    def outer(self, params: Mapping[str, torch.Tensor], hparams: Any, *args: Any,
              **kwargs: Any) -> Any:
        """As :meth:`inner`, in the outer level's mode."""
        return self._call("outer", params, hparams, args, kwargs)

    def _tensors(self, params: Any, hparams: Any) -> dict[str, torch.Tensor]:
        if not isinstance(params, Mapping) or set(params) != set(self.params):
            got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(f"`params` must be a dict with exactly the selected parameters "
                             f"{sorted(self.params)}, got {got}")
        out = dict(self._frozen)
        out.update(params)
        if self.hparams:
            missing = [n for n in self.hparams
                       if not isinstance(hparams, Mapping) or n not in hparams]
            if missing:
                raise ValueError(f"`hparams` must be a dict holding the module's "
                                 f"hyperparameters {sorted(self.hparams)}; missing {missing}")
            out.update({n: hparams[n] for n in self.hparams})
        return out

    def _call(self, level: str, params: Any, hparams: Any, args: tuple, kwargs: dict) -> Any:
        return self._run(self.modes[level] == "train", params, hparams, args, kwargs)

    def _run(self, train: bool, params: Any, hparams: Any, args: tuple, kwargs: dict) -> Any:
        tensors = self._tensors(params, hparams)
        # copies: whatever the module does to its buffers in place stays in the copies
        live = {n: b.clone() for n, b in self.buffers.items()}
        tensors.update({n: b.clone() for n, b in self._frozen_buffers.items()})
        tensors.update(live)
        with _mode(self.module, train):
            out = torch.func.functional_call(self.module, tensors, args, kwargs)
        if self._tracking and train:
            self.buffers = {n: b.detach() for n, b in live.items()}
        return out

    # --- buffer state -----------------------------------------------------------------------
    @contextlib.contextmanager
    def tracking(self) -> Iterator[FunctionalModule]:
        """Within this block, every call in ``"train"`` mode commits the buffers it updated
        (running statistics) to ``fm.buffers``. Wrap your real training steps in it, never a
        hypergradient computation."""
        old, self._tracking = self._tracking, True
        try:
            yield self
        finally:
            self._tracking = old

    def update_buffers(self, params: Mapping[str, torch.Tensor], hparams: Any, *args: Any,
                       **kwargs: Any) -> Any:
        """One forward in train mode without a graph whose buffer updates are committed
        (e.g. refresh BatchNorm statistics on a batch); returns the output."""
        with torch.no_grad(), self.tracking():
            return self._run(True, params, hparams, args, kwargs)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The state this object carries: ``{"buffers": fm.buffers}`` (detached copies; params
        and hparams belong to the caller). For checkpoints (``MetaPretrainer(extra_state=)``)."""
        return {"buffers": {n: b.detach().clone() for n, b in self.buffers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s buffers (the same names and shapes)."""
        bufs = state.get("buffers") if isinstance(state, Mapping) else None
        if not isinstance(bufs, Mapping) or set(bufs) != set(self.buffers):
            got = sorted(bufs) if isinstance(bufs, Mapping) else type(bufs).__name__
            raise ValueError(f"`state` must hold the buffers {sorted(self.buffers)}, got {got}")
        for n, b in bufs.items():
            if tuple(b.shape) != tuple(self.buffers[n].shape):
                raise ValueError(f"buffer {n!r} has shape {tuple(b.shape)}, expected "
                                 f"{tuple(self.buffers[n].shape)}")
        self.buffers = {n: bufs[n].detach().clone().to(self.buffers[n]) for n in self.buffers}

    def to_module(self, params: Mapping[str, torch.Tensor],
                  hparams: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """Copy ``params``, the module's ``hparams`` (if selected) and ``fm.buffers`` into the
        module's own tensors (for evaluation or saving with ordinary ``nn`` code)."""
        tensors = self._tensors(params, hparams)
        own = dict(self.module.named_parameters())
        own_b = dict(self.module.named_buffers())
        with torch.no_grad():
            for n in list(self.params) + list(self.hparams):
                own[n].copy_(tensors[n])
            for n, b in self.buffers.items():
                own_b[n].copy_(b)
        return self.module


@contextlib.contextmanager
def _mode(module: nn.Module, train: bool) -> Iterator[None]:
    saved = [(m, m.training) for m in module.modules()]
    module.train(train)
    try:
        yield
    finally:
        for m, was in saved:
            m.training = was
