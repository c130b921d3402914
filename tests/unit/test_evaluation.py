"""Held-out evaluation: pass@k, the rounds' schedule, grants and metrics (learner.evaluation), its
options, the recorded evaluation batches a resume must not reuse, and the plot's evaluation panel.

The hub's side (budget, arrivals, re-issue) is in test_hub.py over real sockets; here a stand-in
hub records what the evaluator offers it, which is all the evaluator's logic needs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import torch

from learner.algo import pass_at_k
from learner.data.prompts import PromptDataset, PromptRow
from learner.evaluation import EVAL_SEED_STREAM, Evaluator, grant_size
from learner.hub.grants import GrantPlanner
from learner.plot import plot_run
from learner.recording.store import RecordingWriter
from learner.recording.recording_hub import reusable_batches
from learner.tiny.model import build_tokenizer
from protocol import SCHEMA_VERSION, encode
from protocol.config import ConfigError, load_config
from tests.unit.batches import answer
from tests.unit.test_observability import assert_png, step_metrics

# rewards of the two samples of each of the six held-out prompts (prompt id -> [sample 0, sample 1])
REWARDS = {0: [1.0, 0.0], 1: [1.0, 1.0], 2: [0.1, 0.0], 3: [0.0, 1.0], 4: [0.0, 0.0], 5: [1.0, 0.1]}


# --------------------------------------------------------------------------- pass@k


def test_pass_at_k_against_hand_computed_values():
    passed = torch.tensor([[True, False, False, False],  # c = 1 of n = 4
                           [True, True, False, False],  # c = 2
                           [True, True, True, True],  # c = 4
                           [False, False, False, False]])  # c = 0
    # pass@1 = c / n
    assert pass_at_k(passed, 1).tolist() == pytest.approx([0.25, 0.5, 1.0, 0.0])
    # pass@2 = 1 - C(n - c, 2) / C(4, 2): 1 - 3/6, 1 - 1/6, 1, 1 - 6/6
    assert pass_at_k(passed, 2).tolist() == pytest.approx([0.5, 5 / 6, 1.0, 0.0])
    assert pass_at_k(passed, 4).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])
    # n = 5, c = 2, k = 2: 1 - C(3, 2) / C(5, 2) = 1 - 3/10
    assert pass_at_k(torch.tensor([[True, False, True, False, False]]), 2).tolist() == pytest.approx([0.7])


def test_pass_at_k_needs_k_between_1_and_n():
    with pytest.raises(ValueError, match="1 <= k <= n = 2"):
        pass_at_k(torch.ones(3, 2, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match=r"\[P, n\]"):
        pass_at_k(torch.ones(3, dtype=torch.bool), 1)


def test_grant_size_is_the_largest_divisor_within_the_grant_size():
    assert [grant_size(6, 4), grant_size(8, 4), grant_size(7, 4), grant_size(3, 8)] == [3, 4, 1, 3]


# --------------------------------------------------------------------------- the evaluator


class RecordingHub:
    """What the evaluator asks of a hub: offers and, for `finish`, evaluation batches."""

    def __init__(self):
        self.offered, self.to_arrive = [], []

    def offer(self, grants):
        self.offered.extend(grants)

    async def evaluation_arrivals(self, timeout_s):
        for batch in self.to_arrive:
            yield batch
        raise TimeoutError("no evaluation batch")


def eval_cfg(**overrides):
    base = {"train.num_steps": 7, "rollout.prompts_per_grant": 4, "rollout.n_samples_per_prompt": 4,
            "rollout.seed": 3, "eval.path": "unused.jsonl", "eval.every_steps": 3, "eval.n_samples": 2,
            "eval.temperature": 0.7, "eval.pass_k": "[1, 2]", "eval.max_new_tokens": 6}
    base.update(overrides)
    return load_config(overrides={k: str(v) for k, v in base.items()})


@pytest.fixture(scope="module")
def prompts():
    rows = [PromptRow(index=i, prompt=f"{i}+1=", label=str(i + 1), columns={"row": i}) for i in range(6)]
    dataset = PromptDataset(rows, build_tokenizer(), max_prompt_len=32, seed=0, shuffle=False)
    return dataset.next_batch(len(dataset))


def table_rewards(samples):
    """REWARDS of each sequence (rows are prompt by prompt, sample by sample), as total and as the one function."""
    rewards = torch.tensor([REWARDS[int(pid)][b % 2] for b, pid in enumerate(samples.prompt_ids)])
    return rewards, rewards[:, None]


def make_evaluator(cfg, prompts, ids=None):
    ids = ids or iter(range(100, 10_000))
    return Evaluator(cfg, prompts, stop_token_ids=[2], rewards=table_rewards,
                     function_metrics=lambda scores: {"reward_fn_table_mean": float(scores.mean())},
                     allocate_ids=lambda n: [next(ids) for _ in range(n)])


def test_rounds_at_version_0_every_every_steps_and_the_final_one(prompts):
    evaluator = make_evaluator(eval_cfg(), prompts)
    assert [v for v in range(9) if evaluator.due(v)] == [0, 3, 6, 7]
    only_ends = make_evaluator(eval_cfg(**{"eval.every_steps": 0}), prompts)
    assert [v for v in range(9) if only_ends.due(v)] == [0, 7]
    off = make_evaluator(eval_cfg(), [])
    hub = RecordingHub()
    off.offer_due(0, hub)
    assert not off.enabled and hub.offered == [] and off.results() == {}


def test_a_round_is_the_eval_set_in_equal_evaluation_grants_of_the_version(prompts):
    evaluator, hub = make_evaluator(eval_cfg(), prompts), RecordingHub()
    evaluator.offer_due(3, hub)  # on the schedule even without a round before it (a resumed run)
    grants = hub.offered
    # 6 prompts, at most 4 per grant: two grants of 3 (equal sizes keep every sample's seed its own)
    assert [len(g.prompts) for g in grants] == [3, 3] and [g.grant_id for g in grants] == [100, 101]
    assert [p.prompt_id for g in grants for p in g.prompts] == [0, 1, 2, 3, 4, 5]
    assert all(g.evaluation and g.step == 3 and g.min_weight_version == 3 and g.n_samples == 2 for g in grants)
    sampling = grants[0].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.max_new_tokens) == (0.7, 1.0, -1, 6)
    assert sampling.stop_token_ids == [2] and sampling.seed == 3 + EVAL_SEED_STREAM
    assert grants[0].prompts[1].label == "2"


def test_evaluation_grants_take_run_grant_ids_and_every_sample_keeps_its_own_seed(prompts):
    cfg = eval_cfg(**{"eval.every_steps": 1, "train.prompts_per_step": 4, "train.max_staleness": 1})
    dataset = PromptDataset([PromptRow(index=i, prompt=f"{i}+{i}=", label=None) for i in range(20)],
                            build_tokenizer(), max_prompt_len=32, seed=0)
    planner = GrantPlanner(cfg, dataset, [2])
    evaluator = Evaluator(cfg, prompts, stop_token_ids=[2], rewards=table_rewards, function_metrics=dict,
                          allocate_ids=planner.allocate_ids)
    hub, training = RecordingHub(), []
    for version in range(cfg.train.num_steps + 1):
        training += planner.release(published_version=version)
        evaluator.round = None  # every round answered at once
        evaluator.offer_due(version, hub)
    assert len(hub.offered) == 8 * 2
    ids = [g.grant_id for g in training + hub.offered]
    assert len(set(ids)) == len(ids)

    def seeds(grants):
        return [g.request_seed(p) + i for g in grants for p in range(len(g.prompts)) for i in range(g.n_samples)]

    assert len(set(seeds(hub.offered))) == 8 * 6 * 2
    assert not set(seeds(hub.offered)) & set(seeds(training))


def answer_round(grants, version, *, newer_for=()):
    """Each grant's batch, generated at `version` (partly at version + 1 for the grant ids in `newer_for`)."""
    return [answer(g, version, last_version=version + 1 if g.grant_id in newer_for else None) for g in grants]


