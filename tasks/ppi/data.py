"""Loader for Hu et al.'s PPI ego-graphs (``bio/dataset/supervised/processed/...pt``) and batching.

The file is a torch-geometric ``InMemoryDataset`` pair ``(data, slices)``: all ego-graphs
concatenated, ``slices[key]`` the cumulative boundaries of each graph. Per graph: ``x`` [N, 1]
(ones), ``edge_index`` [2, 2E] (both directions, local node ids), ``edge_attr`` [2E, 9],
``species_id`` [1], ``center_node_idx`` [1] (local), ``go_target_pretrain`` [5000] and
``go_target_downstream`` [40] (0/1).

:class:`GraphStore` keeps the concatenated tensors and builds mini-batches by index with node
ids and ``center_node_idx`` offset by the cumulative node count (PyG's default collate leaves
``center_node_idx`` un-offset, a bug kept in Hu et al.'s and Raghu et al.'s PT loaders).
:class:`PPIDataset` exposes the same file through torch-geometric's ``InMemoryDataset`` whose
items (:class:`PPIGraph`) collate correctly with ``torch_geometric.loader.DataLoader``.
Hu et al.'s species split is in ``splits.py``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch_geometric.data import Data, InMemoryDataset

__all__ = [
    "PROCESSED_NAME",
    "PPIFormatError",
    "GraphBatch",
    "GraphStore",
    "PPIGraph",
    "PPIDataset",
    "resolve_path",
    "read_collated",
    "load_ppi",
]

PROCESSED_NAME = "geometric_data_processed.pt"
TRAIN_VALID_SPECIES = (3702, 6239, 511145, 7227, 10090, 4932, 7955)
TEST_SPECIES = (9606,)
REQUIRED = (
    "x",
    "edge_index",
    "edge_attr",
    "species_id",
    "center_node_idx",
    "go_target_pretrain",
    "go_target_downstream",
)
CONVERT_HINT = (
    "Convert it once, in the environment with the torch-geometric version that wrote it "
    "(Hu et al. used torch-geometric 1.0.x): `python tasks/ppi/convert_legacy.py IN.pt OUT.pt` "
    "(a standalone script that needs only torch) writes plain tensors and slices, which this "
    "loader reads with any torch-geometric; then pass OUT.pt (or its folder) as --data-dir."
)


class PPIFormatError(ValueError):
    """The file exists but is not a readable (data, slices) PPI dataset."""


def resolve_path(path: str | Path) -> Path:
    """Accept the file, its ``processed/`` folder, or the dataset root (``.../supervised``)."""
    p = Path(path)
    candidates = [p, p / PROCESSED_NAME, p / "processed" / PROCESSED_NAME]
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"PPI data not found at `{p}` (tried {tried}). Expected Hu et al.'s "
        f"bio/dataset/supervised/processed/{PROCESSED_NAME} (download "
        "http://snap.stanford.edu/gnn-pretrain/data/bio_dataset.zip); pass the file, its "
        "processed/ folder or the dataset/supervised root."
    )


def _tensors_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Plain tensors of a collated ``data``: new PyG ``Data``, legacy PyG ``Data`` or a dict."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, Data) and "_store" in obj.__dict__:
        items = obj.to_dict().items()
    elif isinstance(obj, Data):
        # Unpickled from torch-geometric 1.x: attributes live directly in __dict__.
        items = obj.__dict__.items()
    else:
        raise PPIFormatError(
            f"`{path}`: expected (data, slices) with data a torch_geometric Data or a dict of "
            f"tensors, got data of type {type(obj).__name__}"
        )
    return {str(k): v for k, v in items if isinstance(v, torch.Tensor)}


def read_collated(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read ``(data, slices)`` from ``path`` as two dicts of tensors.

    Also reads the plain format written by ``convert_legacy.py``
    (``{"format": "ppi-plain-v1", "data": {...}, "slices": {...}}``). Only load files you
    trust: torch-geometric objects need ``torch.load(weights_only=False)`` (arbitrary pickle).
    """
    p = resolve_path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError, ImportError, pickle.UnpicklingError,
            EOFError, RuntimeError, TypeError) as e:
        raise PPIFormatError(
            f"cannot unpickle `{p}` with torch {torch.__version__} / this torch-geometric "
            f"({type(e).__name__}: {e}). The file was probably written by an older "
            f"torch-geometric whose classes cannot be rebuilt here. {CONVERT_HINT}"
        ) from e
    if isinstance(obj, dict) and obj.get("format") == "ppi-plain-v1":
        data, slices = obj.get("data"), obj.get("slices")
    elif isinstance(obj, (tuple, list)) and len(obj) >= 2:
        data, slices = obj[0], obj[1]
    else:
        raise PPIFormatError(
            f"`{p}` holds a {type(obj).__name__}, not an InMemoryDataset (data, slices) pair"
        )
    if not isinstance(slices, dict):
        raise PPIFormatError(f"`{p}`: slices must be a dict, got {type(slices).__name__}")
    return _tensors_of(data, p), {str(k): v for k, v in slices.items()}


