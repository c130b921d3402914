"""Valid PackedBatch answers to WorkGrants, and the driver's way of taking them from a hub, shared by
the unit tests that play a rollout."""

from __future__ import annotations

import numpy as np

from protocol.messages import PackedBatch, WorkGrant


def answer(grant: WorkGrant, version: int, *, grant_id: int | None = None, prompt_ids=None,
           sample_indices=None, first_token: int | None = None,
           last_version: int | None = None, evaluation: bool | None = None) -> PackedBatch:
    """A valid PackedBatch for `grant`: each prompt n times, sample indices 0..n-1, prompt tokens first.
    Keyword arguments break one property on purpose."""
    tokens, cu, plens, mask, lps, pids, sidx, labels = [], [0], [], [], [], [], [], []
    for spec in grant.prompts:
        for s in range(grant.n_samples):
            prompt = spec.token_ids.tolist()
            if first_token is not None:
                prompt[0] = first_token
            response = [10 + s, 2]
            tokens += prompt + response
            cu.append(len(tokens))
            plens.append(len(prompt))
            mask += [0] * len(prompt) + [1] * len(response)
            lps += [0.0] * len(prompt) + [-0.5] * len(response)
            pids.append(spec.prompt_id)
            sidx.append(s)
            labels.append(spec.label)
    b = len(pids)
    return PackedBatch(
        grant_id=grant.grant_id if grant_id is None else grant_id, step=grant.step, tokens=np.array(tokens),
        cu_seqlens=np.array(cu), prompt_lens=np.array(plens), loss_mask=np.array(mask),
        behaviour_logprobs=np.array(lps), prompt_ids=np.array(pids if prompt_ids is None else prompt_ids),
        sample_indices=np.array(sidx if sample_indices is None else sample_indices, np.int32),
        weight_versions=np.full(b, version), last_weight_versions=np.full(b, version if last_version is None else last_version),
        finish_reasons=["stop"] * b, labels=labels, gen_seconds=0.25,
        evaluation=grant.evaluation if evaluation is None else evaluation)


async def training_batches(hub, step: int, expected: int, timeout_s: float) -> list[PackedBatch]:
    """The training batches of `step`, taken from `hub.arrivals` as the learner's driver takes them
    (evaluation batches that come meanwhile left out), in grant order."""
    batches = [b async for b in hub.arrivals(step, expected, timeout_s) if not b.evaluation]
    return sorted(batches, key=lambda b: b.grant_id)
