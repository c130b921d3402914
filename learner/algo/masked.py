"""Masked reductions over padded per-token tensors.

Every function here takes a value tensor ``x`` and a ``mask`` of the same shape
(bool, or 0/1 float/int; nonzero = real element). Masked elements are *selected
out* with ``torch.where`` rather than multiplied by zero, so garbage (NaN/inf)
in padding never leaks into results or gradients.
"""

from __future__ import annotations

import torch

__all__ = ["require_same_shape", "as_bool_mask", "masked_sum", "masked_mean", "masked_whiten"]

Dim = int | tuple[int, ...] | None


def require_same_shape(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``tensor.shape == ref.shape``."""
    if tensor.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but must match {ref_name} {tuple(ref.shape)}"
        )


def as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """Return ``mask`` as a bool tensor (``mask != 0`` for numeric masks), same shape."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Sum of ``x`` over elements where ``mask`` is set.

    Shapes: ``x`` and ``mask`` identical (e.g. ``[B, A]``); result has ``dim``
    reduced (a 0-d tensor when ``dim is None``).
    Formula: ``sum_i x_i * [mask_i]`` (masked elements are excluded, not multiplied).
    """
    require_same_shape("mask", mask, "x", x)
    selected = torch.where(as_bool_mask(mask), x, torch.zeros_like(x))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Mean of ``x`` over elements where ``mask`` is set; 0 (not NaN) where none is set.

    Shapes as :func:`masked_sum`.
    Formula: ``masked_sum(x, mask, dim) / max(count(mask, dim), 1)``; an empty
    mask gives sum 0 over count 1, i.e. 0.
    """
    require_same_shape("mask", mask, "x", x)
    bool_mask = as_bool_mask(mask)
    count = bool_mask.sum() if dim is None else bool_mask.sum(dim=dim)
    return masked_sum(x, bool_mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to zero mean / unit variance using only the masked-in elements.

    Shapes: ``x`` and ``mask`` identical; result same shape, 0 at masked positions.
    Statistics are taken over *all* valid elements jointly (e.g. every valid token
    of the batch), with the POPULATION variance (divided by n, as OpenRLHF whitens
    GAE and REINFORCE++ advantages). The group std of
    :func:`learner.algo.advantages.grpo_advantages` is unbiased instead
    (``torch.std``), also as in OpenRLHF.

        n     = count(mask)
        mu    = sum(x * mask) / n
        var   = sum((x - mu)^2 * mask) / n             (n floored at 1: an empty mask gives var 0)
        out   = (x - mu) / sqrt(var + eps)             if shift_mean
        out   = (x - mu) / sqrt(var + eps) + mu        otherwise (rescale only, keep the mean)
    """
    require_same_shape("mask", mask, "x", x)
    bool_mask = as_bool_mask(mask)
    mean = masked_mean(x, bool_mask)
    centered = x - mean
    variance = masked_mean(centered * centered, bool_mask)
    whitened = centered * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(bool_mask, whitened, torch.zeros_like(whitened))
