"""What a user sees first from the Python entry points: a clean --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["learner", "rollout", "protocol.keys", "learner.plot"])
def test_help_is_the_usage_alone(module):
    """No DeepSpeed accelerator notice (learner), no runpy RuntimeWarning (protocol.keys), the
    command's own name as prog (learner.plot)."""
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: python -m {module} ")
    assert out.stderr == ""
