"""tasks/synthetic/baselines.py: the small-loss heuristic (weights = inverse PT loss)."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

from tasks.synthetic import baselines
from tasks.synthetic.baselines import inverse_loss_weights, pt_example_losses, small_loss_weights
from tasks.synthetic.metrics import weight_stats
from tasks.synthetic.noisy import CONFIGS, NoisyTask


def test_docstring_example() -> None:
    assert doctest.testmod(baselines).failed == 0


def test_inverse_loss_weights_closed_form() -> None:
    losses = np.array([0.1, 0.2, 2.0, 3.0])
    eps = 0.05
    inv = [1 / (v + eps) for v in losses]
    ref = [v / (sum(inv) / 4) for v in inv]
    w = inverse_loss_weights(losses, eps)
    np.testing.assert_allclose(w, ref, rtol=1e-12)
    assert w.mean() == pytest.approx(1.0)
    # small-loss examples get the large weights: a perfect split when losses separate
    st = weight_stats(w, np.array([False, False, True, True]))
    assert st["auroc"] == 1.0 and st["ratio"] == pytest.approx(
        (ref[0] + ref[1]) / (ref[2] + ref[3])
    )


def test_bad_losses_are_refused() -> None:
    with pytest.raises(ValueError, match="finite and >= 0"):
        inverse_loss_weights([0.1, -0.2])
    with pytest.raises(ValueError, match="finite and >= 0"):
        inverse_loss_weights([0.1, float("inf")])
    with pytest.raises(ValueError, match="non-empty vector"):
        inverse_loss_weights([])
    with pytest.raises(ValueError, match="`eps` must be > 0"):
        inverse_loss_weights([0.1], eps=0.0)


def test_losses_are_per_example_ce_of_the_noisy_labels() -> None:
    """Against a plain softmax-CE computed by hand from the logits, for the stored (noisy) PT
    labels: entries of clean examples equal the CE of the true class, noisy ones do not."""
    task = NoisyTask(CONFIGS["tiny"], seed=0)
    params = task.pt_params0
    losses = pt_example_losses(task, params)
    from models import digits as M

    with torch.no_grad():
        logits = M.linear(params, "pt", M.features(params, task.x_pt, task.cfg.act))
        logp = logits - logits.exp().sum(1, keepdim=True).log()
    ref = -logp[torch.arange(len(task.y_pt)), task.y_pt].numpy()
    np.testing.assert_allclose(losses, ref, rtol=1e-5, atol=1e-6)
    assert losses.shape == task.noisy.shape


def test_plain_pt_losses_rank_clean_above_noisy() -> None:
    """Sanity check of the alignment with ``task.noisy``: after 50 outer iterations of plain PT
    (tiny config) the heuristic separates clean from noisy better than chance (measured 0.68)."""
    task = NoisyTask(CONFIGS["tiny"], seed=0)
    tr = task.trainer(meta=False)
    tr.run(50, task.pt_batch, task.ft_batch, progress=False)
    st = weight_stats(small_loss_weights(task, tr.pt_params), task.noisy.numpy())
    assert st["auroc"] > 0.6 and st["ratio"] > 1.0