def test_round_metrics_against_hand_computed_values(prompts):
    evaluator, hub = make_evaluator(eval_cfg(), prompts), RecordingHub()
    evaluator.offer_due(0, hub)
    first, second = answer_round(hub.offered, 0, newer_for={101})
    evaluator.score(second)  # answers come in any order
    assert evaluator.results() == {} and evaluator.outstanding
    evaluator.score(first)
    metrics = evaluator.results()
    assert not evaluator.outstanding and evaluator.results() == {}
    # rewards 1 0 | 1 1 | .1 0 | 0 1 | 0 0 | 1 .1: sum 5.2 over 12 samples; passing samples per prompt c = 1 2 0 1 0 1
    assert metrics["eval/step"] == 0 and metrics["eval/prompts"] == 6
    assert metrics["eval/reward_mean"] == pytest.approx(5.2 / 12)
    assert metrics["eval/reward_std"] == pytest.approx(float(torch.tensor(sum(REWARDS.values(), [])).std()))
    assert metrics["eval/pass@1"] == pytest.approx((0.5 + 1 + 0 + 0.5 + 0 + 0.5) / 6)
    assert metrics["eval/pass@2"] == pytest.approx(4 / 6)
    assert metrics["eval/reward_fn_table_mean"] == pytest.approx(5.2 / 12)
    assert metrics["eval/response_len"] == 2.0 and metrics["eval/truncated_fraction"] == 0.0
    assert metrics["eval/newer_weights_fraction"] == 0.5  # grant 101's 6 samples of 12 also saw version 1
    assert metrics["eval/round_s"] >= 0


def test_pass_threshold_decides_which_samples_pass(prompts):
    evaluator, hub = make_evaluator(eval_cfg(**{"eval.pass_threshold": 0.1}), prompts), RecordingHub()
    evaluator.offer_due(0, hub)
    for batch in answer_round(hub.offered, 0):
        evaluator.score(batch)
    # at 0.1 the passing samples per prompt are c = 1 2 1 1 0 2
    assert evaluator.results()["eval/pass@1"] == pytest.approx((0.5 + 1 + 0.5 + 0.5 + 0 + 1) / 6)


