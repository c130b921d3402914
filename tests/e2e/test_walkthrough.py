"""The README's "bring your own model and data" walkthrough, run as written in an empty directory
outside the repository (the README's block is the script: the two cannot drift apart)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT

pytestmark = pytest.mark.e2e

MARKER = "<!-- walkthrough:"


def walkthrough_script() -> str:
    """The bash block that follows the walkthrough marker in the README."""
    readme = (ROOT / "README.md").read_text()
    after = readme[readme.index(MARKER):].split("\n", 1)[1]
    assert after.startswith("```bash\n"), "the walkthrough's block must follow its marker line"
    return after[len("```bash\n"):after.index("\n```") + 1]


def test_walkthrough_runs_as_written(tmp_path):
    script = walkthrough_script()
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "STREAMRLHF": str(ROOT)})
    run = tmp_path / "my-run"
    if proc.returncode != 0:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run / "out" / "logs").glob("*.log")))
        print(proc.stdout[-6000:], proc.stderr[-6000:], logs, file=sys.stderr)
    assert proc.returncode == 0
    metrics = [json.loads(line) for line in (run / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(20))
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == metrics[-1]  # the last line printed
    assert (run / "out" / "final" / "config.json").is_file()
    # the prompts came from the CSV file, scored by its reward function against its answer column
    logged = [json.loads(line) for line in (run / "out" / "samples.jsonl").read_text().splitlines()]
    assert logged
    for sample in logged:
        a, b = map(int, re.fullmatch(r"(\d)\+(\d)=", sample["prompt"]).groups())
        assert sample["reward"] == (1.0 if sample["completion"].strip() == str(a + b) else 0.0), sample
    assert sum(m["reward_fn_exact_sum_mean"] for m in metrics) > 0
