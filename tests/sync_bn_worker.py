"""SyncBatchNorm and all_gather under torchrun vs one process on the whole batch (float64):
outputs, gradients, Hessian-vector products and running statistics. Used by
tests/test_distributed.py; exits non-zero (assertion) on any mismatch.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/sync_bn_worker.py
"""

from __future__ import annotations

import torch
from worker_exit import run_and_exit  # the script's folder is on sys.path

from hypergrad import distributed as hd


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def loss(y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # non-linear in y: real HVPs
    return (y * c).sum() ** 2 / 10 + (y**3 * c).sum()


def main() -> None:
    hd.init(backend="gloo", timeout_s=60)
    r, w = hd.rank(), hd.world_size()
    g = torch.Generator().manual_seed(0)
    for shape, momentum in (((8, 3), 0.1), ((8, 3, 5), None), ((8, 3, 2, 2), 0.3)):
        n = shape[0] // w
        X = torch.randn(*shape, generator=g, dtype=torch.float64)
        C = torch.randn(*shape, generator=g, dtype=torch.float64)
        V = torch.randn(*shape, generator=g, dtype=torch.float64)
        ref = torch.nn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
        if len(shape) == 4:
            ref = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 2, generator=g)
            ref.bias.uniform_(-1, 1, generator=g)
        sync = hd.convert_sync_batchnorm(torch.nn.Sequential(ref.__class__(
            3, momentum=momentum, dtype=torch.float64)))[0]
        sync.load_state_dict(ref.state_dict())
        mine = slice(r * n, (r + 1) * n)
        xs, xf = X[mine].clone().requires_grad_(), X.clone().requires_grad_()
        for _ in range(2):  # two steps of running statistics
            ys, yf = sync(xs), ref(xf)
        close(ys, yf[mine], f"{shape} forward")
        close(sync.running_mean, ref.running_mean, f"{shape} running_mean")
        close(sync.running_var, ref.running_var, f"{shape} running_var")
        assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked)
        # the global loss is the sum of the per-rank pieces
        (gs,) = torch.autograd.grad(loss(ys, C[mine]), xs, create_graph=True)
        (gf,) = torch.autograd.grad(sum(loss(yf[k * n:(k + 1) * n], C[k * n:(k + 1) * n])
                                        for k in range(w)), xf, create_graph=True)
        close(gs, gf[mine], f"{shape} gradient")
        (hs,) = torch.autograd.grad((gs * V[mine]).sum(), xs)
        (hf,) = torch.autograd.grad((gf * V).sum(), xf)
        close(hs, hf[mine], f"{shape} Hessian-vector product")
    # all_gather: local rows against all rows, first and second order
    Z = torch.randn(4, 2, generator=g, dtype=torch.float64)
    V = torch.randn(4, 2, generator=g, dtype=torch.float64)
    zs, zf = Z[r * 2:(r + 1) * 2].clone().requires_grad_(), Z.clone().requires_grad_()

    def coupled(local: torch.Tensor, everyone: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(local @ everyone.T, 1).sum() + 0.1 * (everyone**3).sum()

    (gs,) = torch.autograd.grad(coupled(zs, hd.all_gather(zs)), zs, create_graph=True)
    (gf,) = torch.autograd.grad(sum(coupled(zf[k * 2:(k + 1) * 2], zf) for k in range(w)), zf,
                                create_graph=True)
    close(gs, gf[r * 2:(r + 1) * 2], "all_gather gradient")
    (hs,) = torch.autograd.grad((gs * V[r * 2:(r + 1) * 2]).sum(), zs)
    (hf,) = torch.autograd.grad((gf * V).sum(), zf)
    close(hs, hf[r * 2:(r + 1) * 2], "all_gather Hessian-vector product")
    # integer sums, low precision statistics, unequal gather shapes
    assert int(hd.all_reduce_sum(torch.tensor([3]))) == 3 * w
    xb = torch.randn(300, 2, generator=g).to(torch.bfloat16)
    yb = hd.SyncBatchNorm(2, dtype=torch.bfloat16).train()(xb)
    assert yb.dtype == torch.bfloat16 and yb.float().std(0).min() > 0.5
    try:
        hd.all_gather(torch.zeros(r + 1, 2))
    except ValueError as e:
        assert "equal shapes" in str(e)
    else:
        raise AssertionError("all_gather accepted unequal shapes")
    hd.shutdown()
    assert hd.world_size() == 1 and not torch.distributed.is_initialized()
    hd.shutdown()  # idempotent


if __name__ == "__main__":
    run_and_exit(main)
