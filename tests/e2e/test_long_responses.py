"""Responses of 1024 tokens through the whole pipeline (vLLM with rollout.min_new_tokens, ZeroMQ,
DeepSpeed), with and without gradient checkpointing: the run finishes and records the learner's
peak memory."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tests.e2e.conftest import leftover_processes

pytestmark = pytest.mark.e2e

RESPONSE_TOKENS = 1024
STEPS = 3


# An untrained model's long responses all score 0 on the long-tail task, which would leave every
# advantage and gradient at 0: this reward varies from sample to sample.
REWARD = """
def distinct_words(prompts, completions, labels):
    return [len(set(c.split())) / 100 for c in completions]
"""


@pytest.fixture(scope="module")
def long_context_task(tmp_path_factory):
    """The tiny long-tail model (untrained) with room for 2048 positions, 16 long-tail prompts and a
    reward that differs between samples."""
    from learner.tasks.longtail import make_rows
    from learner.tiny.model import build_tiny_model, sized_spec

    out = tmp_path_factory.mktemp("long")
    model = build_tiny_model(out / "model", replace(sized_spec("tiny"), max_position_embeddings=2048))
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in make_rows(seed=0, count=16)))
    (out / "reward.py").write_text(REWARD)
    return ["--model.path", str(model), "--data.path", str(prompts),
            "--reward.function", f"{out / 'reward.py'}:distinct_words"]


@pytest.mark.parametrize("options", [
    [],
    ["--model.gradient_checkpointing", "true", "--algo.advantage_estimator", "gae"],  # the critic checkpoints too
], ids=["default", "gradient_checkpointing"])
def test_long_responses_train_and_record_the_learners_peak_memory(run_local, long_context_task, options):
    result = run_local(*long_context_task, *options,
                       "--rollout.max_new_tokens", str(RESPONSE_TOKENS), "--rollout.min_new_tokens", str(RESPONSE_TOKENS),
                       "--rollout.max_model_len", str(RESPONSE_TOKENS + 16), "--rollout.n_samples_per_prompt", "4",
                       "--rollout.prompts_per_grant", "2", "--train.prompts_per_step", "2",
                       "--train.num_steps", str(STEPS), "--output.save_final", "false", timeout=300)
    assert result.returncode == 0, result.output[-3000:]
    metrics = result.metrics
    assert len(metrics) == STEPS
    for m in metrics:
        # every response ran to its full length: 8 x about 1030 tokens, two micro-batches of 4096
        assert m["response_len"] == RESPONSE_TOKENS and m["truncated_fraction"] == 1.0
        assert m["tokens"] > 8 * RESPONSE_TOKENS and m["grad_norm"] > 0
        if options:
            assert "value_loss" in m
    peaks = result.summary["learner_peak_rss_mib"]
    assert len(peaks) == 1 and peaks[0] > 100
    assert 100 < metrics[-1]["peak_rss_mib_max"] <= peaks[0]
    assert not leftover_processes(result.run_id)
