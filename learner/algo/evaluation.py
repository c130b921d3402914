"""Held-out evaluation metrics over groups of samples of the same prompt."""

from __future__ import annotations

import torch

__all__ = ["pass_at_k"]


def pass_at_k(passed: torch.Tensor, k: int) -> torch.Tensor:
    """Unbiased pass@k of each prompt (Chen et al. 2021): the chance that at least one of k samples
    drawn without replacement from a prompt's n samples passes.

    Shapes: ``passed [P, n]`` (bool: sample j of prompt p passed) -> ``[P]`` (float32). With c the
    passing samples of a prompt (1 <= k <= n):

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    (the product form needs no large binomials; it is 1 when n - c < k, as a factor is then 0).
    """
    if passed.dim() != 2:
        raise ValueError(f"passed must be [P, n], got shape {tuple(passed.shape)}")
    n = passed.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n = {n}, got k = {k}")
    failed = n - passed.sum(dim=1, dtype=torch.int64)  # [P]
    i = torch.arange(1, n + 1, dtype=torch.float64)  # [n]
    factors = torch.where(i[None, :] > failed[:, None], 1.0 - k / i[None, :], torch.ones((), dtype=torch.float64))
    return (1.0 - factors.prod(dim=1)).to(torch.float32)
