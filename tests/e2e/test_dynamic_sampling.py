"""DAPO's dynamic sampling on real components: uninformative groups dropped, steps kept full by more
grants within the staleness bound, every prompt handed out once, and the run replayed from its
recording (steps collected in several rounds)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e.conftest import ROOT, leftover_processes

pytestmark = pytest.mark.e2e

STEPS, PROMPTS, MOST = 4, 16, 24  # 4 steps of at most 24 prompts: fewer than the task's 100, no prompt twice

# Prompts whose first operand is even always score 0.5: their groups carry no gradient.
REWARD = '''
from learner.tasks.arithmetic import arithmetic_reward


def half_constant(prompts, completions, labels):
    rewards = arithmetic_reward(prompts, completions, labels)
    return [0.5 if int(p.strip()[0]) % 2 == 0 else r for p, r in zip(prompts, rewards)]
'''


def test_uninformative_groups_are_dropped_and_steps_kept_full(run_local, tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD)
    result = run_local("--train.num_steps", str(STEPS), "--algo.dynamic_sampling", "true",
                       "--algo.dynamic_sampling_max_prompts", str(MOST / PROMPTS),
                       "--reward.function", f"{reward}:half_constant", "--output.record", "true",
                       "--output.save_final", "false")
    assert result.returncode == 0, result.output[-3000:]
    rows = result.metrics
    assert len(rows) == STEPS
    for r in rows:
        groups = r["dynamic_sampling/groups"]
        assert PROMPTS <= groups <= MOST and r["sequences"] == PROMPTS * 8
        assert r["dynamic_sampling/groups_dropped"] == groups - PROMPTS
        assert r["dynamic_sampling/prompts_generated_per_trained"] == groups / PROMPTS
        assert r["dynamic_sampling/groups_informative"] <= groups and r["staleness_max"] <= 1
    assert sum(r["dynamic_sampling/groups_dropped"] for r in rows) > 0
    trained = [json.loads(line)["prompt_ids"] for line in (result.run_dir / "steps.jsonl").read_text().splitlines()]
    assert [len(ids) for ids in trained] == [PROMPTS] * STEPS
    every = [p for ids in trained for p in ids]
    assert len(every) == len(set(every)), "a prompt was handed out twice"
    for r, ids in zip(rows, trained):  # prompt a+b has id 10a + b: an even a only fills a step short of others
        assert sum(p // 10 % 2 == 0 for p in ids) <= r["dynamic_sampling/groups_filled"]
    assert not leftover_processes(result.run_id)

    replay_dir = tmp_path / "replay"
    replay = subprocess.run(["bash", str(ROOT / "launch/replay.sh"), str(result.run_dir / "recording"),
                             "--output.dir", str(replay_dir), "--output.progress", "false"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert replay.returncode == 0, replay.stdout[-3000:] + replay.stderr[-3000:]
    replayed = [json.loads(line) for line in (replay_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["policy_loss"], r["dynamic_sampling/groups"]) for r in replayed] == \
        [(r["policy_loss"], r["dynamic_sampling/groups"]) for r in rows]
