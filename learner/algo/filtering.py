"""DAPO's dynamic sampling (Yu et al. 2025): which prompt groups of a step carry a policy gradient."""

from __future__ import annotations

import torch

from .advantages import as_groups

__all__ = ["informative_groups", "select_groups"]


def informative_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Whether the rewards of each group differ.

    Shapes: ``scores [B]`` (groups of ``group_size`` contiguous samples) -> ``[B / group_size]``
    bool. A group whose scores are all equal, max_g(s) = min_g(s), gets all-zero advantages under
    GRPO, Dr. GRPO and RLOO: (s - mean) / (std + eps), s - mean and s - leave-one-out mean all
    vanish, and so does its policy gradient. Equality is exact: group normalisation blows any
    difference up to order 1.
    """
    grouped = as_groups(scores, group_size)
    return grouped.amax(dim=1) > grouped.amin(dim=1)


def select_groups(informative: torch.Tensor, wanted: int) -> torch.Tensor:
    """The groups a step trains: the first ``wanted`` informative ones in order; when there are
    fewer, the first uninformative ones take the remaining places (every group when there are
    fewer than ``wanted`` in all).

    Shapes: ``informative [G]`` bool -> ``[G]`` bool, with min(wanted, G) entries True.
    """
    if informative.dim() != 1 or wanted < 0:
        raise ValueError(f"need informative [G] and wanted >= 0, got shape {tuple(informative.shape)} and {wanted}")
    taken_informative = informative & (informative.cumsum(0) <= wanted)
    room = wanted - int(taken_informative.sum())
    filler = ~informative & ((~informative).cumsum(0) <= room)
    return taken_informative | filler
