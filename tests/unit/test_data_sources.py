"""Where prompts come from (learner/data/prompts.py): CSV files, globs, directories, saved datasets and Hub ids
through the `datasets` library, splits and subsets, several datasets concatenated or mixed with weights."""

from __future__ import annotations

import json
from collections import Counter

import datasets
import huggingface_hub.constants
import numpy as np
import pytest

from learner.data.prompts import (MIX_BLOCK, DatasetError, DataSpec, PromptDataset, PromptRow, load_prompt_rows,
                          load_prompts)
from learner.tiny.model import build_tokenizer
from protocol.config import DataConfig


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompts_of(rows):
    return [r.prompt for r in rows]


# ---------------------------------------------------------------------------- kinds of source


def test_csv_file_through_datasets(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text('question,answer,level\n"1+1=",2,easy\n"say ""hi""",hi,hard\n')
    rows = load_prompt_rows(p, input_key="question", label_key="answer")
    # a CSV column has one type (here string, as one answer is not a number)
    assert rows == [PromptRow(0, "1+1=", "2", {"answer": "2", "level": "easy"}),
                    PromptRow(1, 'say "hi"', "hi", {"answer": "hi", "level": "hard"})]
    with pytest.raises(DatasetError, match=r"q\.csv: row 1: missing input key 'prompt'; the row has keys "
                                           r"\['answer', 'level', 'question'\]"):
        load_prompt_rows(p)


def test_glob_reads_every_matching_file_in_name_order_and_errors_name_the_file(tmp_path):
    write_jsonl(tmp_path / "data" / "b.jsonl", [{"prompt": "b0"}])
    write_jsonl(tmp_path / "data" / "a.jsonl", [{"prompt": "a0"}, {"prompt": "a1"}])
    write_jsonl(tmp_path / "data" / "deep" / "c.jsonl", [{"prompt": "c0"}])
    (tmp_path / "data" / "notes.txt").write_text("not data")
    assert prompts_of(load_prompt_rows(tmp_path / "data" / "*.jsonl")) == ["a0", "a1", "b0"]
    assert prompts_of(load_prompt_rows(tmp_path / "data" / "**" / "*.jsonl")) == ["a0", "a1", "b0", "c0"]
    assert prompts_of(load_prompt_rows(tmp_path / "data" / "*.jsonl", split="train[1:]")) == ["a1", "b0"]
    (tmp_path / "data" / "b.jsonl").write_text('{"prompt": "b0"}\n{"text": "b1"}\n')
    with pytest.raises(DatasetError, match=r"data/b\.jsonl: line 2: missing input key 'prompt'"):
        load_prompt_rows(tmp_path / "data" / "*.jsonl")
    with pytest.raises(DatasetError, match=r"\*\.parquet: no file matches this pattern"):
        load_prompt_rows(tmp_path / "data" / "*.parquet")


def test_a_file_has_one_split_train_which_can_be_sliced(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(10)])
    assert prompts_of(load_prompt_rows(p, split="train[:3]")) == ["q0", "q1", "q2"]
    assert prompts_of(load_prompt_rows(p, split="train[-2:]")) == ["q8", "q9"]
    assert prompts_of(load_prompt_rows(p, split="train[:10%]+train[90%:]")) == ["q0", "q9"]
    assert [r.index for r in load_prompt_rows(p, split="train[5:7]")] == [0, 1]  # numbered as loaded
    with pytest.raises(DatasetError, match=r"p\.jsonl: split 'test': .*its splits: train"):
        load_prompt_rows(p, split="test")


def test_directory_of_data_files_splits_by_file_name(tmp_path):
    d = tmp_path / "corpus"
    write_jsonl(d / "train.jsonl", [{"prompt": "t0", "label": 1}, {"prompt": "t1", "label": 2.5}])
    write_jsonl(d / "test.jsonl", [{"prompt": "e0", "label": 3}])
    assert load_prompt_rows(d) == [PromptRow(0, "t0", "1", {"label": 1}), PromptRow(1, "t1", "2.5", {"label": 2.5})]
    assert load_prompt_rows(d, split="test") == [PromptRow(0, "e0", "3", {"label": 3})]
    assert prompts_of(load_prompt_rows(d, split="train[1:]+test")) == ["t1", "e0"]
    with pytest.raises(DatasetError, match=r"corpus: split 'dev': .*its splits: train, test"):
        load_prompt_rows(d, split="dev")
    # the files are read as written: datasets' JSON loader would give the column one type for all rows
    write_jsonl(d / "test.jsonl", [{"prompt": "e0"}, {"prompt": 5}])
    with pytest.raises(DatasetError, match=r"corpus/test\.jsonl: line 2: 'prompt' must be a string"):
        load_prompt_rows(d, split="test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: cannot read as a directory of data files: .*data files"):
        load_prompt_rows(tmp_path / "empty")


