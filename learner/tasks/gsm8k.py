"""GSM8K (grade-school math word problems): data preparation and a verifiable reward.

Get the dataset files yourself (this project downloads nothing), e.g. from the Hugging Face hub
`openai/gsm8k`, config `main`: `main/train-00000-of-00001.parquet` and `main/test-00000-of-00001.parquet`
(columns `question` and `answer`, the answer being worked reasoning that ends in `#### 72`). Then::

    python -m learner.tasks.gsm8k prepare train-00000-of-00001.parquet data/gsm8k_train.jsonl

writes this project's prompt file: one `{"prompt": ..., "label": "72"}` per problem, the prompt
asking the model to reason and end with `#### <number>`. Train with
`configs/qwen2.5-0.5b-gsm8k.yaml` (reward function `learner.tasks.gsm8k:gsm8k_reward`).

Reward (`gsm8k_reward`): 1.0 when the completion's final answer equals the reference numerically,
else FORMAT_BONUS (0.1) when the completion contains `####` (it followed the answer format), else
0.0. `gsm8k_accuracy` is the same without the bonus (1.0 / 0.0), for evaluation or for a reward
without format shaping. The final answer is the first number after the last `####`; failing that,
the first number after the last "answer is" on the same line; failing that, the last number in the
completion. Numbers may be negative, decimal and use thousands commas ("$1,234.50" is 1234.5);
they are compared exactly as decimals ("72.00" equals "72").
"""

from __future__ import annotations

import argparse
import json
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

FORMAT_BONUS = 0.1
ANSWER_MARK = "####"
PROMPT_TEMPLATE = ("{question}\n\nSolve the problem step by step. At the end, write the final answer as a "
                   "plain number on its own line in the form \"#### <number>\".")

# A number: optional minus (not a hyphen inside a word or range like "3-4"), digits with optional
# thousands commas, optional decimals; not the tail of a longer number ("1,2345", "0.5").
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?<![\d.,])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer\s+is", re.IGNORECASE)


def parse_number(text: str) -> Decimal | None:
    """The decimal value of a number matched by _NUMBER (commas dropped), or None."""
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def _first_number(text: str) -> Decimal | None:
    match = _NUMBER.search(text)
    return parse_number(match.group()) if match else None


def _last_number(text: str) -> Decimal | None:
    matches = _NUMBER.findall(text)
    return parse_number(matches[-1]) if matches else None


def extract_reference(label: str | int | float | None) -> Decimal | None:
    """The reference number of a label: GSM8K's answer field (the number after the last '####'),
    or a plain number. None when there is none."""
    if label is None:
        return None
    text = str(label)
    if ANSWER_MARK in text:
        return _first_number(text.rsplit(ANSWER_MARK, 1)[1])
    stripped = text.strip()
    if _NUMBER.fullmatch(stripped):
        return parse_number(stripped)
    return _last_number(text)


def extract_answer(completion: str) -> Decimal | None:
    """The model's final answer: the number after the last '####', else after the last 'answer is'
    (same line), else the last number in the completion; None when there is no number."""
    if ANSWER_MARK in completion:
        value = _first_number(completion.rsplit(ANSWER_MARK, 1)[1])
        if value is not None:
            return value
    matches = list(_ANSWER_IS.finditer(completion))
    if matches:
        rest_of_line = completion[matches[-1].end():].split("\n", 1)[0]
        value = _first_number(rest_of_line)
        if value is not None:
            return value
    return _last_number(completion)


def score_completion(completion: str, label: str | None, format_bonus: float = FORMAT_BONUS) -> float:
    """1.0 if correct; otherwise `format_bonus` if the completion contains '####', else 0.0.
    A label without a number scores every completion as wrong."""
    reference, answer = extract_reference(label), extract_answer(completion)
    if reference is not None and answer is not None and answer == reference:
        return 1.0
    return format_bonus if ANSWER_MARK in completion else 0.0


def gsm8k_reward(prompts: list[str], completions: list[str], labels: list[str | None]) -> list[float]:
    """Batched reward for training: 1.0 correct, 0.1 wrong but in the '#### <number>' format, else 0.0."""
    return [score_completion(c, label) for c, label in zip(completions, labels)]


def gsm8k_accuracy(prompts: list[str], completions: list[str], labels: list[str | None]) -> list[float]:
    """Batched exact-answer accuracy: 1.0 correct, 0.0 otherwise (no format bonus)."""
    return [score_completion(c, label, format_bonus=0.0) for c, label in zip(completions, labels)]


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    raise ValueError(f"{path}: expected a .parquet, .jsonl or .json file of GSM8K rows (question, answer)")


def _format_number(value: Decimal) -> str:
    """'72' for 72 and 72.00, '-3.5' for -3.50: a canonical plain-number label."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def prepare_gsm8k(parquet_or_jsonl_in: str | Path, jsonl_out: str | Path,
                  template: str = PROMPT_TEMPLATE) -> int:
    """Convert GSM8K rows (`question`, `answer` ending in '#### <number>') to prompt/label JSONL:
    prompt = template.format(question=...), label = the reference number as a plain string.
    Returns the number of rows written; a row without a question or a reference number is an
    error naming it."""
    src, out = Path(parquet_or_jsonl_in), Path(jsonl_out)
    rows = _read_rows(src)
    lines = []
    for i, row in enumerate(rows, start=1):
        question, answer = (row.get("question"), row.get("answer")) if isinstance(row, dict) else (None, None)
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{src}: row {i}: no 'question' string")
        reference = extract_reference(answer) if isinstance(answer, (str, int, float)) else None
        if reference is None:
            raise ValueError(f"{src}: row {i}: no reference number in 'answer' ({str(answer)[-60:]!r})")
        lines.append(json.dumps({"prompt": template.format(question=question.strip()),
                                 "label": _format_number(reference)}, ensure_ascii=False) + "\n")
    if not lines:
        raise ValueError(f"{src}: no rows")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(out)
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="GSM8K task helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="Convert GSM8K parquet/JSONL (question, answer) to prompt/label JSONL.")
    p.add_argument("input", help="GSM8K file: .parquet (Hugging Face openai/gsm8k), .jsonl or .json")
    p.add_argument("output", help="Prompt JSONL to write (for data.path)")
    args = parser.parse_args()
    print(json.dumps({"rows": prepare_gsm8k(args.input, args.output), "path": args.output}))


if __name__ == "__main__":
    main()
