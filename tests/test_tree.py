"""hypergrad.tree: leaf-wise arithmetic on nested pytrees, and loud structure mismatches."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hypergrad import tree

Pair = namedtuple("Pair", ["u", "v"])


def make_tree(seed: int = 0, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) + offset  # noqa: E731
    return {"w": r(3, 2), "nested": (r(4), [r(1), {"z": r(2, 2, 1)}]), "nt": Pair(r(2), r(()))}


def flat(t) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in tree.leaves(t)])


def test_flatten_unflatten_roundtrip_and_leaf_order():
    t = make_tree()
    leaves, spec = tree.flatten(t)
    assert len(leaves) == 6 and tree.numel(t) == 6 + 4 + 1 + 4 + 2 + 1
    back = tree.unflatten(leaves, spec)
    assert isinstance(back["nt"], Pair) and isinstance(back["nested"][1], list)
    assert all(a is b for a, b in zip(tree.leaves(back), leaves))


def test_arithmetic_matches_flat_vectors():
    a, b = make_tree(0), make_tree(1)
    fa, fb = flat(a), flat(b)
    torch.testing.assert_close(flat(tree.add(a, b)), fa + fb, rtol=0, atol=0)
    torch.testing.assert_close(flat(tree.sub(a, b)), fa - fb, rtol=0, atol=0)
    torch.testing.assert_close(flat(tree.scale(a, -2.5)), -2.5 * fa, rtol=0, atol=0)
    torch.testing.assert_close(flat(tree.scale(a, torch.tensor(3.0))), 3 * fa, rtol=0, atol=0)
    # one fused pass (y + alpha x rounded once per element, as torch.add(y, x, alpha=))
    torch.testing.assert_close(flat(tree.axpy(0.75, a, b)), torch.add(fb, fa, alpha=0.75),
                               rtol=0, atol=0)
    torch.testing.assert_close(flat(tree.axpy(0.75, a, b)), 0.75 * fa + fb)
    torch.testing.assert_close(tree.vdot(a, b), fa @ fb, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(tree.norm(a), fa.norm(), rtol=1e-14, atol=0)
    assert tree.vdot(a, b).shape == () and tree.norm(a).shape == ()
    z = tree.zeros_like(a)
    assert tree.flatten(z)[1] == tree.flatten(a)[1] and float(flat(z).abs().sum()) == 0.0
    # results keep the structure, including namedtuples and lists
    out = tree.add(a, b)
    assert isinstance(out["nt"], Pair) and isinstance(out["nested"][1], list)


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.floats(-3, 3, allow_nan=False),
    st.integers(0, 1000),
)
def test_arithmetic_properties(sizes, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(s, generator=g, dtype=torch.float64) for s in sizes]
    b = [torch.randn(s, generator=g, dtype=torch.float64) for s in sizes]
    # axpy = scale + add; vdot is symmetric and bilinear; norm^2 = vdot(a, a)
    torch.testing.assert_close(
        flat(tree.axpy(alpha, a, b)), flat(tree.add(tree.scale(a, alpha), b))
    )
    torch.testing.assert_close(tree.vdot(a, b), tree.vdot(b, a))
    torch.testing.assert_close(tree.vdot(tree.scale(a, alpha), b), alpha * tree.vdot(a, b))
    torch.testing.assert_close(tree.norm(a) ** 2, tree.vdot(a, a))
    torch.testing.assert_close(flat(tree.sub(tree.add(a, b), b)), flat(a))


def test_detach_requires_grad_and_all_finite():
    x = torch.ones(2, requires_grad=True)
    y = x * 2
    t = {"y": y, "n": torch.tensor([1, 2]), "k": 3}
    assert tree.requires_grad(t)
    d = tree.detach(t)
    assert not tree.requires_grad(d) and d["k"] == 3
    assert torch.equal(d["y"], y.detach())
    r = tree.detach(t, requires_grad=True)
    assert r["y"].requires_grad and r["y"].is_leaf
    assert not r["n"].requires_grad  # integer tensors cannot require grad
    assert tree.all_finite({"a": torch.ones(2), "b": [torch.zeros(1)]})
    assert not tree.all_finite({"a": torch.ones(2), "b": [torch.tensor([float("nan")])]})
    assert not tree.all_finite([torch.tensor([float("-inf")])])


def test_map_with_several_trees():
    a, b, c = make_tree(0), make_tree(1), make_tree(2)
    out = tree.map(lambda x, y, z: x * y + z, a, b, c)
    torch.testing.assert_close(flat(out), flat(a) * flat(b) + flat(c))


@pytest.mark.parametrize(
    "other",
    [
        {"w": torch.zeros(3, 2)},  # missing keys
        {"w": torch.zeros(3, 2), "nested": (torch.zeros(4), [torch.zeros(1)]), "nt": Pair(1, 2)},
        [torch.zeros(3, 2)],  # a list instead of a dict
    ],
    ids=["missing-keys", "shorter-inner-list", "list-vs-dict"],
)
@pytest.mark.parametrize("op", ["add", "sub", "axpy", "vdot", "map", "check_same_structure"])
def test_structure_mismatch_raises_naming_both_arguments(op, other):
    a = make_tree()
    fns = {
        "add": lambda: tree.add(a, other),
        "sub": lambda: tree.sub(a, other),
        "axpy": lambda: tree.axpy(1.0, a, other),
        "vdot": lambda: tree.vdot(a, other),
        "map": lambda: tree.map(torch.add, a, other),
        "check_same_structure": lambda: tree.check_same_structure(a, other, names=("p", "q")),
    }
    names = {
        "axpy": ("x", "y"),
        "map": ("first tree", "tree 2"),
        "check_same_structure": ("p", "q"),
    }
    first, second = names.get(op, ("a", "b"))
    with pytest.raises(ValueError, match=f"`{first}` and `{second}` must be pytrees of the same"):
        fns[op]()


@pytest.mark.parametrize("op", ["add", "sub", "axpy", "vdot", "check_same_structure"])
def test_leaf_shape_mismatch_raises_instead_of_broadcasting(op):
    # Same structure, different leaf shapes: (3,) + (1,) would broadcast silently, and vdot of
    # (2, 3) and (3, 2) would pair the wrong entries; both are caller bugs.
    a = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    b = {"w": torch.ones(3, 2), "b": torch.ones(1)}
    fns = {
        "add": lambda: tree.add(a, b),
        "sub": lambda: tree.sub(a, b),
        "axpy": lambda: tree.axpy(2.0, a, b),
        "vdot": lambda: tree.vdot(a, b),
        "check_same_structure": lambda: tree.check_same_structure(a, b),
    }
    with pytest.raises(ValueError, match="leaf shapes"):
        fns[op]()


def test_empty_trees():
    assert float(tree.norm({})) == 0.0
    assert float(tree.vdot([], [])) == 0.0
    assert tree.numel({}) == 0


def test_ravel_roundtrips_and_matches_concatenation():
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": (torch.tensor([7.0]), torch.zeros(2, 1))}
    v, unravel = tree.ravel(t)
    assert v.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 0.0, 0.0]
    back = unravel(v * 2)
    assert torch.equal(back["a"], 2 * t["a"]) and torch.equal(back["b"][0], 2 * t["b"][0])
    assert back["b"][1].shape == (2, 1)


def test_ravel_refuses_mixed_dtypes_instead_of_promoting():
    with pytest.raises(TypeError, match="one dtype"):
        tree.ravel({"a": torch.ones(2, dtype=torch.float32),
                    "b": torch.ones(2, dtype=torch.float64)})
