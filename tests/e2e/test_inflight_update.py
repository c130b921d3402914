"""A weight update that reaches a running vLLM engine mid-generation (real engine, no learner).

Version 0 is the tiny model with a sharpened output layer; version 1 zeroes the output layer, so
every token it samples has log-prob exactly -log(vocab). Sequences running when version 1 lands
must go on (no draining, no restart), switch to the new weights for good (no token after the
first uniform one comes from the old weights), and be tagged with both versions.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.tiny import TinyModelSpec, build_tiny_model, build_tokenizer
from learner.weight_sync import build_weight_update
from protocol.codec import decode, encode
from protocol.config import RolloutConfig
from protocol.messages import PromptSpec, SamplingSpec, WorkGrant
from rollout.engine import VLLMGenerator
from tests.e2e.conftest import vllm_engine

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
