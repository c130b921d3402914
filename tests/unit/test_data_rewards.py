"""Prompt datasets (learner/data/prompts.py) and reward functions (learner/data/reward_functions.py)."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from learner.data.prompts import DatasetError, EncodedPrompt, PromptDataset, PromptRow, load_prompt_rows
from learner.data.reward_functions import (
    RewardFn,
    RewardFnError,
    load_reward_fn,
    score_batch,
)
from learner.tiny.model import build_tokenizer

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture()
def chat_tok():
    t = build_tokenizer()
    t.chat_template = TEMPLATE
    return t


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def rows_of(n, prefix="q"):
    return [PromptRow(index=i, prompt=f"{prefix}{i}", label=str(i)) for i in range(n)]


# ---------------------------------------------------------------------------- formats


def test_jsonl_skips_blank_lines_and_converts_labels(tmp_path):
    p = write_jsonl(
        tmp_path / "p.jsonl",
        [
            json.dumps({"prompt": "1+1=", "label": 2}),
            "",
            "   ",
            json.dumps({"prompt": [{"role": "user", "content": "hi"}], "label": None}),
            json.dumps({"prompt": "x", "label": 1.5, "extra": True}),
            json.dumps({"prompt": "no label"}),
        ],
    )
    rows = load_prompt_rows(p)
    assert rows == [
        PromptRow(0, "1+1=", "2", {"label": 2}),
        PromptRow(1, [{"role": "user", "content": "hi"}], None, {"label": None}),
        PromptRow(2, "x", "1.5", {"label": 1.5, "extra": True}),
        PromptRow(3, "no label", None),
    ]


def test_json_list_and_custom_keys(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"question": "a", "answer": "A"}, {"question": "b", "answer": 3}]))
    rows = load_prompt_rows(p, input_key="question", label_key="answer")
    assert rows == [PromptRow(0, "a", "A", {"answer": "A"}), PromptRow(1, "b", "3", {"answer": 3})]


def test_parquet(tmp_path):
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "bb"], "label": ["x", None]}), p)
    assert load_prompt_rows(p) == [PromptRow(0, "a", "x", {"label": "x"}), PromptRow(1, "bb", None, {"label": None})]


def test_other_json_columns_travel_with_their_prompt_and_others_are_left_out(tmp_path, tok, caplog):
    """Every column but the prompt is kept (for the reward functions' keyword arguments) when it is
    JSON; a column of bytes is left out with a warning naming it."""
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "solution": ["1", "2"], "tests": [[1, 2], []],
                             "meta": [{"k": 1.5}, {"k": None}], "image": [b"\x00", b"\x01"]}), p)
    with caplog.at_level(logging.WARNING, logger="learner.data.prompts"):
        rows = load_prompt_rows(p)
    assert [r.columns for r in rows] == [{"solution": "1", "tests": [1, 2], "meta": {"k": 1.5}},
                                         {"solution": "2", "tests": [], "meta": {"k": None}}]
    assert "column(s) image hold values that are not JSON" in caplog.text
    dataset = PromptDataset(rows, tok, max_prompt_len=16, seed=0)
    assert dataset.get(1).columns == {"solution": "2", "tests": [], "meta": {"k": None}}


def test_parquet_missing_column_names_row_and_keys(tmp_path):
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a"]}), p)
    with pytest.raises(DatasetError, match=r"p\.parquet: row 1: missing input key 'prompt'.*\['text'\]"):
        load_prompt_rows(p)


# ---------------------------------------------------------------------------- load errors


@pytest.mark.parametrize(
    "line, pattern",
    [
        ('{"prompt": "a"', r"line 2: invalid JSON"),
        ('["a"]', r"line 2: row is not a JSON object \(got list\)"),
        ('{"text": "a", "id": 1}', r"line 2: missing input key 'prompt'; the row has keys \['id', 'text'\]"),
        ('{"prompt": 5}', r"line 2: 'prompt' must be a string or a list of \{role, content\} messages, got int"),
        ('{"prompt": [{"role": "user"}]}', r"line 2: 'prompt' message 0 must be an object with string 'role'"),
        ('{"prompt": ["hi"]}', r"line 2: 'prompt' message 0"),
        ('{"prompt": []}', r"line 2: 'prompt' is an empty list"),
        ('{"prompt": "a", "label": [1]}', r"line 2: label 'label' must be a string, a number or null, got list"),
        ('{"prompt": "a", "label": true}', r"line 2: label 'label' .* got bool"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, pattern):
    p = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "ok"}', line])
    with pytest.raises(DatasetError, match=r"bad\.jsonl: " + pattern):
        load_prompt_rows(p)


def test_json_errors(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"prompt": "a"}, {"prompt": None}]))
    with pytest.raises(DatasetError, match=r"bad\.json: row 2: 'prompt' must be a string.*got NoneType"):
        load_prompt_rows(p)
    p.write_text('{"prompt": "a"}')
    with pytest.raises(DatasetError, match=r"bad\.json: .*list of objects, got dict"):
        load_prompt_rows(p)
    p.write_text("[1, ")
    with pytest.raises(DatasetError, match=r"bad\.json: invalid JSON"):
        load_prompt_rows(p)


@pytest.mark.parametrize("name, content", [("e.jsonl", "\n\n"), ("e.json", ""), ("e2.json", "[]")])
def test_empty_files(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DatasetError, match=rf"{name.replace('.', r'.')}: empty prompt file"):
        load_prompt_rows(p)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.jsonl: prompt file not found"):
        load_prompt_rows(tmp_path / "nope.jsonl")
    p = tmp_path / "p.txt"
    p.write_text("prompt\na\n")
    with pytest.raises(DatasetError, match=r"p\.txt: unsupported prompt file type '\.txt'; expected one of \.jsonl"):
        load_prompt_rows(p)


# ---------------------------------------------------------------------------- tokenisation


def test_plain_tokenisation_adds_bos(tok):
    ds = PromptDataset([PromptRow(0, "ab", "x")], tok, max_prompt_len=10, seed=0)
    assert ds.apply_chat_template is False
    (p,) = ds.next_batch(1)
    assert p == EncodedPrompt(prompt_id=0, token_ids=tok("ab")["input_ids"], label="x", text="ab")
    assert p.token_ids[0] == tok.bos_token_id


def test_chat_template_auto_for_strings_and_messages(chat_tok):
    rows = [PromptRow(0, "hi", None), PromptRow(1, [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "1")]
    ds = PromptDataset(rows, chat_tok, max_prompt_len=100, seed=0, shuffle=False)
    assert ds.apply_chat_template is True
    a, b = ds.next_batch(2)
    assert a.text == "user: hi\nassistant:"
    assert b.text == "system: s\nuser: q\nassistant:"
    assert a.token_ids == chat_tok(a.text, add_special_tokens=False)["input_ids"]
    # Explicitly disabled: plain strings are tokenised as they are, message lists still use the template.
    ds = PromptDataset(rows, chat_tok, max_prompt_len=100, seed=0, shuffle=False, apply_chat_template=False)
    a, b = ds.next_batch(2)
    assert a.text == "hi" and a.token_ids == chat_tok("hi")["input_ids"]
    assert b.text == "system: s\nuser: q\nassistant:"


def test_chat_messages_without_template_is_an_error(tok):
    with pytest.raises(DatasetError, match="no chat_template"):
        PromptDataset([PromptRow(0, [{"role": "user", "content": "q"}], None)], tok, max_prompt_len=50, seed=0)
    with pytest.raises(DatasetError, match="no chat_template"):
        PromptDataset(rows_of(2), tok, max_prompt_len=50, seed=0, apply_chat_template=True)


def test_filtering_counts_and_warns(tok, caplog):
    rows = [PromptRow(0, "a" * 3, None), PromptRow(1, "a" * 10, None), PromptRow(2, "a" * 4, None), PromptRow(3, "a" * 20, None)]
    with caplog.at_level(logging.WARNING, logger="learner.data.prompts"):
        ds = PromptDataset(rows, tok, max_prompt_len=5, seed=0, shuffle=False)  # BOS + 4 chars = 5 tokens
    assert len(ds) == 2 and ds.num_filtered == 2
    assert [p.prompt_id for p in ds.next_batch(2)] == [0, 2]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == ("dropped 2 of 4 prompts, longer than 5 tokens (the longest has 21): raise "
                                        "data.max_prompt_len and rollout.max_model_len to keep them")
    assert ds.get(2).token_ids == tok("aaaa")["input_ids"]
    with pytest.raises(KeyError):
        ds.get(1)
    with pytest.raises(DatasetError, match="no prompts left: dropped 4 of 4 prompts, longer than 2 tokens"):
        PromptDataset(rows, tok, max_prompt_len=2, seed=0)


# ---------------------------------------------------------------------------- order and state


def ids(batch):
    return [p.prompt_id for p in batch]


def test_deterministic_shuffle_by_seed(tok):
    rows = rows_of(20)
    order = lambda seed: ids(PromptDataset(rows, tok, max_prompt_len=10, seed=seed).next_batch(20))
    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(20))
    assert order(1) == np.random.default_rng(1).permutation(20).tolist()
    assert ids(PromptDataset(rows, tok, max_prompt_len=10, seed=1, shuffle=False).next_batch(20)) == list(range(20))


def test_epoch_wrap(tok):
    ds = PromptDataset(rows_of(5), tok, max_prompt_len=10, seed=3)
    first = ids(ds.next_batch(3))
    second = ids(ds.next_batch(4))  # 2 from epoch 0, then 2 from epoch 1
    e0 = np.random.default_rng(3).permutation(5).tolist()
    e1 = np.random.default_rng(4).permutation(5).tolist()
    assert first + second[:2] == e0 and second[2:] == e1[:2]
    assert ds.state_dict() == {"epoch": 1, "offset": 2, "seed": 3}
    big = ids(ds.next_batch(12))  # larger than the dataset: spans epochs 1, 2, 3
    e2 = np.random.default_rng(5).permutation(5).tolist()
    e3 = np.random.default_rng(6).permutation(5).tolist()
    assert big == e1[2:] + e2 + e3[:4]
    assert ds.epoch == 3
    with pytest.raises(ValueError):
        ds.next_batch(0)


def test_state_round_trip(tok):
    rows = rows_of(11)
    a = PromptDataset(rows, tok, max_prompt_len=10, seed=7)
    for _ in range(7):
        a.next_batch(3)
    state = a.state_dict()
    assert state == {"epoch": 1, "offset": 10, "seed": 7}
    b = PromptDataset(rows, tok, max_prompt_len=10, seed=0)
    b.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(5):
        assert b.next_batch(3) == a.next_batch(3)
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="does not fit"):
        b.load_state_dict({"epoch": 0, "offset": 11, "seed": 7})


# ---------------------------------------------------------------------------- reward loading

REWARD_SRC = '''
import numpy as np
def exact(prompts, completions, labels):
    return [1.0 if c == l else 0.0 for c, l in zip(completions, labels)]
def as_array(prompts, completions, labels):
    return np.array([len(c) for c in completions], dtype=np.float32)
NOT_CALLABLE = 3
'''


@pytest.fixture()
def reward_file(tmp_path):
    p = tmp_path / "my_reward.py"
    p.write_text(REWARD_SRC)
    return p


def test_load_from_file_path(reward_file):
    fn = load_reward_fn(f"{reward_file}:exact")
    assert isinstance(fn, RewardFn) and fn.name == f"{reward_file}:exact"
    assert score_batch(fn, ["p", "p"], ["a", "b"], ["a", None]) == [1.0, 0.0]
    arr = load_reward_fn(f"{reward_file}:as_array")
    assert score_batch(arr, ["p"] * 2, ["ab", "abc"], [None, None]) == [2.0, 3.0]


def test_load_from_module_spec(reward_file, monkeypatch):
    monkeypatch.syspath_prepend(str(reward_file.parent))
    try:
        fn = load_reward_fn("my_reward:exact")
    finally:
        sys.modules.pop("my_reward", None)
    assert fn.name == "my_reward:exact"
    assert score_batch(fn, ["p"], ["x"], ["x"]) == [1.0]
    # A real but non-batched function loads, then fails cleanly when called with a batch.
    isfinite = load_reward_fn("math:isfinite")
    with pytest.raises(RewardFnError, match=r"math:isfinite raised TypeError") as info:
        score_batch(isfinite, ["p"], ["c"], [None])
    assert isinstance(info.value.__cause__, TypeError)


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("math.isfinite", r"must look like"),
        ("math:", r"must look like"),
        ("no_such_module_xyz:fn", r"module 'no_such_module_xyz' not found"),
        ("{dir}/missing.py:fn", r"file '.*missing\.py' not found"),
        ("{file}:nope", r"has no attribute 'nope'"),
        ("math:nope", r"'math' has no attribute 'nope'"),
        ("{file}:NOT_CALLABLE", r"'NOT_CALLABLE' is not callable \(it is a int\)"),
        ("math:pi", r"'pi' is not callable"),
    ],
)
def test_load_errors(reward_file, spec, pattern):
    spec = spec.format(dir=reward_file.parent, file=reward_file)
    with pytest.raises(RewardFnError, match=pattern):
        load_reward_fn(spec)


def test_load_file_that_fails_to_import(tmp_path):
    p = tmp_path / "broken.py"
    p.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RewardFnError, match=r"broken\.py.*failed: RuntimeError: boom"):
        load_reward_fn(f"{p}:fn")


# ---------------------------------------------------------------------------- score_batch validation


def test_score_batch_accepts_tensors_arrays_and_tuples():
    assert score_batch(lambda p, c, l: torch.tensor([1.0, 2.0]), ["a", "b"], ["x", "y"], [None, None]) == [1.0, 2.0]
    assert score_batch(lambda p, c, l: np.array([1, 0]), ["a", "b"], ["x", "y"], [None, None]) == [1.0, 0.0]
    out = score_batch(lambda p, c, l: (True, np.float64(0.5)), ["a", "b"], ["x", "y"], [None, None])
    assert out == [1.0, 0.5] and all(type(v) is float for v in out)


def named(result):
    def my_reward(prompts, completions, labels):
        return result

    return RewardFn(my_reward, "pkg.mod:my_reward")


LONG = "z" * 200


@pytest.mark.parametrize(
    "result, pattern",
    [
        ([1.0], r"pkg\.mod:my_reward returned 1 rewards for 3 completions; first missing index 1 \(completion: 'b'\)"),
        ([1.0] * 4, r"returned 4 rewards for 3 completions; first extra index 3"),
        ([1.0, "x", 2.0], r"pkg\.mod:my_reward returned non-numeric reward 'x' \(str\) at index 1 \(completion: 'b'\)"),
        ([1.0, None, 2.0], r"non-numeric reward None .* at index 1"),
        ([1.0, 2.0, float("nan")], r"non-finite reward nan at index 2 \(completion: 'z{77}\.\.\.'\)"),
        (np.array([1.0, np.inf, 0.0]), r"non-finite reward inf at index 1"),
        (torch.tensor([[1.0, 2.0, 3.0]]), r"1-D array of rewards, got shape \(1, 3\)"),
        (1.0, r"must return a sequence of numbers .* got float"),
        ("abc", r"got str"),
        (None, r"got NoneType"),
    ],
)
def test_score_batch_errors(result, pattern):
    with pytest.raises(RewardFnError, match=pattern):
        score_batch(named(result), ["p"] * 3, ["a", "b", LONG], [None] * 3)


def test_score_batch_wraps_exceptions_and_plain_function_names():
    def bad_reward(prompts, completions, labels):
        raise KeyError("k")

    with pytest.raises(RewardFnError, match=r"test_data_rewards:.*bad_reward raised KeyError") as info:
        score_batch(bad_reward, ["p"], ["c"], [None])
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(ValueError, match="equal lengths"):
        score_batch(bad_reward, ["p"], ["c", "d"], [None])