def test_a_round_due_while_one_is_out_is_skipped_but_the_final_one_replaces_it(prompts, caplog):
    evaluator, hub = make_evaluator(eval_cfg(), prompts), RecordingHub()
    evaluator.offer_due(0, hub)
    round_0 = list(hub.offered)
    evaluator.offer_due(3, hub)  # round 0 still out
    assert hub.offered == round_0 and evaluator.skipped == 1 and "version 3 skipped" in caplog.text
    for batch in answer_round(round_0, 0):
        evaluator.score(batch)
    assert evaluator.results()["eval/step"] == 0
    evaluator.offer_due(6, hub)
    round_6 = hub.offered[len(round_0):]
    evaluator.offer_due(7, hub)  # the final weights: round 6 is given up
    final = hub.offered[len(round_0) + len(round_6):]
    assert {g.step for g in round_6} == {6} and {g.step for g in final} == {7} and "version 6 given up" in caplog.text
    evaluator.score(answer_round(round_6, 6)[0])  # a late answer of the given-up round counts for nothing
    hub.to_arrive = answer_round(final, 7)
    metrics = asyncio.run(evaluator.finish(hub, timeout_s=1.0))
    assert metrics["eval/step"] == 7 and metrics["eval/prompts"] == 6


def test_finish_without_a_round_out_returns_nothing(prompts):
    assert asyncio.run(make_evaluator(eval_cfg(), prompts).finish(RecordingHub(), timeout_s=0.1)) == {}


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(("overrides", "message"), [
    ({"eval.temperature": "0", "eval.n_samples": "4"},
     r"eval\.temperature 0 is greedy: its eval\.n_samples \(4\) samples"),
    ({"eval.n_samples": "2", "eval.temperature": "1", "eval.pass_k": "[1, 4]"},
     r"eval\.pass_k \[1, 4\].*eval\.n_samples \(2\).*got \[4\]"),
    ({"eval.pass_k": "[0]"}, r"eval\.pass_k"),
    ({"eval.every_steps": "-1"}, r"eval\.every_steps must be >= 0"),
    ({"eval.temperature": "-1"}, r"eval\.temperature must be a finite number >= 0"),
    ({"eval.top_p": "0"}, r"eval\.top_p in \(0, 1\]"),
    ({"eval.pass_threshold": "inf"}, r"eval\.pass_threshold must be a finite number"),
    ({"eval.path": "e.jsonl", "eval.max_new_tokens": "64", "rollout.max_model_len": "64"},
     r"eval\.max_new_tokens \(64\) leaves no room for a prompt in rollout\.max_model_len \(64\)"),
])
def test_eval_options_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_eval_prompts_leave_room_for_a_whole_evaluation_response():
    cfg = load_config(overrides={"rollout.max_model_len": "64", "rollout.max_new_tokens": "4",
                                 "eval.max_new_tokens": "20"})
    assert (cfg.prompt_len_limit, cfg.eval_max_new_tokens, cfg.eval_prompt_len_limit) == (60, 20, 44)
    assert load_config(overrides={"rollout.max_new_tokens": "4"}).eval_max_new_tokens == 4


# --------------------------------------------------------------------------- recordings and the plot


def test_a_resume_never_reuses_a_recorded_evaluation_batch(tmp_path, prompts):
    evaluator, hub = make_evaluator(eval_cfg(**{"rollout.prompts_per_grant": 2}), prompts[:2]), RecordingHub()
    evaluator.offer_due(3, hub)
    evaluation = answer(hub.offered[0], 3)
    training = answer(dataclasses.replace(hub.offered[0], evaluation=False), 3)  # same step and prompts
    with RecordingWriter(tmp_path / "rec", run_config={}, protocol_version=SCHEMA_VERSION) as writer:
        for seq, batch in enumerate([evaluation, training]):
            writer.append_message(b"rollout-0", encode(batch, run_id="r", producer_id="rollout-0", seq=seq + 1,
                                                       weight_version=3))
    found = reusable_batches(tmp_path / "rec", after_step=2)
    assert list(found) == [(3, (0, 1))] and found[(3, (0, 1))] == (1, training)


def test_plot_adds_the_evaluation_panel(tmp_path):
    def draw(directory, with_evaluation):
        directory.mkdir()
        rows = [{"step": s, **step_metrics(s)} for s in range(4)]
        if with_evaluation:
            rows[2].update({"eval/step": 0, "eval/reward_mean": 0.4, "eval/pass@1": 0.3})
            rows.append({"step": 4, "eval/step": 4, "eval/reward_mean": 0.5, "eval/pass@1": 0.45})
        (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = plot_run(directory / "metrics.jsonl", directory / "training.png")
        assert_png(out)
        import matplotlib.image

        return matplotlib.image.imread(out).shape[0]

    assert draw(tmp_path / "with", True) > draw(tmp_path / "without", False)

