"""The whole loop on real components: vLLM rollouts -> ZeroMQ -> DeepSpeed learner -> weights back."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import leftover_processes

pytestmark = pytest.mark.e2e


def _mean(values):
    return sum(values) / len(values)


def test_default_job_learns_and_cleans_up(run_local):
    """GRPO with two rollout processes, one step off-policy: the reward clearly rises."""
    result = run_local()  # the default job as the README runs it (150 steps)
    assert result.returncode == 0, result.output[-3000:]
    metrics = result.metrics
    assert len(metrics) == 150
    first, last = _mean([m["reward_mean"] for m in metrics[:15]]), _mean([m["reward_mean"] for m in metrics[-15:]])
    assert last > first + 0.08, f"reward did not rise: first 15 steps {first:.3f}, last 15 steps {last:.3f}"
    assert max(m["staleness_max"] for m in metrics) <= 1
    applied = result.summary["applied_versions"]
    assert len(applied) == 2, applied
    for producer, versions in applied.items():
        assert len(set(versions)) >= 2, f"{producer} applied only {versions}"
    assert (result.run_dir / "final" / "config.json").exists()
    assert not leftover_processes(result.run_id)


def test_ppo_with_critic_reference_and_sync_mode(run_local):
    """GAE with a critic, a KL penalty against the reference model, fully synchronous (staleness 0)."""
    result = run_local("--train.num_steps", "6", "--algo.advantage_estimator", "gae", "--algo.kl_coef", "0.05",
                       "--algo.kl_mode", "reward", "--train.max_staleness", "0", "--rollout.num_processes", "1",
                       "--output.save_final", "false")
    assert result.returncode == 0, result.output[-3000:]
    metrics = result.metrics
    assert len(metrics) == 6
    assert all(m["staleness_max"] == 0 for m in metrics)
    assert all("value_loss" in m for m in metrics)
    assert metrics[-1]["kl_ref"] > 0, "the policy moved, so its KL to the reference must be positive"
    assert not leftover_processes(result.run_id)
