"""The differentiable rotation and its reparameterised angle."""

from __future__ import annotations

import pytest
import torch

from tasks.synthetic.rotate import draw_noise, rotate, sample_angles


def test_gradcheck_rotated_image_wrt_angle():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    for a0 in (17.0, 90.3, -45.5):
        a = torch.tensor([a0, a0 + 3.1], dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a: rotate(x, a), (a,), eps=1e-6, atol=1e-6)
    s = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)  # scalar angle
    assert torch.autograd.gradcheck(lambda s: rotate(x, s), (s,), eps=1e-6, atol=1e-6)


def test_rotation_direction_and_identity():
    x = torch.rand(3, 1, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)))
    torch.testing.assert_close(rotate(x, 0.0), x)
    torch.testing.assert_close(rotate(x, 180.0), torch.rot90(x, 2, dims=(-2, -1)))


def test_reparameterised_angle_has_fixed_noise():
    eps1 = draw_noise(5, torch.Generator().manual_seed(3), torch.float64)
    eps2 = draw_noise(5, torch.Generator().manual_seed(3), torch.float64)
    assert torch.equal(eps1, eps2)
    phi = torch.tensor(40.0, dtype=torch.float64, requires_grad=True)
    a = sample_angles(phi, eps1, std_deg=1.0)
    a.sum().backward()
    assert float(phi.grad) == 5.0  # d angle_i / d phi = 1
    torch.testing.assert_close(a.detach(), 40.0 + eps1)


def test_bad_shapes():
    with pytest.raises(ValueError, match="n, c, h, w"):
        rotate(torch.zeros(8, 8), 1.0)
    with pytest.raises(ValueError, match="angle_deg"):
        rotate(torch.zeros(2, 1, 8, 8), torch.zeros(3))


def test_rotate_with_tangent_matches_autograd():
    from tasks.synthetic.rotate import rotate_with_tangent

    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 12, 12, generator=g, dtype=torch.float64)
    # generic angles: at exact multiples of 90 the sampling points sit on the kinks of the
    # bilinear interpolant, where the two computations pick different one-sided derivatives
    a = torch.tensor([0.7, 17.3, 45.1, 90.5, -30.2], dtype=torch.float64)
    y, dy = rotate_with_tangent(x, a)
    torch.testing.assert_close(y, rotate(x, a))
    u = torch.zeros_like(x, requires_grad=True)  # reference: double backward through grid_sample
    aa = a.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(rotate(x, aa), aa, grad_outputs=u, create_graph=True)
    (ref,) = torch.autograd.grad(ga.sum(), u)
    torch.testing.assert_close(dy, ref)
