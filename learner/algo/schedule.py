"""Learning-rate schedule: the multiplier of a base learning rate at each training step."""

from __future__ import annotations

import math

from protocol.config import LR_SCHEDULES

__all__ = ["LR_SCHEDULES", "lr_at"]


def lr_at(step: int, *, num_steps: int, warmup_steps: int = 0, schedule: str = "constant",
          min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate for training step ``step`` (0-based) of ``num_steps``.

    With W = ``warmup_steps`` and m = ``min_lr_ratio``:

        step < W:   (step + 1) / W                            linear warm-up, reaching 1 at step W - 1
        otherwise:  p = (step - W) / (num_steps - W), or 1 from num_steps on   (0 right after warm-up)
                    constant:  1
                    linear:    m + (1 - m) * (1 - p)
                    cosine:    m + (1 - m) * (1 + cos(pi * p)) / 2

    so a decaying schedule reaches m at ``step == num_steps`` (one past the last step trained) and stays
    there. Warm-up starts at 1/W rather than 0, so that no step is trained at a zero learning rate.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if step < 0 or num_steps < 1 or warmup_steps < 0:
        raise ValueError(f"need step >= 0, num_steps >= 1 and warmup_steps >= 0, got step {step}, "
                         f"num_steps {num_steps}, warmup_steps {warmup_steps}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = 1.0 if step >= num_steps else (step - warmup_steps) / (num_steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
    return min_lr_ratio + (1 - min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2
