"""1-D ResNet encoder, heads, phi CNN; BatchNorm kept out of second-order products."""

from __future__ import annotations

import pytest
import torch

import hypergrad as hg
from models.ecg_phi import WarpStrengthNet
from models.resnet1d import (
    RESNET_CONFIGS,
    LinearHead,
    ProjectionHead,
    ResNet1d,
    functional_forward,
    recompute_bn_stats,
)


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_encoder_shapes(name):
    enc = ResNet1d(12, **RESNET_CONFIGS[name])
    h = enc(torch.randn(2, 12, 1024))
    assert h.shape == (2, enc.feature_dim) == (2, RESNET_CONFIGS[name]["widths"][-1])
    assert ProjectionHead(enc.feature_dim, 32)(h).shape == (2, 32)
    assert LinearHead(enc.feature_dim, 5)(h).shape == (2, 5)


def test_paper_config_is_resnet18():
    enc = ResNet1d(12, **RESNET_CONFIGS["paper"])
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv1d) and m.kernel_size[0] > 1]
    assert len(convs) == 17  # stem + 8 basic blocks x 2 (+ fc = 18 weight layers)
    assert all(c.kernel_size == (15,) for c in convs)


def test_encoder_rejects_bad_input():
    enc = ResNet1d(12, **RESNET_CONFIGS["tiny"])
    with pytest.raises(ValueError, match=r"`x` must have shape \(batch, 12, time\)"):
        enc(torch.randn(2, 8, 100))
    with pytest.raises(ValueError, match="`kernel` must be odd"):
        ResNet1d(12, kernel=4)


def test_functional_forward_leaves_buffers_and_hvp_works():
    torch.manual_seed(0)
    enc = ResNet1d(3, **RESNET_CONFIGS["tiny"]).double().train()
    before = {k: v.clone() for k, v in enc.named_buffers()}
    x = torch.randn(4, 3, 64, dtype=torch.float64)
    params = {k: v.detach() for k, v in enc.named_parameters()}

    def loss(p):
        return (functional_forward(enc, p, x) ** 2).sum()

    v = {k: torch.randn_like(t) for k, t in params.items()}
    hv1 = hg.hvp(loss, params, v)
    hv2 = hg.hvp(loss, params, v)
    for k in params:
        torch.testing.assert_close(hv1[k], hv2[k])  # same function at every product
    for k, b in enc.named_buffers():
        torch.testing.assert_close(b, before[k], rtol=0, atol=0)  # running stats untouched
    # and it matches finite differences of the gradient
    eps = 1e-6
    g = lambda p: torch.autograd.grad(loss(p), list(p.values()))  # noqa: E731
    pp = {k: (t + eps * v[k]).requires_grad_() for k, t in params.items()}
    pm = {k: (t - eps * v[k]).requires_grad_() for k, t in params.items()}
    fd = [(a - b) / (2 * eps) for a, b in zip(g(pp), g(pm))]
    err = sum(float(((hv1[k] - f) ** 2).sum()) for k, f in zip(params, fd)) ** 0.5
    assert err / float(hg.tree.norm(hv1)) < 1e-4  # (ReLU kinks: compare whole vectors)


def test_recompute_bn_stats():
    enc = ResNet1d(12, **RESNET_CONFIGS["tiny"])
    x = 3 + 2 * torch.randn(16, 12, 128)
    recompute_bn_stats(enc, x, batch_size=8)
    bn = enc.stem[1]
    assert int(bn.num_batches_tracked) == 2 and bn.momentum == 0.1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_phi_positive_bounded_and_starts_at_init():
    phi = WarpStrengthNet(12, 8, init_strength=25.0, max_strength=100.0)
    x = torch.randn(5, 12, 300)
    s = phi(x)
    assert s.shape == (5,)
    torch.testing.assert_close(s, torch.full((5,), 25.0))
    with torch.no_grad():
        phi.out.weight.normal_(0, 0.5)
    s = phi(x)
    assert bool((s > 0).all() and (s < 100).all())
    assert not torch.allclose(s, s[0].expand(5))  # per example
    # per-example: no batch statistics
    torch.testing.assert_close(phi(x[:2]), s[:2])
    with pytest.raises(ValueError, match="init_strength"):
        WarpStrengthNet(init_strength=5.0, max_strength=4.0)


def test_phi_calibrate_standardises_features_and_keeps_init():
    torch.manual_seed(0)
    phi = WarpStrengthNet(12, 8, init_strength=25.0, max_strength=100.0)
    x = torch.randn(64, 12, 200)
    phi.calibrate(x)
    with torch.no_grad():
        f = (phi.features(x).mean(-1) - phi.feat_mean) / phi.feat_std
    torch.testing.assert_close(f.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(f.std(0), torch.ones(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(phi(x), torch.full((64,), 25.0))  # still starts at init
    with torch.no_grad():
        phi.out.weight.normal_(0, 0.5)
    torch.testing.assert_close(phi(x[:3]), phi(x)[:3])  # per example (fixed statistics)
