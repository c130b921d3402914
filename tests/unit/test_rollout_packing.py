"""pack_generation: a finished grant's vLLM outputs as one PackedBatch.

The outputs are stand-ins with the fields vLLM's RequestOutput has; the engine that produces real
ones is exercised end to end (tests/e2e/test_inflight_update.py and the pipeline tests).
"""

from types import SimpleNamespace

import numpy as np

from protocol.codec import decode, encode
from protocol.messages import PromptSpec, SamplingSpec, WorkGrant
from rollout.engine import _Generation, pack_generation


def completion(tokens: list[int], logprobs: list[float], finish_reason: str) -> SimpleNamespace:
    """One of vLLM's CompletionOutputs: sampled tokens, each with its log-prob, and why it ended."""
    return SimpleNamespace(token_ids=tokens, finish_reason=finish_reason,
                           logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(tokens, logprobs)])


def test_samples_packed_in_grant_order_with_their_versions():
    grant = WorkGrant(grant_id=5, step=3, min_weight_version=2, n_samples=2,
                      sampling=SamplingSpec(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=4,
                                            stop_token_ids=[], seed=None),
                      prompts=[PromptSpec(prompt_id=7, token_ids=np.array([1, 4, 5]), label="9"),
                               PromptSpec(prompt_id=8, token_ids=np.array([1, 6]), label=None)])
    generation = _Generation(grant, first_version=2, engine_seconds=0.5)
    # the second prompt finished first, after version 3 had landed; the first one before it
    generation.finished[1] = (SimpleNamespace(outputs=[completion([9, 2], [-0.5, -0.25], "stop"),
                                                       completion([10], [-1.0], "length")]), 3)
    generation.finished[0] = (SimpleNamespace(outputs=[completion([11, 12, 2], [-0.1, -0.2, 1e-7], "stop"),
                                                       completion([13], [-2.0], "abort")]), 2)

    batch = pack_generation(generation)

    assert (batch.grant_id, batch.step, batch.gen_seconds) == (5, 3, 0.5)
    assert batch.tokens.tolist() == [1, 4, 5, 11, 12, 2, 1, 4, 5, 13, 1, 6, 9, 2, 1, 6, 10]
    assert batch.cu_seqlens.tolist() == [0, 6, 10, 14, 17]
    assert batch.prompt_lens.tolist() == [3, 3, 2, 2]
    assert batch.loss_mask.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 1]
    # 0 on prompts; vLLM's rounding above 0 (1e-7) clamped to a valid log-prob
    assert batch.behaviour_logprobs.tolist() == np.array(
        [0, 0, 0, -0.1, -0.2, 0, 0, 0, 0, -2.0, 0, 0, -0.5, -0.25, 0, 0, -1.0], np.float32).tolist()
    assert batch.prompt_ids.tolist() == [7, 7, 8, 8] and batch.sample_indices.tolist() == [0, 1, 0, 1]
    assert batch.weight_versions.tolist() == [2, 2, 2, 2]
    assert batch.last_weight_versions.tolist() == [2, 2, 3, 3]
    assert batch.finish_reasons == ["stop", "abort", "stop", "length"]
    assert batch.labels == ["9", "9", None, None]
    wire = decode(encode(batch, run_id="r", producer_id="rollout-0", seq=1, weight_version=3)).body
    assert wire.last_weight_versions.tolist() == [2, 2, 3, 3]