@dataclass
class GraphBatch:
    """A mini-batch of ego-graphs with batch-global node ids (``center`` already offset)."""

    x: torch.Tensor
    edge_index: torch.Tensor
    edge_attr: torch.Tensor
    batch: torch.Tensor
    center: torch.Tensor
    y_pt: torch.Tensor
    y_ft: torch.Tensor

    @property
    def num_graphs(self) -> int:
        return int(self.center.shape[0])

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """The encoder's positional inputs ``(x, edge_index, edge_attr, batch, center)``."""
        return self.x, self.edge_index, self.edge_attr, self.batch, self.center

    def to(self, device: torch.device) -> GraphBatch:
        return GraphBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass
class GraphStore:
    """All ego-graphs concatenated; ``node_ptr``/``edge_ptr`` are [G+1] boundaries."""

    x: torch.Tensor
    edge_index: torch.Tensor  # [2, E], local node ids
    edge_attr: torch.Tensor
    node_ptr: torch.Tensor
    edge_ptr: torch.Tensor
    species_id: torch.Tensor  # [G]
    center_node_idx: torch.Tensor  # [G], local
    y_pt: torch.Tensor  # [G, T_pt] float 0/1
    y_ft: torch.Tensor  # [G, T_ft] float 0/1
    device: torch.device = field(default=torch.device("cpu"), compare=False)  # of the batches

    def __len__(self) -> int:
        return int(self.node_ptr.numel() - 1)

    @property
    def num_pt_tasks(self) -> int:
        return int(self.y_pt.shape[1])

    @property
    def num_ft_tasks(self) -> int:
        return int(self.y_ft.shape[1])

    def batch(self, idx: torch.Tensor | list[int]) -> GraphBatch:
        """Collate graphs ``idx`` (vectorised; node ids and centers offset per graph)."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"`idx` out of range for {len(self)} graphs: {idx.tolist()[:10]}")
        n_cnt = self.node_ptr[idx + 1] - self.node_ptr[idx]
        e_cnt = self.edge_ptr[idx + 1] - self.edge_ptr[idx]
        n_off = torch.cumsum(n_cnt, 0) - n_cnt  # new start of each graph's nodes
        e_off = torch.cumsum(e_cnt, 0) - e_cnt
        n_total, e_total = int(n_cnt.sum()), int(e_cnt.sum())
        graph_of_node = torch.repeat_interleave(torch.arange(idx.numel()), n_cnt)
        graph_of_edge = torch.repeat_interleave(torch.arange(idx.numel()), e_cnt)
        node_src = self.node_ptr[idx][graph_of_node] + torch.arange(n_total) - n_off[graph_of_node]
        edge_src = self.edge_ptr[idx][graph_of_edge] + torch.arange(e_total) - e_off[graph_of_edge]
        return GraphBatch(
            x=self.x[node_src],
            edge_index=self.edge_index[:, edge_src] + n_off[graph_of_edge],
            edge_attr=self.edge_attr[edge_src],
            batch=graph_of_node,
            center=self.center_node_idx[idx] + n_off,
            y_pt=self.y_pt[idx],
            y_ft=self.y_ft[idx],
        ).to(self.device)

    def validate(self, where: str = "store") -> None:
        g = len(self)
        checks = {
            "species_id": self.species_id.shape == (g,),
            "center_node_idx": self.center_node_idx.shape == (g,),
            "go_target_pretrain": self.y_pt.dim() == 2 and self.y_pt.shape[0] == g,
            "go_target_downstream": self.y_ft.dim() == 2 and self.y_ft.shape[0] == g,
            "x": self.x.shape[0] == int(self.node_ptr[-1]),
            "edge_index": self.edge_index.shape[1] == int(self.edge_ptr[-1]),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise PPIFormatError(f"{where}: inconsistent fields {bad} for {g} graphs")
        n_cnt = self.node_ptr[1:] - self.node_ptr[:-1]
        if bool((self.center_node_idx < 0).any() | (self.center_node_idx >= n_cnt).any()):
            raise PPIFormatError(f"{where}: center_node_idx outside its graph")


def _per_graph(t: torch.Tensor, sl: torch.Tensor, key: str, path: Path) -> torch.Tensor:
    """A per-graph vector field ([G*k] concatenated) as [G, k]; k must be the same for all."""
    sizes = sl[1:] - sl[:-1]
    if sizes.numel() and bool((sizes != sizes[0]).any()):
        raise PPIFormatError(f"`{path}`: `{key}` has graphs of different lengths")
    k = int(sizes[0]) if sizes.numel() else 0
    return t.reshape(sizes.numel(), k)


def store_from_collated(
    data: dict[str, torch.Tensor], slices: dict[str, torch.Tensor], path: str | Path = "<memory>"
) -> GraphStore:
    """Build a :class:`GraphStore` from collated tensors (InMemoryDataset layout)."""
    path = Path(path)
    missing = [k for k in REQUIRED if k not in data or k not in slices]
    if missing:
        raise PPIFormatError(
            f"`{path}` lacks fields {missing} (has {sorted(data)}); this is not Hu et al.'s "
            "supervised PPI dataset (the unsupervised one has no GO targets)"
        )
    ei = data["edge_index"]
    if ei.dim() != 2 or ei.shape[0] != 2:
        raise PPIFormatError(f"`{path}`: edge_index must be [2, E], got {tuple(ei.shape)}")
    store = GraphStore(
        x=data["x"].float().reshape(-1, 1),
        edge_index=ei.long(),
        edge_attr=data["edge_attr"].float(),
        node_ptr=slices["x"].long(),
        edge_ptr=slices["edge_index"].long(),
        species_id=data["species_id"].long().reshape(-1),
        center_node_idx=data["center_node_idx"].long().reshape(-1),
        y_pt=_per_graph(data["go_target_pretrain"], slices["go_target_pretrain"].long(),
                        "go_target_pretrain", path).float(),
        y_ft=_per_graph(data["go_target_downstream"], slices["go_target_downstream"].long(),
                        "go_target_downstream", path).float(),
    )
    store.validate(str(path))
    return store


def load_ppi(path: str | Path) -> GraphStore:
    """Load Hu et al.'s supervised PPI file (or a file in the same layout) as a GraphStore."""
    p = resolve_path(path)
    data, slices = read_collated(p)
    return store_from_collated(data, slices, p)


# --- torch-geometric view ---------------------------------------------------------------------
class PPIGraph(Data):
    """A PPI ego-graph whose ``center_node_idx`` is offset like ``edge_index`` when batched."""

    def __inc__(self, key: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if key == "center_node_idx":
            return self.num_nodes
        return super().__inc__(key, value, *args, **kwargs)


class PPIDataset(InMemoryDataset):
    """Hu et al.'s file as a torch-geometric dataset of :class:`PPIGraph` items.

    ``root`` is the ``dataset/supervised`` folder (file at ``root/processed/``). Use with
    ``torch_geometric.loader.DataLoader``: centers come out offset. Legacy files are read as
    by :func:`read_collated`.
    """

    def __init__(self, root: str | Path, transform: Any = None) -> None:
        self._file = resolve_path(root)
        super().__init__(str(root), transform=transform)
        data, slices = read_collated(self._file)
        store_from_collated(data, slices, self._file)  # validate once
        self.data, self.slices = PPIGraph.from_dict(data), slices

    @property
    def raw_file_names(self) -> list[str]:
        return []

    @property
    def processed_file_names(self) -> str:
        return PROCESSED_NAME

    @property
    def processed_dir(self) -> str:
        return str(self._file.parent)
