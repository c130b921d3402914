"""DAPO's dynamic sampling: which groups carry a gradient and which a step trains (learner.algo.filtering),
how many prompts the planner hands out for a step and how a checkpoint resumes it exactly once
(learner.hub.grants), the replay of a step collected in several rounds (learner.recording.replay), its options."""

from __future__ import annotations

import asyncio

import pytest
import torch

from learner.algo import grpo_advantages, informative_groups, rloo_advantages, select_groups
from learner.data.prompts import PromptDataset, PromptRow
from learner.hub.grants import GrantPlanner
from learner.recording.store import RecordingWriter
from learner.recording.replay import ReplayHub, ReplayMismatch
from learner.tiny.model import build_tokenizer
from protocol import SCHEMA_VERSION, encode
from protocol.config import ConfigError, load_config
from tests.unit.batches import answer

N_ROWS = 200


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def dataset(tokenizer) -> PromptDataset:
    return PromptDataset([PromptRow(index=i, prompt=f"{i}+{i}=", label=None) for i in range(N_ROWS)], tokenizer,
                         max_prompt_len=32, seed=0)


def cfg(**overrides):
    base = {"train.num_steps": 8, "train.prompts_per_step": 8, "rollout.prompts_per_grant": 2,
            "rollout.n_samples_per_prompt": 4, "train.max_staleness": 1, "algo.dynamic_sampling": "true",
            "algo.dynamic_sampling_max_prompts": 3}
    base.update(overrides)
    return load_config(overrides={k: str(v) for k, v in base.items()})


def prompt_ids(grants) -> list[int]:
    return [p.prompt_id for g in grants for p in g.prompts]


# --------------------------------------------------------------------------- which groups


def test_groups_of_equal_rewards_are_the_uninformative_ones():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.1, 0.1, 0.5, 0.5 + 1e-6])
    assert informative_groups(scores, 2).tolist() == [False, True, False, True]
    # and exactly those have all-zero advantages under group normalisation
    for advantages in (grpo_advantages(scores, 2), rloo_advantages(scores, 2)):
        assert (advantages.view(4, 2) == 0).all(dim=1).tolist() == [True, False, True, False]


def test_a_step_trains_the_first_informative_groups_then_fills_up_with_uninformative_ones():
    flags = torch.tensor([False, True, True, False, True, False])
    assert select_groups(flags, 2).tolist() == [False, True, True, False, False, False]  # surplus dropped
    assert select_groups(flags, 3).tolist() == [False, True, True, False, True, False]
    assert select_groups(flags, 5).tolist() == [True, True, True, True, True, False]  # two filled in order
    assert select_groups(flags, 9).tolist() == [True] * 6
    with pytest.raises(ValueError):
        select_groups(flags, -1)


# --------------------------------------------------------------------------- how many prompts


def test_without_dynamic_sampling_a_step_gets_its_prompts_and_no_more(tokenizer):
    planner = GrantPlanner(cfg(**{"algo.dynamic_sampling": "false"}), dataset(tokenizer), [2])
    assert len(prompt_ids(planner.release(0))) == 2 * 8
    assert planner.top_up(0, informative=0) == [] and 0 not in planner.handed


def test_planned_prompts_follow_the_share_of_informative_groups_within_the_most(tokenizer):
    """8 prompts a step, grants of 2, at most 3 x 8 = 24 prompts a step."""
    planner = GrantPlanner(cfg(**{"train.max_staleness": 0}), dataset(tokenizer), [2])
    assert len(prompt_ids(planner.release(0))) == 8  # no history: the step's own 8
    assert planner.top_up(0, informative=8) == []  # 8 informative of 8: collected
    assert len(prompt_ids(planner.release(1))) == 8  # 8 / (8 / 8)
    # 2 of 8 answered: (8 - 2) / ((8 + 2) / (8 + 8)) = 9.6 more, in whole grants 10
    more = planner.top_up(1, informative=2)
    assert len(prompt_ids(more)) == 10 and {g.step for g in more} == {1} and planner.granted(1) == 9
    # 5 of 18: (8 - 5) / ((8 + 5) / (8 + 18)) = 6, and 24 - 18 = 6 left
    assert len(prompt_ids(planner.top_up(1, informative=5))) == 6
    assert planner.top_up(1, informative=6) == []  # at its most: the step trains what it has
    # 14 informative of 32 groups: 8 / 0.4375 = 18.3, in whole grants 20
    assert len(prompt_ids(planner.release(2))) == 20
    # none of 20: (8 - 0) / (14 / 52) = 29.7, but only 24 - 20 = 4 left
    assert len(prompt_ids(planner.top_up(2, informative=0))) == 4
    assert planner.top_up(2, informative=0) == []
    assert len(prompt_ids(planner.release(3))) == 24  # 14 of 56: 8 / 0.25 = 32, at most 24


def test_with_no_informative_group_yet_a_step_gets_all_it_may_have(tokenizer):
    planner = GrantPlanner(cfg(**{"train.max_staleness": 0}), dataset(tokenizer), [2])
    planner.release(0)
    assert len(prompt_ids(planner.top_up(0, informative=0))) == 16  # 0 of 8: the 24 - 8 left
    assert planner.top_up(0, informative=0) == []
    assert len(prompt_ids(planner.release(1))) == 24


