"""The benchmark-only virtualenv for TRL (bench/.venv-trl, gitignored), created on first use.

TRL is not a dependency of this project: bench/bench_trl.py runs TRL's GRPOTrainer in this
separate environment, as a subprocess (bench/trl_runner.py), so nothing of TRL reaches .venv or
pyproject.toml. torch is pinned to the CPU build the project's own environment uses (a plain
`torch` requirement would pull a multi-GB CUDA build); TRL is pinned so that reruns compare the
same code. Change the list here, and the environment is updated on the next run.

    python bench/trl_venv.py      # create or update it now (bench_trl.py does this itself)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".venv-trl"
# trl 1.13.0 imports requests in trl.generation.vllm_client (loaded by GRPOTrainer even without vLLM)
# without declaring it.
REQUIREMENTS = ["torch==2.13.0", "trl==1.13.0", "requests"]
STAMP = VENV / ".bench-installed.json"


def trl_python() -> Path:
    """The TRL environment's python, creating or updating the environment when its pins changed."""
    python = VENV / "bin" / "python"
    if STAMP.exists() and json.loads(STAMP.read_text()) == REQUIREMENTS and python.exists():
        return python
    started = time.perf_counter()
    print(f"bench: creating the TRL environment {VENV} ({' '.join(REQUIREMENTS)}), once", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True)
    STAMP.write_text(json.dumps(REQUIREMENTS))
    print(f"bench: TRL environment ready in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return python


if __name__ == "__main__":
    print(trl_python())
