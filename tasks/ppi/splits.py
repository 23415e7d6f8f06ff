"""Hu et al.'s PPI split (bio/splitters.py, finetune.py, pretrain_supervised.py): test species
9606 (human), the rest train/valid 85/15, the test species halved into easy (also used in PT)
and hard."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

import torch

from .data import TEST_SPECIES, GraphStore

__all__ = ["PPISplit", "species_split", "hu_random_split"]


def hu_random_split(n: int, frac_train: float, frac_valid: float, seed: int):
    """bio/splitters.py ``random_split`` on positions 0..n-1: python ``random.shuffle`` seeded
    with ``seed``, cut at ``int(frac * n)``. Returns (train, valid, rest) position lists."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    a = int(frac_train * n)
    b = int(frac_valid * n) + a
    return order[:a], order[a:b], order[b:]


@dataclass
class PPISplit:
    """Graph indices (into the store). ``pretrain`` = train/valid species + ``test_easy``,
    as in Hu et al.'s pretrain_supervised.py; ``test_hard`` graphs are never seen in PT."""

    pretrain: torch.Tensor
    train: torch.Tensor
    valid: torch.Tensor
    test_easy: torch.Tensor
    test_hard: torch.Tensor

    def sizes(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name).numel()) for f in fields(self)}


def species_split(
    store: GraphStore,
    *,
    seed: int = 42,
    test_species: tuple[int, ...] = TEST_SPECIES,
) -> PPISplit:
    """Hu et al.'s species split: test species 9606 (human); the rest train/valid 85/15 by
    ``random_split(seed=42)``; the test species halved (seed 42) into ``test_easy`` (their
    ``test_dataset_broad``, also used for PT) and ``test_hard`` (``test_dataset_none``).
    As in their code, ``int()`` truncation can leave one graph of each split unused."""
    is_test = torch.zeros(len(store), dtype=torch.bool)
    for s in test_species:
        is_test |= store.species_id == s
    trainval = torch.nonzero(~is_test).flatten()
    test = torch.nonzero(is_test).flatten()
    if trainval.numel() == 0 or test.numel() == 0:
        raise ValueError(
            f"species split needs graphs of test species {test_species} and of others; got "
            f"{int(test.numel())} test and {int(trainval.numel())} train/valid graphs"
        )
    tr, va, _ = hu_random_split(trainval.numel(), 0.85, 0.15, seed)
    easy, hard, _ = hu_random_split(test.numel(), 0.5, 0.5, seed)
    easy_t = test[torch.tensor(easy, dtype=torch.long)]
    return PPISplit(
        pretrain=torch.cat([trainval, easy_t]),
        train=trainval[torch.tensor(tr, dtype=torch.long)],
        valid=trainval[torch.tensor(va, dtype=torch.long)],
        test_easy=easy_t,
        test_hard=test[torch.tensor(hard, dtype=torch.long)],
    )
