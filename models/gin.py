"""GIN for protein ego-graphs, as in Hu et al. 2020 ("Strategies for Pre-training GNNs", bio/).

Per layer (their ``GINConv`` with edge features): self loops are added with the self-loop flag
(edge feature 7) set, the 9 binary edge features are embedded by a linear map, each message is
the concatenation ``[h_j, edge_emb_ij]`` summed at the target node, and an MLP
``Linear(2d, 2d) -> BatchNorm -> ReLU -> Linear(2d, d)`` updates the node. Concatenation then a
linear map equals adding a linearly embedded edge feature to a linearly transformed message,
so this is the "edge embeddings added to messages" form of GIN-E. Between layers: ReLU (not
after the last) and dropout. Node input: all-ones ``x`` through a learned embedding. JK "last".
Graph representation: mean pool over the ego-graph concatenated with the center node's
embedding (``2d`` features); heads are separate ``nn.Linear(2d, tasks)`` modules.

Everything is plain torch (``index_add``), so ``torch.func.functional_call`` on dict params
works and double backward (Hessian-vector products) is supported.

Example:
    >>> import torch
    >>> enc = GINEncoder(GINConfig(num_layers=2, emb_dim=8))
    >>> x = torch.ones(3, 1); ei = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    >>> ea = torch.zeros(4, 9); b = torch.zeros(3, dtype=torch.long)
    >>> enc(x, ei, ea, b, torch.tensor([1])).shape
    torch.Size([1, 16])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GINConfig", "GINLayer", "GINEncoder", "SMALL", "PAPER", "EDGE_DIM", "SELF_LOOP_FLAG"]

EDGE_DIM = 9  # 7 interaction types, self-loop flag, mask flag
SELF_LOOP_FLAG = 7


@dataclass(frozen=True)
class GINConfig:
    """Encoder size. ``PAPER`` is Hu et al.'s (5 layers, 300 dims, dropout 0.5 in FT)."""

    num_layers: int = 3
    emb_dim: int = 32
    dropout: float = 0.0
    edge_dim: int = EDGE_DIM

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"`num_layers` must be >= 1, got {self.num_layers}")
        if self.emb_dim < 1:
            raise ValueError(f"`emb_dim` must be >= 1, got {self.emb_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}")
        if self.edge_dim <= SELF_LOOP_FLAG:
            raise ValueError(f"`edge_dim` must be > {SELF_LOOP_FLAG}, got {self.edge_dim}")

    @property
    def repr_dim(self) -> int:
        """Width of the graph representation (mean pool ++ center node)."""
        return 2 * self.emb_dim


SMALL = GINConfig()
PAPER = GINConfig(num_layers=5, emb_dim=300, dropout=0.5)


class GINLayer(nn.Module):
    """One GIN layer with edge features (messages ``[h_j, W_e e_ij + b_e]``, sum aggregation)."""

    def __init__(self, emb_dim: int, edge_dim: int = EDGE_DIM) -> None:
        super().__init__()
        self.edge_encoder = nn.Linear(edge_dim, emb_dim)
        self.mlp = nn.Sequential(
            nn.Linear(2 * emb_dim, 2 * emb_dim),
            nn.BatchNorm1d(2 * emb_dim),
            nn.ReLU(),
            nn.Linear(2 * emb_dim, emb_dim),
        )

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor):
        """``edge_index`` [2, E] (source, target) already includes the self loops."""
        src, dst = edge_index[0], edge_index[1]
        msg = torch.cat([h[src], self.edge_encoder(edge_attr)], dim=1)
        agg = msg.new_zeros(h.shape[0], msg.shape[1]).index_add(0, dst, msg)
        return self.mlp(agg)


def add_self_loops(
    edge_index: torch.Tensor, edge_attr: torch.Tensor, num_nodes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append one self loop per node whose edge feature is the self-loop flag only."""
    loops = torch.arange(num_nodes, device=edge_index.device, dtype=edge_index.dtype)
    loop_attr = edge_attr.new_zeros(num_nodes, edge_attr.shape[1])
    loop_attr[:, SELF_LOOP_FLAG] = 1.0
    return (
        torch.cat([edge_index, torch.stack([loops, loops])], dim=1),
        torch.cat([edge_attr, loop_attr], dim=0),
    )


class GINEncoder(nn.Module):
    """Node embeddings -> graph representation ``[mean pool, center node]`` of width 2d."""

    def __init__(self, config: GINConfig = SMALL) -> None:
        super().__init__()
        if not isinstance(config, GINConfig):
            raise TypeError(f"`config` must be a GINConfig, got {type(config).__name__}")
        self.config = config
        self.input_embedding = nn.Embedding(2, config.emb_dim)
        nn.init.xavier_uniform_(self.input_embedding.weight)
        self.layers = nn.ModuleList(
            GINLayer(config.emb_dim, config.edge_dim) for _ in range(config.num_layers)
        )

    def node_embeddings(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor
    ) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != 1:
            raise ValueError(f"`x` must have shape [N, 1] (all ones), got {tuple(x.shape)}")
        if edge_attr.shape[-1] != self.config.edge_dim:
            raise ValueError(
                f"`edge_attr` must have {self.config.edge_dim} columns, "
                f"got shape {tuple(edge_attr.shape)}"
            )
        n = x.shape[0]
        ei, ea = add_self_loops(edge_index, edge_attr.to(self.input_embedding.weight.dtype), n)
        h = self.input_embedding(x[:, 0].long().clamp(0, 1))
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h, ei, ea)
            if i != last:
                h = F.relu(h)
            h = F.dropout(h, self.config.dropout, training=self.training)
        return h

    def forward(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        edge_attr: torch.Tensor,
        batch: torch.Tensor,
        center: torch.Tensor,
    ) -> torch.Tensor:
        """Graph representations [B, 2d]; ``center`` holds batch-global node indices [B]."""
        h = self.node_embeddings(x, edge_index, edge_attr)
        num_graphs = center.shape[0]
        summed = h.new_zeros(num_graphs, h.shape[1]).index_add(0, batch, h)
        counts = torch.bincount(batch, minlength=num_graphs).clamp(min=1).to(h.dtype)
        return torch.cat([summed / counts[:, None], h[center]], dim=1)