def test_top_ups_keep_the_staleness_bound_and_take_the_next_prompts_of_the_stream(tokenizer):
    planner = GrantPlanner(cfg(**{"train.max_staleness": 2}), dataset(tokenizer), [2])
    twin = dataset(tokenizer)
    planned = planner.release(0)  # steps 0, 1 and 2
    more = planner.top_up(0, informative=4)
    assert {g.min_weight_version for g in more} == {0} and {g.step for g in more} == {0}
    assert prompt_ids(planned) + prompt_ids(more) == [p.prompt_id for p in twin.next_batch(24 + 8)]
    ids = [g.grant_id for g in planned + more]
    assert ids == list(range(len(ids)))
    later = planner.release(1)
    assert {g.min_weight_version for g in later} == {1} and {g.step for g in later} == {3}


def collect_steps(planner: GrantPlanner, steps: range, informative: dict[int, list[int]]) -> dict[int, list[int]]:
    """Plan and collect `steps` as the driver does, each top-up answered with the next count of
    `informative[step]`; returns each step's prompt ids."""
    handed = {}
    for step in steps:
        grants = planner.release(published_version=step)
        for g in grants:
            handed.setdefault(g.step, []).extend(p.prompt_id for p in g.prompts)
        for count in informative.get(step, [8]):
            more = planner.top_up(step, informative=count)
            handed[step] += prompt_ids(more)
            if not more:
                break
        else:
            assert planner.top_up(step, informative=8) == []
    return handed


def test_a_resumed_planner_hands_out_the_same_prompts_once(tokenizer):
    informative = {0: [2, 5], 1: [3], 2: [1, 1], 3: [8]}
    uninterrupted = collect_steps(GrantPlanner(cfg(), dataset(tokenizer), [2]), range(8), informative)

    first = GrantPlanner(cfg(), dataset(tokenizer), [2])
    before = collect_steps(first, range(3), informative)  # crash after step 2 (steps 3 planned ahead)
    state = first.state_after(2)
    assert [later for later, _ in state["handed"]] == [3]
    resumed = GrantPlanner(cfg(), dataset(tokenizer), [2])
    resumed.resume(3, state)
    after = collect_steps(resumed, range(3, 8), informative)
    assert {**{s: before[s] for s in range(3)}, **after} == uninterrupted
    every = [p for step in range(8) for p in uninterrupted[step]]
    assert len(every) == len(set(every)) and len(every) > 8 * 8  # handed out once, trained or dropped


def test_a_checkpoint_from_before_handed_lists_resumes_from_its_position(tokenizer):
    planner = GrantPlanner(cfg(**{"algo.dynamic_sampling": "false"}), dataset(tokenizer), [2])
    planner.resume(2, {"dataset": {"epoch": 0, "offset": 16, "seed": 0}, "next_grant_id": 8})
    grants = planner.release(2)
    assert [g.grant_id for g in grants] == list(range(8, 16))
    assert prompt_ids(grants) == [p.prompt_id for p in dataset(tokenizer).next_batch(32)[16:]]


# --------------------------------------------------------------------------- replay of a step collected in rounds


def test_replay_hands_a_step_out_in_the_rounds_the_driver_asks_for(tmp_path, tokenizer):
    planner = GrantPlanner(cfg(**{"train.max_staleness": 0}), dataset(tokenizer), [2])
    grants = planner.release(0) + planner.top_up(0, informative=1)
    batches = [answer(g, 0) for g in grants]
    with RecordingWriter(tmp_path / "rec", run_config={}, protocol_version=SCHEMA_VERSION) as writer:
        for seq, batch in enumerate(batches):
            writer.append_message(b"r", encode(batch, run_id="r", producer_id="r", seq=seq + 1, weight_version=0))
        writer.append_step(0, {"consumed": list(range(len(batches))), "fingerprint": {}, "metrics": {}})

    async def rounds(*sizes):
        hub = ReplayHub(str(tmp_path / "rec"))
        got = [[b.grant_id async for b in hub.arrivals(0, size, 1.0)] for size in sizes]
        hub.end_step(0, {}, {})
        return got

    assert len(batches) == 4 + 8  # 1 informative of 8: (8 - 1) / (1 / 8) = 56 more, at most 24 - 8
    assert asyncio.run(rounds(4, 8)) == [[0, 1, 2, 3], list(range(4, 12))]
    with pytest.raises(ReplayMismatch, match="recorded 12 batches, the replay asks for 13"):
        asyncio.run(rounds(4, 9))
    with pytest.raises(ReplayMismatch, match="fewer batches than the 12 recorded"):
        asyncio.run(rounds(4))


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(("overrides", "message"), [
    ({"algo.advantage_estimator": "reinforce_pp_baseline"},
     r"algo\.dynamic_sampling .* algo\.advantage_estimator 'reinforce_pp_baseline' does not normalise"),
    ({"algo.advantage_estimator": "gae"}, r"algo\.advantage_estimator 'gae'"),
    ({"rollout.n_samples_per_prompt": "1"},
     r"algo\.dynamic_sampling needs groups .* rollout\.n_samples_per_prompt is 1"),
    ({"algo.kl_mode": "reward", "algo.kl_coef": "0.1"}, r"algo\.dynamic_sampling .* algo\.kl_mode 'reward'"),
    ({"train.learner_ranks": "2"}, r"algo\.dynamic_sampling is not implemented with train\.learner_ranks 2"),
    ({"algo.dynamic_sampling_max_prompts": "0.5"}, r"algo\.dynamic_sampling_max_prompts must be >= 1"),
])
def test_dynamic_sampling_options_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"algo.dynamic_sampling": "true", **overrides})
    load_config(overrides={"algo.dynamic_sampling": "true", "algo.kl_coef": "0.1"})  # a KL loss is fine