def test_directory_subsets_are_the_configurations_its_readme_declares(tmp_path):
    d = tmp_path / "levels"
    write_jsonl(d / "easy" / "part.jsonl", [{"prompt": "1+1="}])
    write_jsonl(d / "hard" / "train.jsonl", [{"prompt": "12*13="}])
    write_jsonl(d / "hard" / "test.jsonl", [{"prompt": "17*19="}])
    (d / "README.md").write_text("---\nconfigs:\n- config_name: easy\n  data_files: easy/*.jsonl\n"
                                 "- config_name: hard\n  data_files:\n  - split: train\n    path: hard/train.jsonl\n"
                                 "  - split: test\n    path: hard/test.jsonl\n---\n")
    assert prompts_of(load_prompt_rows(d, subset="easy")) == ["1+1="]
    assert prompts_of(load_prompt_rows(d, subset="hard", split="test")) == ["17*19="]
    with pytest.raises(DatasetError, match=r"levels: cannot read as a directory of data files: .*'medium'"):
        load_prompt_rows(d, subset="medium")


def test_saved_dataset_dict_split_and_slice(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "label": [1, 2, 3]}),
                          "test": datasets.Dataset.from_dict({"prompt": ["x"], "label": [9]})}).save_to_disk(saved)
    assert load_prompt_rows(saved) == [PromptRow(0, "a", "1", {"label": 1}), PromptRow(1, "b", "2", {"label": 2}),
                                       PromptRow(2, "c", "3", {"label": 3})]
    assert prompts_of(load_prompt_rows(saved, split="test")) == ["x"]
    assert prompts_of(load_prompt_rows(saved, split="train[1:]+test")) == ["b", "c", "x"]
    with pytest.raises(DatasetError, match=r"saved: split 'dev': .*its splits: train, test"):
        load_prompt_rows(saved, split="dev")
    one = tmp_path / "one"
    datasets.Dataset.from_dict({"prompt": ["a", "b"]}).save_to_disk(one)
    assert prompts_of(load_prompt_rows(one, split="train[-1:]")) == ["b"]
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(tmp_path / "bad")
    with pytest.raises(DatasetError, match=r"bad \(train\): row 1: missing input key 'prompt'"):
        load_prompt_rows(tmp_path / "bad")


