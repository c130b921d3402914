"""A 2-rank DeepSpeed learner (ZeRO-2 and ZeRO-3) fed by two real vLLM rollouts, sync and async:
the default job's 150 steps, so that the reward must rise as it does with one rank."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from tests.e2e.conftest import assert_reward_rose, leftover_processes

pytestmark = pytest.mark.e2e

STEPS, PROMPTS, SAMPLES = 150, 16, 8  # configs/tiny.yaml


@pytest.mark.parametrize(("zero_stage", "max_staleness"), [(2, 0), (3, 2)])
def test_two_rank_learner(run_local, zero_stage, max_staleness):
    result = run_local("--train.learner_ranks", "2", "--train.zero_stage", str(zero_stage),
                       "--train.max_staleness", str(max_staleness), "--rollout.num_processes", "2")
    assert result.returncode == 0, result.output[-3000:]
    metrics = result.metrics
    assert [m["step"] for m in metrics] == list(range(STEPS))
    assert_reward_rose(metrics)
    # every sample of every step was trained on, split across the two ranks
    assert all(m["sequences"] == PROMPTS * SAMPLES for m in metrics)
    assert max(m["staleness_max"] for m in metrics) <= max_staleness
    if max_staleness == 0:
        assert all(m["staleness_max"] == 0 for m in metrics)
    summary = result.summary
    assert summary["discarded_batches"] == 0 and summary["rejected_messages"] == 0
    assert len(summary["applied_versions"]) == 2
    for producer, versions in summary["applied_versions"].items():
        # every published version reached every rollout with a matching fingerprint; the last
        # max_staleness of them are needed by no step, and the run may end before they are acked
        assert set(range(STEPS - max_staleness)) <= set(versions), f"{producer} applied {versions}"
    # the saved actor is complete (under ZeRO-3 it had to be gathered from both ranks)
    with safe_open(str(result.run_dir / "final" / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["model.embed_tokens.weight"] == (128, 128)
    assert shapes["lm_head.weight"] == (128, 128)
    assert not leftover_processes(result.run_id)


def test_zero3_ranks_with_unequal_micro_batch_counts_stay_in_lockstep(run_local):
    """9 prompt groups over 2 ranks, one sequence per micro-batch, every parameter partitioned: the
    ranks hold different numbers of micro-batches, yet each forward and backward gathers parameters
    collectively. The rank with fewer runs idle passes instead of leaving the other waiting forever."""
    result = run_local("--train.learner_ranks", "2", "--train.zero_stage", "3", "--train.num_steps", "3",
                       "--train.zero3_persistence_threshold", "0", "--train.micro_batch_tokens", "16",
                       "--train.prompts_per_step", "9", "--rollout.prompts_per_grant", "3",
                       "--transport.batch_timeout_s", "120", "--output.save_final", "false", timeout=400)
    assert result.returncode == 0, result.output[-3000:]
    assert [m["sequences"] for m in result.metrics] == [9 * SAMPLES] * 3
    # each rank's peak memory; a step reports the larger of the two so far
    peaks = result.summary["learner_peak_rss_mib"]
    assert len(peaks) == 2 and min(peaks) > 100
    assert 100 < result.metrics[-1]["peak_rss_mib_max"] <= max(peaks)
    assert not leftover_processes(result.run_id)
