"""PPI loader (tasks/ppi/data.py) on fixture files written in Hu et al.'s exact layout."""

from __future__ import annotations

import random
import sys
import types

import pytest
import torch
from torch_geometric.data import Data, InMemoryDataset
from torch_geometric.loader import DataLoader

from tasks.ppi import convert_legacy
from tasks.ppi.data import (
    PROCESSED_NAME,
    PPIDataset,
    PPIFormatError,
    load_ppi,
    read_collated,
)
from tasks.ppi.splits import species_split

SPECIES = [3702, 6239, 511145, 7227, 10090, 4932, 7955]


def _graphs(n: int = 23, n_pt: int = 6, n_ft: int = 4, seed: int = 0) -> list[Data]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        nodes = 2 + i % 4
        und = torch.stack([torch.arange(nodes - 1), torch.arange(1, nodes)])  # a path
        ei = torch.stack([und, und.flip(0)], dim=2).reshape(2, -1)  # both directions
        attr = (torch.rand(nodes - 1, 9, generator=g) < 0.5).float()
        attr[:, 7:] = 0
        out.append(Data(
            x=torch.ones(nodes, 1),
            edge_index=ei,
            edge_attr=attr.repeat_interleave(2, dim=0),
            species_id=torch.tensor([9606 if i % 3 == 0 else SPECIES[i % 7]]),
            center_node_idx=torch.tensor([i % nodes]),
            go_target_pretrain=(torch.rand(n_pt, generator=g) < 0.5).long(),
            go_target_downstream=(torch.rand(n_ft, generator=g) < 0.5).long(),
        ))
    return out


@pytest.fixture
def root(tmp_path):
    """``tmp/supervised/processed/geometric_data_processed.pt`` as InMemoryDataset writes it."""
    data, slices = InMemoryDataset.collate(_graphs())
    path = tmp_path / "supervised" / "processed" / PROCESSED_NAME
    path.parent.mkdir(parents=True)
    torch.save((data, slices), path)
    return tmp_path / "supervised"


def test_load_fields_and_accepted_paths(root):
    graphs = _graphs()
    for p in (root, root / "processed", root / "processed" / PROCESSED_NAME):
        store = load_ppi(p)
        assert len(store) == 23 and store.num_pt_tasks == 6 and store.num_ft_tasks == 4
    assert torch.equal(store.y_pt[5], graphs[5].go_target_pretrain.float())
    centers = torch.tensor([int(d.center_node_idx) for d in graphs])
    assert torch.equal(store.center_node_idx, centers)
    assert store.edge_index.shape[1] == int(store.edge_ptr[-1]) == sum(d.num_edges for d in graphs)


def test_batch_offsets_center_and_matches_torch_geometric(root):
    store = load_ppi(root)
    idx = torch.tensor([4, 0, 7, 7, 11])
    b = store.batch(idx)
    graphs = _graphs()
    offsets = torch.cumsum(torch.tensor([0] + [graphs[i].num_nodes for i in idx[:-1]]), 0)
    local = torch.tensor([int(graphs[i].center_node_idx) for i in idx])
    assert torch.equal(b.center, local + offsets)
    assert b.num_graphs == 5 and int(b.batch.max()) == 4
    # the torch-geometric view collates the same batch (PPIGraph offsets center_node_idx)
    ds = PPIDataset(root)
    ref = next(iter(DataLoader(ds[idx], batch_size=5, shuffle=False)))
    assert torch.equal(ref.center_node_idx, b.center)
    assert torch.equal(ref.edge_index, b.edge_index) and torch.equal(ref.edge_attr, b.edge_attr)
    assert torch.equal(ref.batch, b.batch)
    # PyG's plain Data does not offset center_node_idx: the bug our collate avoids
    plain = next(iter(DataLoader([graphs[i] for i in idx], batch_size=5, shuffle=False)))
    assert not torch.equal(plain.center_node_idx, b.center)


def test_species_split_reproduces_hu_et_al(root):
    store = load_ppi(root)
    sp = species_split(store)
    species = store.species_id
    trainval = [i for i in range(len(store)) if int(species[i]) != 9606]
    test = [i for i in range(len(store)) if int(species[i]) == 9606]
    # their random_split: random.seed(42); random.shuffle(list(range(n))); int(frac * n) cuts
    random.seed(42)
    order = list(range(len(trainval)))
    random.shuffle(order)
    n = len(trainval)
    assert sp.train.tolist() == [trainval[i] for i in order[: int(0.85 * n)]]
    a, b = int(0.85 * n), int(0.85 * n) + int(0.15 * n)
    assert sp.valid.tolist() == [trainval[i] for i in order[a:b]]
    random.seed(42)
    order = list(range(len(test)))
    random.shuffle(order)
    half = int(0.5 * len(test))
    assert sp.test_easy.tolist() == [test[i] for i in order[:half]]
    assert sp.test_hard.tolist() == [test[i] for i in order[half: 2 * half]]
    assert set(sp.pretrain.tolist()) == set(trainval) | set(sp.test_easy.tolist())
    assert not set(sp.test_hard.tolist()) & set(sp.pretrain.tolist())


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_ppi(tmp_path / "nowhere")


def test_unpicklable_legacy_file_says_how_to_convert(tmp_path, monkeypatch):
    """A pickle referring to a class torch-geometric no longer has (as 1.x files may)."""
    mod = types.ModuleType("torch_geometric.data.legacy_gone")

    class OldData:
        pass

    OldData.__module__ = mod.__name__
    OldData.__qualname__ = "OldData"
    mod.OldData = OldData
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    obj = OldData()
    obj.x = torch.ones(2, 1)
    path = tmp_path / PROCESSED_NAME
    torch.save((obj, {"x": torch.tensor([0, 2])}), path)
    monkeypatch.delitem(sys.modules, mod.__name__)
    with pytest.raises(PPIFormatError, match="convert_legacy.py") as e:
        load_ppi(path)
    assert str(path) in str(e.value)


def test_legacy_data_object_without_store_is_read(root, tmp_path):
    """torch-geometric 1.x Data unpickles with attributes directly in __dict__."""
    data, slices = torch.load(root / "processed" / PROCESSED_NAME, weights_only=False)
    old = Data.__new__(Data)
    old.__dict__.update({k: v for k, v in data.to_dict().items()})
    path = tmp_path / "old" / PROCESSED_NAME
    path.parent.mkdir()
    torch.save((old, slices), path)
    with pytest.raises(RuntimeError, match="older version of PyG"):
        _ = torch.load(path, weights_only=False)[0].x  # what torch-geometric itself says
    store = load_ppi(path)
    torch.testing.assert_close(store.y_ft, load_ppi(root).y_ft)


def test_convert_legacy_round_trip(root, tmp_path):
    out = tmp_path / "plain.pt"
    fields = convert_legacy.convert(str(root / "processed" / PROCESSED_NAME), str(out))
    assert "center_node_idx" in fields
    data, slices = read_collated(out)
    assert set(data) >= {"x", "edge_index", "go_target_downstream"}
    torch.testing.assert_close(load_ppi(out).y_pt, load_ppi(root).y_pt)


def test_wrong_content_is_a_format_error(tmp_path):
    data, slices = InMemoryDataset.collate([Data(x=torch.ones(2, 1)), Data(x=torch.ones(3, 1))])
    path = tmp_path / PROCESSED_NAME
    torch.save((data, slices), path)
    with pytest.raises(PPIFormatError, match="lacks fields"):
        load_ppi(path)
    torch.save({"a": 1}, path)
    with pytest.raises(PPIFormatError, match="not an InMemoryDataset"):
        load_ppi(path)
