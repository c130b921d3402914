"""learner.tasks.gsm8k: answer extraction, the reward, dataset conversion, and the recipe's config."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from learner.data.prompts import load_prompt_rows
from learner.data.reward_functions import load_reward_fn, score_batch
from learner.tasks.gsm8k import (
    FORMAT_BONUS,
    extract_answer,
    extract_reference,
    gsm8k_accuracy,
    gsm8k_reward,
    prepare_gsm8k,
)
from protocol.config import load_config

REPO = Path(__file__).resolve().parents[2]
GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def reward(completion: str, label: str | None) -> float:
    return gsm8k_reward(["q"], [completion], [label])[0]


@pytest.mark.parametrize("completion, label, expected", [
    # correct with '####' (format followed): 1.0, no extra bonus on top
    ("48/2 = 24 in May, 48 + 24 = 72 in total.\n#### 72", GSM8K_ANSWER, 1.0),
    ("So 72.\n####72", "72", 1.0),
    # correct via 'answer is' (no '####'): 1.0; 'answer is' beats a later number on another line
    ("She sold 24 in May. The answer is 72.", GSM8K_ANSWER, 1.0),
    ("So the Answer is: $72 clips\nCheck: 24 + 48", "72", 1.0),
    # last-number fallback
    ("24 in May, then 24 + 48 = 72", "72", 1.0),
    ("24 in May, then 24 + 48 = 72 and 10 more", "72", 0.0),
    # wrong: with '####' gets the format bonus only, without it nothing
    ("#### 71", GSM8K_ANSWER, FORMAT_BONUS),
    ("The answer is 71.", "72", 0.0),
    # the last '####' counts; a number before it does not
    ("#### 5\nWait, recompute.\n#### 72", "72", 1.0),
    ("72 is wrong.\n#### 70", "72", FORMAT_BONUS),
    # commas: thousands separators on either side
    ("Total is 1,234 + 6 = 1,240 dollars.\n#### $1,240", "#### 1,240", 1.0),
    ("#### 1240", "1,240", 1.0),
    ("#### 1,240,000", "1240000", 1.0),
    # negative and decimal numbers, compared numerically
    ("The temperature drops to -5 degrees.\n#### -5", "#### -5", 1.0),
    ("#### 5", "-5", FORMAT_BONUS),
    ("Each costs 2.50, so the answer is 7.5", "7.50", 1.0),
    ("#### 72.00", "72", 1.0),
    ("#### 0.5", "0.25", FORMAT_BONUS),
    # no number at all
    ("I do not know.", "72", 0.0),
    ("#### I do not know.", "72", FORMAT_BONUS),
    ("", "72", 0.0),
    # a label without a number: never correct
    ("#### 72", None, FORMAT_BONUS),
    ("72", "unknown", 0.0),
])
def test_reward_cases(completion, label, expected):
    assert reward(completion, label) == pytest.approx(expected)


def test_extraction_details():
    assert extract_reference(GSM8K_ANSWER) == Decimal(72)
    assert extract_reference(" 3,600 ") == Decimal(3600)
    assert extract_reference(18) == Decimal(18)
    assert extract_reference("no number") is None and extract_reference(None) is None
    assert extract_answer("from 3-4 apples we get 10") == Decimal(10)
    assert extract_answer("between 3-4") == Decimal(4)  # a hyphen, not a minus sign
    assert extract_answer("It is -3.") == Decimal(-3)
    assert extract_answer("#### \nthe answer is 9") == Decimal(9)  # '####' with no number: next rule
    assert extract_answer("nothing here") is None


def test_batched_and_through_the_loader():
    completions = ["#### 72", "#### 7", "seventy-two", "the answer is 72"]
    labels = ["72"] * 4
    assert gsm8k_reward(["q"] * 4, completions, labels) == [1.0, FORMAT_BONUS, 0.0, 1.0]
    assert gsm8k_accuracy(["q"] * 4, completions, labels) == [1.0, 0.0, 0.0, 1.0]
    fn = load_reward_fn("learner.tasks.gsm8k:gsm8k_reward")
    assert score_batch(fn, ["q"] * 4, completions, labels) == [1.0, FORMAT_BONUS, 0.0, 1.0]


ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                 "in May. How many clips did Natalia sell altogether in April and May?", "answer": GSM8K_ANSWER},
    {"question": "A loan of $2,000 is repaid with 5% interest. How much is repaid?",
     "answer": "2000 * 1.05 = <<2000*1.05=2100>>2100\n#### 2,100"},
    {"question": "What is 1 - 3.5?", "answer": "1 - 3.5 = -2.5\n#### -2.50"},
]


def check_prepared(out: Path) -> None:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == ["72", "2100", "-2.5"]
    assert rows[0]["prompt"].startswith("Natalia sold clips") and "#### <number>" in rows[0]["prompt"]
    loaded = load_prompt_rows(out)  # the project's own loader accepts it
    assert [r.label for r in loaded] == ["72", "2100", "-2.5"]
    assert gsm8k_reward([r.prompt for r in loaded], ["#### 72", "#### 2,100", "#### -2.5"],
                        [r.label for r in loaded]) == [1.0, 1.0, 1.0]


def test_prepare_from_jsonl(tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    assert prepare_gsm8k(src, tmp_path / "out" / "prompts.jsonl") == 3
    check_prepared(tmp_path / "out" / "prompts.jsonl")


def test_prepare_from_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), src)
    assert prepare_gsm8k(src, tmp_path / "prompts.jsonl") == 3
    check_prepared(tmp_path / "prompts.jsonl")


def test_prepare_rejects_bad_rows(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"question": "q?", "answer": "no final number"}) + "\n")
    with pytest.raises(ValueError, match="row 1: no reference number"):
        prepare_gsm8k(src, tmp_path / "out.jsonl")
    src.write_text(json.dumps({"answer": "#### 3"}) + "\n")
    with pytest.raises(ValueError, match="row 1: no 'question'"):
        prepare_gsm8k(src, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_recipe_config_loads():
    cfg = load_config(REPO / "configs" / "qwen2.5-0.5b-gsm8k.yaml")
    assert cfg.reward.function == ["learner.tasks.gsm8k:gsm8k_reward"]
    assert (cfg.model.dtype, cfg.rollout.engine_dtype) == ("bfloat16", "bfloat16")
    assert (cfg.data.max_prompt_len, cfg.rollout.max_new_tokens, cfg.rollout.max_model_len) == (512, 512, 1024)
    assert (cfg.rollout.n_samples_per_prompt, cfg.train.prompts_per_step, cfg.train.lr) == (8, 64, 1e-6)
    assert (cfg.algo.advantage_estimator, cfg.algo.kl_coef, cfg.algo.kl_mode) == ("grpo", 0.001, "loss")
    assert (cfg.train.zero_stage, cfg.train.max_staleness, cfg.train.save_every) == (2, 1, 50)
    assert cfg.rollout.enforce_eager is False and cfg.rollout.gpu_memory_utilization == 0.4
    load_reward_fn(cfg.reward.function[0])
