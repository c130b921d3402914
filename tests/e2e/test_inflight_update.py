"""A weight update that reaches a running vLLM engine mid-generation (real engine, no learner).

Version 0 is the tiny model with a sharpened output layer; version 1 zeroes the output layer, so
every token it samples has log-prob exactly -log(vocab). Sequences running when version 1 lands
must go on (no draining, no restart), switch to the new weights for good (no token after the
first uniform one comes from the old weights), and be tagged with both versions.

Then each rollout.inflight_update mode against the learner's own log-probs: version 1 negates the
attention's key and value projections, so a token's log-prob tells whether the KV cache of the
tokens before it was computed under version 0 or 1.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.models.actor import Actor
from learner.tiny.model import TinyModelSpec, build_tiny_model, build_tokenizer, remove_eos
from learner.training.weight_sync import build_weight_update
from protocol.codec import decode, encode
from protocol.config import RolloutConfig
from protocol.messages import PromptSpec, SamplingSpec, WorkGrant
from rollout.engine import VLLMGenerator
from tests.e2e.conftest import addition_task_flags, leftover_processes, vllm_engine

pytestmark = pytest.mark.e2e

MAX_NEW_TOKENS = 1000  # far longer than an update takes to land: version 0 never stops on its own


def make_grant(grant_id: int, min_version: int, *, prompts: int = 2, n_samples: int = 2,
               max_new_tokens: int = MAX_NEW_TOKENS) -> WorkGrant:
    sampling = SamplingSpec(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=max_new_tokens,
                            stop_token_ids=[], seed=7)
    specs = [PromptSpec(prompt_id=10 * grant_id + i, token_ids=np.array([1, 5 + i, 6, 7]), label=None)
             for i in range(prompts)]
    return WorkGrant(grant_id=grant_id, step=0, min_weight_version=min_version, n_samples=n_samples,
                     sampling=sampling, prompts=specs)


@pytest.fixture(scope="module")
def engine_and_model(tmp_path_factory):
    """One real engine for the module (start-up dominates): the tiny model, applied at version -1."""
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny"), TinyModelSpec(max_position_embeddings=1024))
    with vllm_engine(model_dir, RolloutConfig(max_model_len=1024)) as engine:
        yield engine, model_dir


def test_update_lands_between_engine_steps_and_running_requests_go_on(engine_and_model, tmp_path):
    engine, model_dir = engine_and_model
    state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    vocab = state["lm_head.weight"].shape[0]
    # Version 0 is peaked (sampled log-probs far from uniform) and never ends a response: the EOS
    # logit stays 0 while the largest of the others is about +17.
    sharp_head = state["lm_head.weight"] * 30
    sharp_head[build_tokenizer().eos_token_id] = 0
    sharp = {**state, "lm_head.weight": sharp_head}
    flat = {**state, "lm_head.weight": torch.zeros_like(state["lm_head.weight"])}
    updates = [build_weight_update(v, weights.items(), dtype=torch.float32, bucket_bytes=1 << 20)
               for v, weights in enumerate([sharp, flat])]
    check_update_in_flight(engine, updates, vocab, tmp_path)


def check_update_in_flight(engine: VLLMGenerator, updates, vocab: int, staging) -> None:
    assert engine.apply_weights(updates[0], str(staging), 60) == updates[0].fingerprint

    engine.submit(make_grant(0, min_version=0))
    batches = engine.step()  # the first engine outputs: the requests are running
    assert batches == [] and engine.busy
    started = time.perf_counter()
    assert engine.apply_weights(updates[1], str(staging), 60) == updates[1].fingerprint
    apply_s = time.perf_counter() - started
    engine.submit(make_grant(1, min_version=1))  # a grant admitted after the update: version 1 only
    while engine.busy:
        batches += engine.step()

    assert sorted(b.grant_id for b in batches) == [0, 1]
    for batch in batches:  # valid on the wire
        assert decode(encode(batch, run_id="r", producer_id="p", seq=1, weight_version=1)).body.grant_id == batch.grant_id
    spanning, admitted_after = sorted(batches, key=lambda b: b.grant_id)
    uniform = -math.log(vocab)

    assert spanning.weight_versions.tolist() == [0] * 4
    assert spanning.last_weight_versions.tolist() == [1] * 4, f"update took {apply_s:.3f} s"
    for b in range(spanning.num_sequences):
        start, stop = spanning.cu_seqlens[b] + spanning.prompt_lens[b], spanning.cu_seqlens[b + 1]
        is_uniform = np.abs(spanning.behaviour_logprobs[start:stop] - uniform) < 1e-4
        switch = int(np.argmax(is_uniform)) if is_uniform.any() else len(is_uniform)
        assert 0 < switch < len(is_uniform), f"sequence {b}: no tokens from both versions ({switch} of {len(is_uniform)})"
        assert is_uniform[switch:].all(), f"sequence {b}: a token after the switch came from the old weights"

    assert admitted_after.weight_versions.tolist() == admitted_after.last_weight_versions.tolist() == [1] * 4
    response = admitted_after.loss_mask.astype(bool)
    assert np.allclose(admitted_after.behaviour_logprobs[response], uniform, atol=1e-4)

    # grants voided mid-generation (a lost learner): aborted, and the engine goes on with new work
    engine.submit(make_grant(2, min_version=1))
    assert engine.step() == [] and engine.busy
    assert engine.cancel_all() == 1 and not engine.busy
    engine.submit(make_grant(3, min_version=1))
    after_cancel = []
    while engine.busy:
        after_cancel += engine.step()
    assert [b.grant_id for b in after_cancel] == [3]


def test_samples_of_a_near_uniform_policy_draw_independent_randomness(engine_and_model):
    """Two grants x 4 prompts x 8 samples from the (near-)uniform policy: every response differs,
    and samples of different prompts do not share their tokens. With seeds shared across prompts
    and grants (seed + grant id per request, vLLM's seed + i per sample), a uniform policy repeats
    the same draws: most responses coincide and the first tokens agree across prompts."""
    engine, _ = engine_and_model
    for grant_id in (4, 5):
        engine.submit(make_grant(grant_id, min_version=-1, prompts=4, n_samples=8, max_new_tokens=6))
    batches = []
    while engine.busy:
        batches += engine.step()
    responses = [tuple(b.tokens[b.cu_seqlens[i] + b.prompt_lens[i]: b.cu_seqlens[i + 1]].tolist())
                 for b in sorted(batches, key=lambda b: b.grant_id) for i in range(b.num_sequences)]
    assert len(responses) == 64
    assert len(set(responses)) == 64, f"only {len(set(responses))} distinct responses of 64"
    # sample i of prompt p vs sample i of every other prompt (same position in their requests)
    firsts = np.array([r[0] for r in responses]).reshape(8, 8)  # [request, sample index]
    shared = np.mean([(firsts[a] == firsts[b]).mean() for a in range(8) for b in range(a + 1, 8)])
    assert shared < 0.25, f"first tokens agree across prompts {shared:.0%} of the time"


TOKENS_BEFORE_UPDATE = 8  # engine steps (one token each) between the grant's start and the update
MODE_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def kv_sensitive_versions(tmp_path_factory):
    """A tiny model that never ends a response, and two versions of it: 0 with a sharpened output
    layer, 1 with every layer's key and value projections negated as well. Returns the model's
    directory, the HF model to score with, the versions' weights and their updates."""
    model_dir = remove_eos(build_tiny_model(tmp_path_factory.mktemp("endless"),
                                            TinyModelSpec(max_position_embeddings=1024)))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    v0 = {k: t.clone() for k, t in model.state_dict().items()}
    v0["lm_head.weight"] *= 10
    v1 = {k: -t if k.endswith(("k_proj.weight", "v_proj.weight")) else t for k, t in v0.items()}
    updates = [build_weight_update(v, w.items(), dtype=torch.float32, bucket_bytes=1 << 20)
               for v, w in enumerate([v0, v1])]
    return model_dir, model, [v0, v1], updates


@pytest.fixture(scope="module", params=["recompute", "keep", "finish"])
def mode_engine(request, kv_sensitive_versions):
    with vllm_engine(kv_sensitive_versions[0], RolloutConfig(max_model_len=1024,
                                                                inflight_update=request.param)) as engine:
        yield engine


def learner_logprobs(model, weights: dict, batch) -> np.ndarray:
    """The learner's log-probs (Actor, packed) of every token of `batch` under `weights`."""
    model.load_state_dict(weights)
    with torch.no_grad():
        return Actor(model).eval()(torch.as_tensor(batch.tokens, dtype=torch.long),
                                   cu_seqlens=torch.as_tensor(batch.cu_seqlens))["log_probs"].numpy()


def responses(batch, values: np.ndarray) -> list[np.ndarray]:
    """`values` (aligned to batch.tokens) cut into each sequence's response."""
    return [values[batch.cu_seqlens[b] + batch.prompt_lens[b]: batch.cu_seqlens[b + 1]]
            for b in range(batch.num_sequences)]


def test_inflight_update_modes_tag_and_score_tokens_as_documented(mode_engine, kv_sensitive_versions, tmp_path):
    """recompute: the tokens after the update are the new weights' over the whole context; keep:
    sampled by the new weights over the old KV cache, so neither version's log-probs; finish: the
    running requests end under the old weights and are tagged with them alone. In every mode the
    tokens before the update are the old weights', and a grant admitted after it the new ones'."""
    engine, mode = mode_engine, mode_engine.inflight_update
    _, model, weights, updates = kv_sensitive_versions
    assert engine.apply_weights(updates[0], str(tmp_path), 60) == updates[0].fingerprint
    engine.submit(make_grant(0, min_version=0, max_new_tokens=MODE_NEW_TOKENS))
    batches = []
    for _ in range(TOKENS_BEFORE_UPDATE):
        batches += engine.step()
    assert batches == [] and engine.busy
    if mode == "finish":
        assert not engine.ready_for_weights
        with pytest.raises(RuntimeError, match="inflight_update finish"):
            engine.apply_weights(updates[1], str(tmp_path), 60)
        while not engine.ready_for_weights:
            batches += engine.step()
    assert engine.ready_for_weights
    assert engine.apply_weights(updates[1], str(tmp_path), 60) == updates[1].fingerprint
    engine.submit(make_grant(1, min_version=1, max_new_tokens=MODE_NEW_TOKENS))
    while engine.busy:
        batches += engine.step()

    spanning, admitted_after = sorted(batches, key=lambda b: b.grant_id)
    assert spanning.weight_versions.tolist() == [0] * 4
    assert spanning.last_weight_versions.tolist() == [0 if mode == "finish" else 1] * 4
    assert admitted_after.weight_versions.tolist() == admitted_after.last_weight_versions.tolist() == [1] * 4
    for behaviour, new in zip(responses(admitted_after, admitted_after.behaviour_logprobs),
                              responses(admitted_after, learner_logprobs(model, weights[1], admitted_after))):
        np.testing.assert_allclose(behaviour, new, atol=1e-4)

    behaviour = responses(spanning, spanning.behaviour_logprobs)
    old = responses(spanning, learner_logprobs(model, weights[0], spanning))
    new = responses(spanning, learner_logprobs(model, weights[1], spanning))
    for b in range(spanning.num_sequences):
        assert len(behaviour[b]) == MODE_NEW_TOKENS  # no end-of-sequence token: every response is whole
        cut = len(behaviour[b]) if mode == "finish" else TOKENS_BEFORE_UPDATE
        np.testing.assert_allclose(behaviour[b][:cut], old[b][:cut], atol=1e-4)
        after, old_after, new_after = behaviour[b][cut:], old[b][cut:], new[b][cut:]
        if mode == "recompute":
            np.testing.assert_allclose(after, new_after, atol=1e-4)
        elif mode == "keep":  # the new weights over an old KV cache: neither version's distribution
            assert np.mean(np.abs(after - new_after) > 1e-2) > 0.9, np.abs(after - new_after)
            assert np.mean(np.abs(after - old_after) > 1e-2) > 0.9, np.abs(after - old_after)


@pytest.mark.parametrize("mode", ["keep", "finish"])
def test_pipeline_trains_with_each_inflight_update_mode(run_local, mode):
    """The whole loop with keep and finish (the rollout holds updates and grants in finish): it
    trains every step, the rollout applies the versions, and with finish no sample spans an update
    (with recompute most steps of this task have some)."""
    result = run_local(*addition_task_flags(), "--rollout.inflight_update", mode, "--train.num_steps", "12",
                       "--output.save_final", "false")
    assert result.returncode == 0, result.output[-3000:]
    metrics = result.metrics
    assert len(metrics) == 12
    assert max(m["staleness_max"] for m in metrics) <= 1
    for producer, versions in result.summary["applied_versions"].items():
        assert len(set(versions)) >= 2, f"{producer} applied only {versions}"
    if mode == "finish":
        assert [m["update_in_flight_fraction"] for m in metrics] == [0.0] * 12
    assert not leftover_processes(result.run_id)
