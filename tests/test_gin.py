"""GIN of Hu et al. (models/gin.py): shapes, invariances, functional_call and double backward."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import hypergrad as hg
from models.gin import PAPER, SELF_LOOP_FLAG, GINConfig, GINEncoder, add_self_loops


def _toy_batch(dtype=torch.float64):
    """Two ego-graphs (3 and 4 nodes) with batch-global ids; centers 1 and 3 + 3."""
    ei = torch.tensor([[0, 1, 1, 2, 3, 4, 4, 5, 5, 6], [1, 0, 2, 1, 4, 3, 5, 4, 6, 5]])
    g = torch.Generator().manual_seed(0)
    ea = (torch.rand(10, 9, generator=g) < 0.4).to(dtype)
    ea[:, 7:] = 0
    ea[1::2] = ea[0::2]  # both directions share features
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    return torch.ones(7, 1, dtype=dtype), ei, ea, batch, torch.tensor([1, 6])


def test_shapes_and_paper_config():
    enc = GINEncoder(GINConfig(num_layers=3, emb_dim=16))
    out = enc(*_toy_batch(torch.float32))
    assert out.shape == (2, 32)
    paper = GINEncoder(PAPER)
    assert len(paper.layers) == 5 and paper.config.emb_dim == 300 and paper.config.repr_dim == 600
    assert paper.layers[0].mlp[0].in_features == 600  # [h_j, edge_emb] concatenated


def test_self_loops_carry_the_flag():
    ei = torch.tensor([[0, 1], [1, 0]])
    ea = torch.zeros(2, 9)
    ei2, ea2 = add_self_loops(ei, ea, 3)
    assert ei2.shape == (2, 5) and torch.equal(ei2[:, 2:], torch.tensor([[0, 1, 2], [0, 1, 2]]))
    assert torch.equal(ea2[2:, SELF_LOOP_FLAG], torch.ones(3)) and ea2[2:].sum() == 3


def test_node_relabelling_invariance_and_center_matters():
    torch.manual_seed(0)
    enc = GINEncoder(GINConfig(num_layers=2, emb_dim=8)).double().eval()
    x, ei, ea, batch, center = _toy_batch()
    perm = torch.tensor([2, 0, 1, 6, 3, 5, 4])  # new id of old node i is perm[i]
    out = enc(x, ei, ea, batch, center)
    out_p = enc(x, perm[ei], ea, batch, perm[center])
    torch.testing.assert_close(out, out_p)
    other = enc(x, ei, ea, batch, torch.tensor([0, 6]))
    assert not torch.allclose(out[0], other[0])  # the center-node half changes


def test_bad_inputs_name_the_argument():
    enc = GINEncoder(GINConfig(num_layers=1, emb_dim=4))
    x, ei, ea, batch, center = _toy_batch(torch.float32)
    with pytest.raises(ValueError, match="`x`"):
        enc(torch.ones(7, 2), ei, ea, batch, center)
    with pytest.raises(ValueError, match="`edge_attr`"):
        enc(x, ei, ea[:, :5], batch, center)
    with pytest.raises(ValueError, match="num_layers"):
        GINConfig(num_layers=0)
    with pytest.raises(TypeError, match="config"):
        GINEncoder({"num_layers": 2})


def test_hvp_through_gin_matches_finite_differences_of_gradients():
    """Double backward through functional_call (BatchNorm in train mode, fixed buffers)."""
    torch.manual_seed(1)
    enc = GINEncoder(GINConfig(num_layers=2, emb_dim=4)).double().train()
    head = torch.randn(8, 3, dtype=torch.float64)
    inputs = _toy_batch()
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    buffers = {k: v.clone() for k, v in enc.named_buffers()}
    params = {k: v.detach().clone() for k, v in enc.named_parameters()}

    def loss(p):
        out = functional_call(enc, (p, {k: v.clone() for k, v in buffers.items()}), inputs)
        return torch.nn.functional.binary_cross_entropy_with_logits(out @ head, y)

    def grad(p):
        p = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        return dict(zip(p, torch.autograd.grad(loss(p), list(p.values()))))

    g = torch.Generator().manual_seed(2)
    v = {k: torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in params.items()}
    hv = hg.hvp(loss, params, v)
    eps = 1e-5
    plus = grad({k: params[k] + eps * v[k] for k in params})
    minus = grad({k: params[k] - eps * v[k] for k in params})
    for k in params:
        torch.testing.assert_close(hv[k], (plus[k] - minus[k]) / (2 * eps), rtol=1e-5, atol=1e-7)
    # running statistics were never written
    for k, b in enc.named_buffers():
        torch.testing.assert_close(b, buffers[k])
