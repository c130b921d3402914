"""learner.tasks.addition and learner.tasks.longtail: the BPE tokenizer, rewards, prompts, prepare."""

from __future__ import annotations

import json
import statistics

import pytest

import learner.tiny.sft
import learner.tiny.model
from learner.tiny import bpe
from learner.data.reward_functions import load_reward_fn, score_batch
from learner.tasks import addition, longtail
from learner.tasks.arithmetic import arithmetic_reward
from learner.tasks.arithmetic import make_rows as arithmetic_rows
from learner.tiny.model import MODEL_SIZES, build_bpe_tokenizer, build_tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer()


def test_bpe_tokenizer(tokenizer):
    assert len(tokenizer) == bpe.VOCAB_SIZE == 512
    assert build_bpe_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert [tokenizer.convert_ids_to_tokens(i) for i in (0, 1, 2)] == ["<pad>", "<s>", "</s>"]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    for n in range(99):  # every sum of the addition task is one token, with or without a space before
        assert tokenizer.tokenize(str(n)) == [str(n)]
        assert tokenizer.tokenize(f" {n}") == ["Ġ", str(n)]
    assert tokenizer.tokenize("49+49=") == ["49", "+", "49", "="]
    assert tokenizer.tokenize("repeat cat 2:\n2 cat") == ["repeat", "Ġcat", "Ġ", "2", ":", "Ċ", "2", "Ġcat"]
    text = "count 3 to 57: 3 4 5, 100 = 10*10!"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == text


def test_model_sizes():
    for spec in MODEL_SIZES.values():
        assert spec.hidden_size // spec.num_attention_heads == 64  # vLLM's CPU attention needs it
        assert spec.hidden_size % spec.num_attention_heads == 0 and spec.tokenizer == "bpe"
        assert spec.vocab_size == 512 and spec.max_position_embeddings >= longtail.MAX_MODEL_LEN
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        learner.tiny.model.sized_spec("huge")


@pytest.mark.parametrize("completion, label, expected", [
    ("12", "12", 1.0), (" 12 foo", "12", 1.0), ("12\n", "12", 1.0), ("\t12=", "12", 0.0),
    ("13", "12", 0.2), ("-3 12", "12", 0.2), ("012", "12", 0.2), ("foo 12", "12", 0.0),
    ("", "12", 0.0), ("   ", "12", 0.0), ("12", None, 0.2), ("twelve", "12", 0.0),
])
def test_addition_reward(completion, label, expected):
    assert addition.addition_reward(["5+7="], [completion], [label]) == [expected]


def test_arithmetic_reward_shares_the_scoring():
    assert arithmetic_reward(["3+4="] * 5, ["7", " 7 \n", "8", "7 x", ""], ["7"] * 5) == [1.0, 1.0, 0.1, 0.0, 0.0]


def test_addition_rows_and_reward_loader():
    rows = arithmetic_rows(addition.MAX_OPERAND)
    assert len(rows) == 2500 and rows[0] == {"prompt": "0+0=", "label": "0"}
    assert {"prompt": "49+49=", "label": "98"} in rows and {"prompt": "17+25=", "label": "42"} in rows
    fn = load_reward_fn(addition.REWARD)
    assert score_batch(fn, ["1+2="] * 3, ["3", " 4", "x"], ["3"] * 3) == [1.0, 0.2, 0.0]


@pytest.mark.parametrize("completion, expected", [
    ("\n3 cat\n2 cat\n1 cat", 1.0),
    ("3 cat\n 2  cat \n\n1 cat\n", 1.0),  # spacing and blank lines do not matter
    ("\n3 cat\n2 cat", 0.5 * 2 / 3),  # stopped early
    ("\n3 cat\n2 cat\n1 cat\n0 cat", 0.5),  # did not stop
    ("\n3 cat\n1 cat\n1 cat", 0.5 * 1 / 3),  # first mistake on the second line
    ("\n3 dog\n2 cat\n1 cat", 0.0),
    ("", 0.0),
])
def test_longtail_reward(completion, expected):
    label = longtail.response("cat", 3).strip()
    assert label == "3 cat\n2 cat\n1 cat"
    assert longtail.longtail_reward(["repeat cat 3:"], [completion], [label]) == [pytest.approx(expected)]
    assert longtail.longtail_reward(["repeat cat 3:"], ["\n1 cat"], [None]) == [0.0]


def test_longtail_rows_are_long_tailed(tokenizer):
    rows = longtail.make_rows(0)
    assert rows == longtail.make_rows(0) != longtail.make_rows(1)
    assert len(rows) == longtail.NUM_PROMPTS
    lengths = []
    for row in rows:
        noun, n = row["prompt"].removeprefix("repeat ").removesuffix(":").split()
        assert noun in bpe.NOUNS and 1 <= int(n) <= 98 and row["label"] == longtail.response(noun, int(n)).strip()
        answer = tokenizer("\n" + row["label"], add_special_tokens=False)["input_ids"]
        assert len(answer) + 1 == 3 * int(n) + 1  # newline, number, noun per line; EOS
        assert len(tokenizer(row["prompt"])["input_ids"]) + longtail.MAX_NEW_TOKENS <= longtail.MAX_MODEL_LEN
        lengths.append(len(answer) + 1)
    median = statistics.median(lengths)
    assert median <= 30 and max(lengths) >= 10 * median and max(lengths) <= longtail.MAX_NEW_TOKENS
    assert sum(n > 150 for n in lengths) >= len(lengths) // 20  # a long tail, not a few outliers


def test_prepare_is_idempotent(tmp_path, monkeypatch):
    out = tmp_path / "addition"
    info = addition.prepare(out, size="tiny", seed=3)
    assert info == {"model": str(out / "model"), "prompts": str(out / "prompts.jsonl"),
                    "reward": addition.REWARD, "max_new_tokens": 16, "max_model_len": 128}
    assert len((tmp_path / "addition" / "prompts.jsonl").read_text().splitlines()) == 2500
    config = json.loads((tmp_path / "addition" / "model" / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["tie_word_embeddings"]) == (512, 128, False)
    lt = longtail.prepare(tmp_path / "longtail", size="tiny", sft_steps=2)
    assert lt["max_model_len"] == longtail.MAX_MODEL_LEN and (tmp_path / "longtail" / "policy" / "config.json").exists()

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt")
    monkeypatch.setattr(learner.tiny.model, "build_tiny_model", no_build)
    monkeypatch.setattr(learner.tiny.sft, "supervised_warmup", no_build)
    assert addition.prepare(tmp_path / "addition", size="tiny", seed=3) == info
    assert longtail.prepare(tmp_path / "longtail", size="tiny", sft_steps=2) == lt
    with pytest.raises(AssertionError, match="rebuilt"):  # other settings: built again
        addition.prepare(tmp_path / "addition", size="tiny", seed=4)


def test_micro_batches_make_the_same_step(tmp_path):
    """Cutting a step's batch into micro-batches of similar lengths gives the same update."""
    base = build_tiny_model(tmp_path / "base", learner.tiny.model.sized_spec("tiny"))
    pairs = [(r["prompt"], "\n" + r["label"]) for r in longtail.make_rows(0, count=12)]
    whole = learner.tiny.sft.supervised_warmup(base, pairs, tmp_path / "a", steps=2, batch_size=8)
    micro = learner.tiny.sft.supervised_warmup(base, pairs, tmp_path / "b", steps=2, batch_size=8, micro_batch_tokens=64)
    assert micro == pytest.approx(whole, rel=1e-4)
