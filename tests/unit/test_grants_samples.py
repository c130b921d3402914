"""GrantPlanner (which prompts go out, under which staleness bound), StepSamples (a step's packed
samples as tensors), GroupDealer and the StepBroadcaster wire helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from learner.data.prompts import PromptDataset, PromptRow
from learner.training.distributed import GroupDealer
from learner.hub.grants import GrantPlanner
from learner.hub.step_samples import StepSamples
from learner.tiny.model import build_tokenizer
from protocol.buffers import frame_list_parts, split_frame_list
from protocol.codec import decode, encode
from protocol.config import load_config
from protocol.messages import PackedBatch, WorkGrant

N_ROWS = 20


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def make_rows(n: int = N_ROWS) -> list[PromptRow]:
    return [PromptRow(index=i, prompt=f"{i}+{i}=", label=str(2 * i)) for i in range(n)]


def make_dataset(tokenizer, seed: int = 0) -> PromptDataset:
    return PromptDataset(make_rows(), tokenizer, max_prompt_len=32, seed=seed, shuffle=True)


def make_cfg(**overrides):
    base = {"train.num_steps": "5", "train.prompts_per_step": "4", "rollout.prompts_per_grant": "2",
            "rollout.n_samples_per_prompt": "3", "train.max_staleness": "0"}
    base.update({k: str(v) for k, v in overrides.items()})
    return load_config(overrides=base)


def steps_of(grants: list[WorkGrant]) -> list[int]:
    return sorted({g.step for g in grants})


# --------------------------------------------------------------------------- GrantPlanner


def test_release_with_max_staleness_0_gives_only_step_0(tokenizer):
    planner = GrantPlanner(make_cfg(), make_dataset(tokenizer), [2])
    grants = planner.release(published_version=0)
    assert steps_of(grants) == [0]
    assert len(grants) == planner.granted(0) == 2
    assert all(g.min_weight_version == 0 for g in grants)
    assert planner.release(published_version=0) == []  # nothing new for the same version
    nxt = planner.release(published_version=1)
    assert steps_of(nxt) == [1] and all(g.min_weight_version == 1 for g in nxt)


def test_release_with_max_staleness_2_gives_steps_0_to_2(tokenizer):
    planner = GrantPlanner(make_cfg(**{"train.max_staleness": 2}), make_dataset(tokenizer), [2])
    grants = planner.release(published_version=0)
    assert steps_of(grants) == [0, 1, 2]
    assert len(grants) == 3 * 2 and [planner.granted(step) for step in range(3)] == [2, 2, 2]
    assert [g.step for g in grants] == sorted(g.step for g in grants)  # step order
    for g in grants:
        assert g.min_weight_version == max(0, g.step - 2)
    later = planner.release(published_version=1)
    assert steps_of(later) == [3] and all(g.min_weight_version == 1 for g in later)
    assert planner.release(published_version=1) == []


def test_release_never_beyond_last_step(tokenizer):
    planner = GrantPlanner(make_cfg(**{"train.num_steps": 2, "train.max_staleness": 2}), make_dataset(tokenizer), [])
    assert steps_of(planner.release(published_version=0)) == [0, 1]
    assert planner.release(published_version=1) == []
    assert planner.release(published_version=10) == []
    assert planner.next_step == 2


def test_release_catches_up_after_a_version_jump(tokenizer):
    planner = GrantPlanner(make_cfg(**{"train.max_staleness": 1}), make_dataset(tokenizer), [])
    assert steps_of(planner.release(0)) == [0, 1]
    grants = planner.release(3)
    assert steps_of(grants) == [2, 3, 4]
    assert [g.min_weight_version for g in grants] == [1, 1, 2, 2, 3, 3]


def test_grant_ids_unique_increasing_and_prompts_exactly_once(tokenizer):
    cfg = make_cfg(**{"train.max_staleness": 1})
    planner = GrantPlanner(cfg, make_dataset(tokenizer), [2])
    twin = make_dataset(tokenizer)  # same seed: the order the planner must follow
    grants = []
    for version in range(cfg.train.num_steps):
        grants += planner.release(published_version=version)
    ids = [g.grant_id for g in grants]
    assert ids == list(range(len(ids)))
    assert len(grants) == cfg.train.num_steps * 2
    all_ids = []
    for step in range(cfg.train.num_steps):
        step_grants = [g for g in grants if g.step == step]
        assert len(step_grants) == 2
        assert all(len(g.prompts) == cfg.rollout.prompts_per_grant for g in step_grants)
        got = [p.prompt_id for g in step_grants for p in g.prompts]
        expected = twin.next_batch(cfg.train.prompts_per_step)
        assert got == [p.prompt_id for p in expected]
        assert len(set(got)) == len(got)  # every prompt of the step exactly once
        for spec, enc in zip((p for g in step_grants for p in g.prompts), expected):
            assert spec.token_ids.dtype == np.int32 and spec.token_ids.tolist() == enc.token_ids
            assert spec.label == enc.label == str(2 * enc.prompt_id)
            assert spec.token_ids[0] == tokenizer.bos_token_id
        all_ids += got
    # 5 steps x 4 prompts = 20 rows = exactly one epoch: each row once
    assert sorted(all_ids) == list(range(N_ROWS))


def test_resume_continues_a_mixture_of_datasets_where_the_checkpoint_was(tokenizer):
    """Two datasets mixed 1:2, three steps planned ahead: a planner resumed after step 3 from what a
    checkpoint keeps hands out the prompts the uninterrupted run did from step 4 on."""
    rows = [PromptRow(index=i, prompt=f"{i}+1=", label=None, source=int(i >= 6)) for i in range(16)]
    cfg = make_cfg(**{"train.num_steps": 12, "train.max_staleness": 2})

    def planner():
        return GrantPlanner(cfg, PromptDataset(rows, tokenizer, max_prompt_len=32, seed=3, weights=[1, 2]), [])

    def plan(planner, versions, prompts):  # step -> its prompt ids, for the versions published
        for version in versions:
            for grant in planner.release(version):
                prompts.setdefault(grant.step, []).extend(p.prompt_id for p in grant.prompts)
        return prompts

    whole = planner()
    uninterrupted = plan(whole, range(4), {})  # steps 0-5 planned; the checkpoint after step 3 is taken
    state = json.loads(json.dumps(whole.state_after(3)))
    plan(whole, range(4, 12), uninterrupted)
    resumed = planner()
    resumed.resume(4, state)
    assert plan(resumed, range(4, 12), {}) == {step: ids for step, ids in uninterrupted.items() if step >= 4}
    assert {i for ids in uninterrupted.values() for i in ids} == set(range(16))


def test_sampling_spec_copied_from_config(tokenizer):
    cfg = make_cfg(**{"rollout.temperature": 0.7, "rollout.top_p": 0.9, "rollout.top_k": 5,
                      "rollout.max_new_tokens": 12, "rollout.seed": 3, "rollout.n_samples_per_prompt": 4,
                      "rollout.stop_strings": r'["\n", "?"]', "rollout.min_new_tokens": 2})
    stops = [2, 7]
    planner = GrantPlanner(cfg, make_dataset(tokenizer), stops)
    stops.append(99)  # the planner keeps its own copy
    grants = planner.release(0)
    for g in grants:
        sp = g.sampling
        assert (sp.temperature, sp.top_p, sp.top_k, sp.max_new_tokens, sp.seed) == (0.7, 0.9, 5, 12, 3)
        assert sp.stop_token_ids == [2, 7] and sp.stop_strings == ["\n", "?"] and sp.min_new_tokens == 2
        assert g.n_samples == 4
        # every grant is a valid wire message
        assert decode(encode(g, run_id="r", producer_id="learner", seq=0, weight_version=0)).body == g


# --------------------------------------------------------------------------- StepSamples


def make_packed(grant_id: int, seqs: list[tuple[list[int], list[int]]], prompt_ids: list[int],
                versions: list[int] | None = None, labels: list | None = None) -> PackedBatch:
    """A PackedBatch from (prompt tokens, response tokens) pairs, with distinct per-token values."""
    tokens, cu, plens, mask, lps = [], [0], [], [], []
    for prompt, response in seqs:
        tokens += prompt + response
        cu.append(len(tokens))
        plens.append(len(prompt))
        mask += [0] * len(prompt) + [1] * len(response)
        lps += [0.0] * len(prompt) + [-(k + 1) / 10 for k in range(len(response))]
    b = len(seqs)
    batch = PackedBatch(
        grant_id=grant_id, step=0, tokens=np.array(tokens), cu_seqlens=np.array(cu), prompt_lens=np.array(plens),
        loss_mask=np.array(mask), behaviour_logprobs=np.array(lps), prompt_ids=np.array(prompt_ids),
        sample_indices=np.zeros(b, np.int32), weight_versions=np.array(versions or [0] * b),
        last_weight_versions=np.array(versions or [0] * b),
        finish_reasons=["stop"] * (b - 1) + ["length"], labels=labels or [None] * b, gen_seconds=0.5)
    encode(batch, run_id="r", producer_id="p", seq=0, weight_version=0)  # valid on the wire
    return batch


@pytest.fixture
def two_batches():
    a = make_packed(0, [([1, 10, 11], [12, 13]), ([1, 10, 11], [14])], [7, 7], versions=[0, 1],
                    labels=["a", "a"])
    b = make_packed(1, [([1, 20], [21, 22, 23, 24]), ([1, 20], [25, 26]), ([1, 30, 31, 32], [33])],
                    [8, 8, 9], versions=[2, 2, 3], labels=["b", None, "c"])
    return a, b


def assert_samples_equal(x: StepSamples, y: StepSamples) -> None:
    for name in ("tokens", "cu_seqlens", "prompt_lens", "loss_mask", "behaviour_log_probs", "prompt_ids",
                 "weight_versions"):
        tx, ty = getattr(x, name), getattr(y, name)
        assert tx.dtype == ty.dtype, name
        assert torch.equal(tx, ty), name
    assert x.finish_reasons == y.finish_reasons
    assert x.labels == y.labels


def test_from_batches_offsets_cu_seqlens(two_batches):
    a, b = two_batches
    s = StepSamples.from_batches([a, b])
    assert s.num_sequences == 5 and s.num_tokens == a.num_tokens + b.num_tokens == 24
    assert s.cu_seqlens.tolist() == [0, 5, 9, 15, 19, 24]
    assert s.cu_seqlens.dtype == torch.int32
    assert s.tokens.dtype == torch.long and s.loss_mask.dtype == torch.bool
    assert s.behaviour_log_probs.dtype == torch.float32 and s.prompt_ids.dtype == torch.long
    assert s.tokens.tolist() == a.tokens.tolist() + b.tokens.tolist()
    assert s.prompt_lens.tolist() == [3, 3, 2, 2, 4]
    assert s.prompt_ids.tolist() == [7, 7, 8, 8, 9]
    assert s.weight_versions.tolist() == [0, 1, 2, 2, 3]
    assert s.loss_mask.tolist() == [bool(m) for m in np.concatenate([a.loss_mask, b.loss_mask])]
    assert np.allclose(s.behaviour_log_probs.numpy(), np.concatenate([a.behaviour_logprobs, b.behaviour_logprobs]))
    assert s.finish_reasons == ["stop", "length", "stop", "stop", "length"]
    assert s.labels == ["a", "a", "b", None, "c"]
    # every sequence of the step is the matching sequence of its batch
    for i, (batch, j) in enumerate([(a, 0), (a, 1), (b, 0), (b, 1), (b, 2)]):
        seq = s.tokens[s.cu_seqlens[i]: s.cu_seqlens[i + 1]].tolist()
        assert seq == batch.tokens[batch.cu_seqlens[j]: batch.cu_seqlens[j + 1]].tolist()


def test_from_batches_single_and_decoded_read_only_batches(two_batches):
    a, b = two_batches
    single = StepSamples.from_batches([b])
    assert single.cu_seqlens.tolist() == b.cu_seqlens.tolist()
    decoded = [decode(encode(x, run_id="r", producer_id="p", seq=0, weight_version=0)).body for x in (a, b)]
    assert not decoded[0].tokens.flags.writeable
    assert_samples_equal(StepSamples.from_batches(decoded), StepSamples.from_batches([a, b]))


def test_rows_rebase_and_concat_round_trip(two_batches):
    s = StepSamples.from_batches(list(two_batches))
    part = s.rows(1, 4)
    assert part.num_sequences == 3
    assert part.cu_seqlens.tolist() == [0, 4, 10, 14]
    assert part.tokens.tolist() == s.tokens[5:19].tolist()
    assert part.prompt_ids.tolist() == [7, 8, 8] and part.labels == ["a", "b", None]
    assert part.finish_reasons == ["length", "stop", "stop"]
    for cuts in ([0, 5], [0, 1, 5], [0, 2, 3, 5], [0, 1, 2, 3, 4, 5]):
        parts = [s.rows(lo, hi) for lo, hi in zip(cuts, cuts[1:])]
        assert_samples_equal(StepSamples.concat(parts), s)
    # reordered parts: cu_seqlens still consistent with the tokens
    swapped = StepSamples.concat([s.rows(2, 5), s.rows(0, 2)])
    assert swapped.cu_seqlens.tolist() == [0, 6, 10, 15, 20, 24]
    assert swapped.tokens.tolist() == s.tokens[9:].tolist() + s.tokens[:9].tolist()


def test_micro_batch_bounds_respects_budget(two_batches):
    s = StepSamples.from_batches(list(two_batches))  # lengths 5, 4, 6, 4, 5
    assert s.micro_batch_bounds(9) == [(0, 2), (2, 3), (3, 5)]
    assert s.micro_batch_bounds(10) == [(0, 2), (2, 4), (4, 5)]
    assert s.micro_batch_bounds(1000) == [(0, 5)]
    lens = torch.diff(s.cu_seqlens).tolist()
    for budget in range(1, 25):
        bounds = s.micro_batch_bounds(budget)
        assert bounds[0][0] == 0 and bounds[-1][1] == 5
        assert all(hi == lo2 for (_, hi), (lo2, _) in zip(bounds, bounds[1:]))  # contiguous
        for lo, hi in bounds:
            assert hi > lo
            assert sum(lens[lo:hi]) <= budget or hi - lo == 1


def test_micro_batch_long_sequence_gets_its_own(two_batches):
    s = StepSamples.from_batches([make_packed(0, [([1, 2], [3]), ([1] * 4, [5] * 8), ([1, 2], [3])], [0, 1, 2])])
    # lengths 3, 12, 3 with budget 6: the 12-token sequence alone, never merged with a neighbour
    assert s.micro_batch_bounds(6) == [(0, 1), (1, 2), (2, 3)]
    assert s.micro_batch_bounds(1) == [(0, 1), (1, 2), (2, 3)]


def test_response_texts_with_tiny_tokenizer(tokenizer):
    pairs = [("12+3=", "15"), ("Hello, world: ", "ok!"), ("7*6=", "42")]
    seqs = []
    for prompt, completion in pairs:
        p = tokenizer(prompt)["input_ids"]  # BOS + characters
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append((p, c))
    s = StepSamples.from_batches([make_packed(0, seqs[:2], [0, 1]), make_packed(1, seqs[2:], [2])])
    prompts, completions = s.response_texts(tokenizer)
    assert prompts == [p for p, _ in pairs]
    assert completions == [c for _, c in pairs]


# --------------------------------------------------------------------------- shard_groups / broadcast helpers


def test_one_rank_is_dealt_every_batch_whole(two_batches):
    s = StepSamples.from_batches(list(two_batches))
    assert GroupDealer(world=1, rank=0, group_size=1).deal(s) is s


def _grouped_batch(grant_id: int, sizes, first_group: int = 0) -> StepSamples:
    """Groups of 2 samples; `sizes` = (prompt extra, response extra) tokens per group."""
    seqs, ids = [], []
    for g, (pe, re_) in enumerate(sizes, start=first_group):
        for _ in range(2):
            seqs.append(([1] + [g + 10] * pe, [5] * (re_ + 1)))
            ids.append(g)
    return StepSamples.from_batches([make_packed(grant_id, seqs, ids)])


def test_dealer_partitions_whole_groups_balanced_by_tokens_over_a_step():
    first = _grouped_batch(0, [(4, 1), (1, 0), (3, 0), (2, 1), (1, 1)])
    group_tokens = [int(first.cu_seqlens[2 * g + 2] - first.cu_seqlens[2 * g]) for g in range(5)]
    assert group_tokens == [14, 6, 10, 10, 8]
    second = _grouped_batch(1, [(0, 0)], first_group=5)  # one small group: only one rank gets it
    dealers = [GroupDealer(world=2, rank=r, group_size=2) for r in range(2)]
    shares = [[d.deal(first), d.deal(second)] for d in dealers]
    assert [d.load for d in dealers] == [[26, 26], [26, 26]]  # every rank computed the same deal
    owned = [sorted(set(torch.cat([sh.prompt_ids for sh in mine]).tolist())) for mine in shares]
    assert sorted(owned[0] + owned[1]) == list(range(6))  # a partition of whole groups
    # greedy, largest first: 14 | 10 + 10 | 8 -> rank 0 (14 < 20) | 6 -> rank 1 (20 < 22) | 4 -> rank 0
    assert owned == [[0, 4, 5], [1, 2, 3]]
    for mine in shares:
        for sh in mine:
            ids = sh.prompt_ids.tolist()
            assert all(ids[i] == ids[i + 1] for i in range(0, len(ids), 2))  # groups kept together
            assert int(sh.cu_seqlens[0]) == 0 and int(sh.cu_seqlens[-1]) == sh.num_tokens
    rank1_second = shares[1][1]
    assert rank1_second.num_sequences == 0 and rank1_second.num_tokens == 0  # dealt nothing of batch 1
    g = 2  # a dealt group's tokens are the original ones
    rows = [i for i, x in enumerate(shares[1][0].prompt_ids.tolist()) if x == g]
    mine = torch.cat([shares[1][0].tokens[shares[1][0].cu_seqlens[i]: shares[1][0].cu_seqlens[i + 1]] for i in rows])
    assert torch.equal(mine, first.tokens[first.cu_seqlens[2 * g]: first.cu_seqlens[2 * g + 2]])
    for d in dealers:
        d.new_step()
        assert d.load == [0, 0]


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"", b""],
        [b"header", b"", b"tail"],
        [b"x" * 300, memoryview(np.arange(5, dtype=np.int32)), bytearray(b"\x00\x01"), b""],
    ],
)
def test_frame_list_round_trip(frames):
    blob = b"".join(frame_list_parts(frames))
    assert len(blob) == 4 + 8 * len(frames) + sum(len(bytes(f)) for f in frames)
    assert [bytes(f) for f in split_frame_list(blob)] == [bytes(f) for f in frames]


def test_frame_list_packed_batch_round_trip(two_batches):
    for i, batch in enumerate(two_batches):
        frames = encode(batch, run_id="", producer_id="rank0", seq=i, weight_version=0)
        env = decode(split_frame_list(b"".join(frame_list_parts(frames))))
        assert env.body == batch and env.seq == i and env.producer_id == "rank0"


# --------------------------------------------------------------------------- sampling seeds


def run_sample_seeds(planner: GrantPlanner, num_steps: int) -> list[int]:
    """The vLLM seed of every sample the planner hands out over `num_steps` versions (sample i of
    a request gets the request's seed + i, as vLLM does for n > 1)."""
    grants = [g for v in range(num_steps) for g in planner.release(published_version=v)]
    return [g.request_seed(p) + i for g in grants for p in range(len(g.prompts)) for i in range(g.n_samples)]


def test_no_two_samples_of_a_run_share_a_seed(tokenizer):
    cfg = make_cfg(**{"train.num_steps": 40, "train.max_staleness": 1})
    seeds = run_sample_seeds(GrantPlanner(cfg, make_dataset(tokenizer), [2]), 40)
    assert len(seeds) == 40 * 4 * 3
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**32 for s in seeds)  # the CPU generator reads only 32 bits


def test_run_seeds_are_reproducible_and_differ_between_run_seeds(tokenizer):
    def seeds(seed):
        cfg = make_cfg(**{"train.num_steps": 10, "rollout.seed": seed})
        return run_sample_seeds(GrantPlanner(cfg, make_dataset(tokenizer), [2]), 10)

    assert seeds(0) == seeds(0)
    assert not set(seeds(0)) & set(seeds(1))  # another run seed: other streams, not a shift by one grant


def test_request_seed_of_a_reused_batch_is_its_first_grants(tokenizer):
    grant = GrantPlanner(make_cfg(), make_dataset(tokenizer), [2]).release(published_version=0)[1]
    assert grant.request_seed(0) == grant.sampling.sample_seed(grant.grant_id * 2 * 3)
    assert grant.request_seed(1, grant_id=5) == grant.sampling.sample_seed((5 * 2 + 1) * 3)
