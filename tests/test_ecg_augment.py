"""ECG augmentations: identity at strength 0, gradients vs finite differences, monotone warp."""

from __future__ import annotations

import pytest
import torch

from tasks.ecg import augment as A


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.randn(3, 4, 160, generator=gen(1), dtype=torch.float64)


@pytest.mark.parametrize("fn", [A.temporal_warp, A.random_crop, A.jitter])
def test_strength_zero_is_identity(fn, x):
    torch.testing.assert_close(fn(x, 0.0, gen()), x, rtol=0, atol=0)
    torch.testing.assert_close(fn(x, torch.zeros(3, dtype=x.dtype), gen()), x, rtol=0, atol=0)


def test_augment_order_and_identity(x):
    out = A.augment(x, gen(), crop=0.0, noise=0.0, warp=0.0)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    # same generator seed -> same view (fixed randomness for one hypergradient)
    a = A.augment(x, gen(5), warp=torch.tensor([4.0, 9.0, 16.0], dtype=x.dtype))
    b = A.augment(x, gen(5), warp=torch.tensor([4.0, 9.0, 16.0], dtype=x.dtype))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, A.augment(x, gen(6), warp=4.0))


@pytest.mark.parametrize("fn, s", [
    (A.temporal_warp, [3.0, 20.0, 60.0]),
    (A.random_crop, [0.3, 0.2, 0.5]),
    (A.jitter, [0.05, 0.1, 0.2]),
])
def test_gradient_wrt_strength_matches_finite_differences(fn, s, x):
    st = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: fn(x, v, gen(3)), (st,), fast_mode=True)


def test_gradient_through_full_pipeline(x):
    w = torch.tensor([5.0, 10.0, 30.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: A.augment(x, gen(4), warp=v), (w,), fast_mode=True)


def test_warp_is_monotone_and_scales_with_strength():
    x = torch.zeros(8, 1, 1000, dtype=torch.float64)
    disp = []
    for s in (1.0, 25.0, 400.0, 1e4):
        _, pos = A.temporal_warp(x, s, gen(2), return_positions=True)
        step = pos[:, 1:] - pos[:, :-1]
        assert bool((step > 0).all()), f"time reversal at strength {s}"
        disp.append(float((pos - torch.arange(1000.0, dtype=pos.dtype)).abs().mean()))
    assert disp == sorted(disp)
    # strength = variance of the velocity in samples^2: mean |u| ~ sqrt(s) for small warps
    assert 0.4 < disp[1] / 5.0 < 1.6


def test_warp_moves_features_in_time():
    t = torch.arange(400.0, dtype=torch.float64)
    x = torch.exp(-0.5 * ((t - 200) / 6) ** 2).view(1, 1, -1)
    y, pos = A.temporal_warp(x, 100.0, gen(0), return_positions=True)
    peak = int(y.argmax())
    assert abs(float(pos[0, peak]) - 200) < 1.0  # x'(t) = x(t + u(t)): the bump moved to t*
    assert abs(peak - 200) > 2  # by a visible amount at this strength
    assert float(y.max()) == pytest.approx(1.0, abs=0.02)


def test_lerp_sample_reproduces_linear_signals():
    x = torch.arange(10.0).view(1, 1, 10)
    pos = torch.tensor([[0.0, 0.5, 3.25, 8.9, 9.0, 9.5, -0.5]])
    out = A.lerp_sample(x, pos).squeeze()
    torch.testing.assert_close(out[:5], torch.tensor([0.0, 0.5, 3.25, 8.9, 9.0]))
    assert float(out[5]) == pytest.approx(4.5) and float(out[6]) == pytest.approx(0.0)
    border = A.lerp_sample(x, pos, "border").squeeze()
    torch.testing.assert_close(border[5:], torch.tensor([9.0, 0.0]))


def test_double_backward_through_warp():
    """A gradient of the loss wrt network weights is itself differentiable wrt the strength."""
    x = torch.randn(2, 3, 64, dtype=torch.float64, generator=gen(0))
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([4.0, 9.0], dtype=torch.float64, requires_grad=True)
    loss = (torch.einsum("c,bct->bt", w, A.temporal_warp(x, s, gen(1))) ** 2).sum()
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    (gs,) = torch.autograd.grad(g.sum(), s)
    assert torch.isfinite(gs).all() and gs.abs().sum() > 0


def test_bad_arguments_are_named(x):
    with pytest.raises(ValueError, match="`strength` must be >= 0"):
        A.temporal_warp(x, -1.0, gen())
    with pytest.raises(ValueError, match=r"`strength` must be a scalar or shape \(3,\)"):
        A.jitter(x, torch.ones(2), gen())
    with pytest.raises(ValueError, match="`x` must be a float tensor"):
        A.random_crop(torch.zeros(4, 5), 0.1, gen())
