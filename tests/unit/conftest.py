"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from learner.training.distributed import init_distributed


@pytest.fixture(scope="session")
def learner_rank():
    """One learner rank (gloo) for every test that builds a PPOTrainer: DeepSpeed keeps the first
    process group it sees, so the group is started once per session, not once per module."""
    init_distributed()
    yield
    if dist.is_initialized():  # (a test that ran a learner in this process may have ended it)
        dist.destroy_process_group()