def test_a_subset_applies_to_hub_datasets_and_directories_only(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(DatasetError, match=r"p\.jsonl: --data\.subset 'main' does not apply to a file"):
        load_prompt_rows(p, subset="main")
    with pytest.raises(DatasetError, match=r"--eval\.subset 'main' does not apply to a glob of files"):
        load_prompt_rows(tmp_path / "*.jsonl", subset="main", section="eval")


def test_hub_id_goes_through_load_dataset_and_fails_clearly_without_the_hub(monkeypatch):
    """No network here: offline mode makes the Hub unreachable at once (instead of after retries)."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    with pytest.raises(DatasetError, match=r"^nobody-here/no-dataset: cannot load the Hugging Face Hub dataset "
                                           r"\(split 'test', subset 'main'\): .*HF_HUB_OFFLINE=1"):
        load_prompt_rows("nobody-here/no-dataset", split="test", subset="main")
    assert calls == [(("nobody-here/no-dataset",), {"name": "main", "split": "test"})]


def test_missing_local_source(tmp_path):
    for missing in (tmp_path / "nope", tmp_path / "nope.csv", "./nope"):
        with pytest.raises(DatasetError, match="prompt file not found"):
            load_prompt_rows(missing)


# ---------------------------------------------------------------------------- several sources


def test_sources_are_numbered_across_and_take_their_own_split(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a0"}, {"prompt": "a1"}, {"prompt": "a2"}])
    b = tmp_path / "b.csv"
    b.write_text("prompt\nb0\nb1\n")
    rows = load_prompts(DataSpec(paths=(str(a), str(b)), splits=("train[1:]", "train")))
    assert [(r.index, r.prompt, r.source) for r in rows] == [(0, "a1", 0), (1, "a2", 0), (2, "b0", 1), (3, "b1", 1)]
    config = DataConfig(path=[str(a), str(b)], split=["train[:1]"], subset=[""], weights=[1, 3])
    spec = DataSpec.of(config)
    assert spec.weights == (1, 3) and spec.sources() == [(str(a), "train[:1]", ""), (str(b), "train[:1]", "")]
    assert prompts_of(load_prompts(spec)) == ["a0", "b0"]
    with pytest.raises(DatasetError, match=r"--data\.split has 3 entries for 2 dataset\(s\) in --data\.path"):
        load_prompts(DataSpec(paths=(str(a), str(b)), splits=("train",) * 3))
    with pytest.raises(DatasetError, match=r"--data\.weights has 1 entries for 2 dataset"):
        DataSpec(paths=(str(a), str(b)), weights=(1.0,)).sources()


def test_a_section_with_a_single_path_string_is_one_source(tmp_path):
    """Another config section (an eval set) may keep `path` a string and lack the other options."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"question": "q"}])

    class Section:
        path = str(a)
        input_key = "question"

    spec = DataSpec.of(Section(), section="eval")
    assert spec == DataSpec(paths=(str(a),), input_key="question", section="eval")
    assert prompts_of(load_prompts(spec)) == ["q"]


def rows_of_sources(*sizes):
    rows = []
    for source, size in enumerate(sizes):
        rows += [PromptRow(len(rows) + i, f"s{source}q{i}", None, source=source) for i in range(size)]
    return rows


def ids(batch):
    return [p.prompt_id for p in batch]


def test_concatenated_sources_are_one_dataset(tok):
    """Without weights several sources are one dataset: each epoch serves every prompt of each once."""
    ds = PromptDataset(rows_of_sources(3, 2), tok, max_prompt_len=10, seed=4)
    assert ids(ds.next_batch(5)) == np.random.default_rng(4).permutation(5).tolist()
    assert ds.state_dict() == {"epoch": 1, "offset": 0, "seed": 4}


def test_mixture_follows_the_documented_draws_and_orders(tok):
    """Hand-derived from the class docstring: draw k's source from block k // MIX_BLOCK's generator,
    each source's prompts in its own per-epoch permutation."""
    seed, weights = 5, (1.0, 3.0)
    ds = PromptDataset(rows_of_sources(3, 4), tok, max_prompt_len=10, seed=seed, weights=weights)
    draws = np.random.default_rng([seed, 0, 0]).choice(2, size=MIX_BLOCK, p=[0.25, 0.75])[:12]
    orders = {s: [np.random.default_rng([seed, s + 1, e]).permutation(n).tolist() for e in range(12)]
              for s, n in ((0, 3), (1, 4))}
    first = {0: 0, 1: 3}  # prompt id of each source's first row
    expected, served = [], Counter()
    for s in draws:
        epoch, at = divmod(served[s], 3 if s == 0 else 4)
        expected.append(first[s] + orders[s][epoch][at])
        served[s] += 1
    assert ids(ds.next_batch(5)) + ids(ds.next_batch(7)) == expected
    assert ds.state_dict() == {"seed": seed, "drawn": 12, "datasets": [
        {"epoch": served[0] // 3, "offset": served[0] % 3}, {"epoch": served[1] // 4, "offset": served[1] % 4}]}


def test_mixture_serves_each_source_once_per_epoch_in_proportion_to_its_weight(tok):
    ds = PromptDataset(rows_of_sources(5, 20), tok, max_prompt_len=10, seed=1, weights=[3, 1])
    served = ids(ds.next_batch(3000))
    from_first = [i for i in served if i < 5]
    from_second = [i for i in served if i >= 5]
    assert 0.72 < len(from_first) / len(served) < 0.78
    for stream, size in ((from_first, 5), (from_second, 20)):
        for epoch in range(len(stream) // size):
            assert sorted(stream[epoch * size:(epoch + 1) * size]) == sorted(set(stream)), epoch
    # the same seed gives the same prompts, another seed others
    again = PromptDataset(rows_of_sources(5, 20), tok, max_prompt_len=10, seed=1, weights=[3, 1])
    other = PromptDataset(rows_of_sources(5, 20), tok, max_prompt_len=10, seed=2, weights=[3, 1])
    assert ids(again.next_batch(3000)) == served and ids(other.next_batch(3000)) != served


def test_mixture_state_round_trip_across_a_draw_block(tok):
    rows = rows_of_sources(7, 3, 11)
    a = PromptDataset(rows, tok, max_prompt_len=10, seed=9, weights=[1, 1, 2])
    for _ in range(MIX_BLOCK // 100 - 1):
        a.next_batch(100)
    state = json.loads(json.dumps(a.state_dict()))
    b = PromptDataset(rows, tok, max_prompt_len=10, seed=0, weights=[1, 1, 2])
    b.load_state_dict(state)
    for _ in range(4):  # through the end of the first block of draws
        assert ids(b.next_batch(100)) == ids(a.next_batch(100))
    unmixed = PromptDataset(rows, tok, max_prompt_len=10, seed=9)
    with pytest.raises(ValueError, match=r"missing \['epoch', 'offset'\].*run with data\.weights"):
        unmixed.load_state_dict(state)
    with pytest.raises(ValueError, match=r"missing \['datasets', 'drawn'\].*run without data\.weights"):
        b.load_state_dict(unmixed.state_dict())
    two = PromptDataset(rows_of_sources(7, 14), tok, max_prompt_len=10, seed=9, weights=[1, 1])
    with pytest.raises(ValueError, match="positions in 3 datasets, this run mixes 2"):
        two.load_state_dict(state)


def test_mixture_errors(tok):
    with pytest.raises(DatasetError, match="2 mixing weights for rows of 3 dataset"):
        PromptDataset(rows_of_sources(2, 2, 2), tok, max_prompt_len=10, seed=0, weights=[1, 1])
    with pytest.raises(DatasetError, match="mixing weights must be finite numbers > 0"):
        PromptDataset(rows_of_sources(2, 2), tok, max_prompt_len=10, seed=0, weights=[1, 0])
    rows = rows_of_sources(2) + [PromptRow(2, "a" * 20, None, source=1)]
    with pytest.raises(DatasetError, match=r"no prompts left in dataset 2 of 2 \(mixed with weights\): dropped 1"):
        PromptDataset(rows, tok, max_prompt_len=10, seed=0, weights=[1, 1])
