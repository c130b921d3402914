"""Prompt datasets: loading prompt files and serving tokenised prompts in a resumable order.

Supported inputs (chosen by extension / shape):

* ``.jsonl`` - one JSON object per line, blank lines skipped;
* ``.json`` - a JSON list of objects;
* ``.parquet`` - read with pyarrow;
* a directory written by Hugging Face ``datasets.save_to_disk`` (needs the ``datasets`` package).

Each row has an input key (default ``"prompt"``) holding either a plain string or a list of chat
messages ``[{"role": ..., "content": ...}, ...]``, and an optional label key (default ``"label"``)
holding a string, a number (converted to ``str``) or null. Every column but the input key (the
label's too, as it is) whose value is JSON (null, a bool, a number, a string, or lists and objects
of these) is kept with its prompt and handed to the reward functions as a keyword argument; a
column holding anything else (bytes, an image...) is left out, with a warning naming it. Every
problem is reported as a :class:`DatasetError` naming the file, the row and what is wrong; bad rows
are never skipped silently.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "DatasetError",
    "PromptRow",
    "EncodedPrompt",
    "load_prompt_rows",
    "PromptDataset",
]

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class DatasetError(ValueError):
    """A prompt file that cannot be used; the message names the file, the row and the problem."""


@dataclass(frozen=True)
class PromptRow:
    """One validated row. ``index`` is the 0-based position among the file's rows (a stable id)."""

    index: int
    prompt: str | Messages
    label: str | None
    columns: Mapping[str, Any] = field(default_factory=dict)  # the row's other JSON columns, by name


@dataclass(frozen=True)
class EncodedPrompt:
    """A tokenised prompt. ``text`` is the exact text the model sees (chat template rendered if used).

    ``columns`` stay in the learner (reward functions' keyword arguments): only the prompt's index
    goes to the rollouts, and the samples coming back are matched to their row by it."""

    prompt_id: int
    token_ids: list[int]
    label: str | None
    text: str
    columns: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_prompt_rows(
    path: str | Path, *, input_key: str = "prompt", label_key: str = "label"
) -> list[PromptRow]:
    """Read and validate every row of a prompt file (see the module docstring for the formats)."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: prompt file not found")
    if p.is_dir():
        records: Iterable[tuple[str, Any]] = _iter_hf_dir(p)
    else:
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            records = _iter_jsonl(p)
        elif suffix == ".json":
            records = _iter_json(p)
        elif suffix == ".parquet":
            records = _iter_parquet(p)
        else:
            raise DatasetError(
                f"{p}: unsupported prompt file type {p.suffix!r}; "
                "expected .jsonl, .json, .parquet or a datasets.save_to_disk directory"
            )
    rows: list[PromptRow] = []
    left_out: set[str] = set()
    for where, record in records:
        rows.append(_validate_row(p, where, len(rows), record, input_key, label_key, left_out))
    if not rows:
        raise DatasetError(f"{p}: empty prompt file (no rows)")
    if left_out:
        logger.warning("%s: column(s) %s hold values that are not JSON; reward functions do not get them",
                       p, ", ".join(sorted(left_out)))
    return rows


def _iter_jsonl(p: Path) -> Iterator[tuple[str, Any]]:
    with p.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{p}: line {lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
            yield f"line {lineno}", record


def _iter_json(p: Path) -> Iterator[tuple[str, Any]]:
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise DatasetError(f"{p}: empty prompt file (no rows)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DatasetError(f"{p}: a .json prompt file must hold a list of objects, got {type(data).__name__}")
    for i, record in enumerate(data, start=1):
        yield f"row {i}", record


def _iter_parquet(p: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
        raise DatasetError(f"{p}: cannot read parquet file: {e}") from e
    for i, record in enumerate(table.to_pylist(), start=1):
        yield f"row {i}", record


def _iter_hf_dir(p: Path) -> Iterator[tuple[str, Any]]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise DatasetError(
            f"{p}: is a directory; loading a datasets.save_to_disk directory needs the `datasets` "
            "package (pip install datasets), which is not installed"
        ) from e
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DatasetError(f"{p}: cannot load as a datasets.save_to_disk directory: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DatasetError(f"{p}: DatasetDict has splits {splits} and no 'train' split; save one split")
    for i, record in enumerate(ds, start=1):
        yield f"row {i}", record


def _validate_row(
    p: Path, where: str, index: int, record: Any, input_key: str, label_key: str, left_out: set[str]
) -> PromptRow:
    """The row as a PromptRow; names of its columns that are not JSON are added to ``left_out``."""
    if not isinstance(record, dict):
        raise DatasetError(f"{p}: {where}: row is not a JSON object (got {type(record).__name__})")
    if input_key not in record:
        raise DatasetError(
            f"{p}: {where}: missing input key {input_key!r}; the row has keys {sorted(map(str, record))}"
        )
    prompt = _validate_prompt(p, where, input_key, record[input_key])
    label = _validate_label(p, where, label_key, record.get(label_key))
    columns = {}
    for name, value in record.items():
        if name == input_key:
            continue
        if isinstance(name, str) and _is_json(value):
            columns[name] = value
        else:
            left_out.add(str(name))
    return PromptRow(index=index, prompt=prompt, label=label, columns=columns)


def _is_json(value: Any) -> bool:
    """Whether ``value`` is what JSON holds (so reward functions and the reward server get plain data)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_is_json(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _validate_prompt(p: Path, where: str, key: str, value: Any) -> str | Messages:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise DatasetError(f"{p}: {where}: {key!r} is an empty list of messages")
        messages: Messages = []
        for j, m in enumerate(value):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise DatasetError(
                    f"{p}: {where}: {key!r} message {j} must be an object with string 'role' and "
                    f"'content', got {_short(m)}"
                )
            messages.append({"role": m["role"], "content": m["content"]})
        return messages
    raise DatasetError(
        f"{p}: {where}: {key!r} must be a string or a list of {{role, content}} messages, "
        f"got {type(value).__name__}"
    )


def _validate_label(p: Path, where: str, key: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DatasetError(
            f"{p}: {where}: label {key!r} must be a string, a number or null, got {type(value).__name__}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise DatasetError(f"{p}: {where}: label {key!r} is not finite ({value})")
    return str(value)


def _short(value: Any, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Tokenised dataset with a resumable, epoch-aware order
# --------------------------------------------------------------------------------------------------


class PromptDataset:
    """Tokenised prompts served in a deterministic, resumable order.

    Epoch ``e`` visits every kept prompt once, in the order of
    ``numpy.random.default_rng(seed + e).permutation(len(self))`` (file order when ``shuffle`` is
    False). :meth:`next_batch` wraps into the next epoch seamlessly; :meth:`state_dict` /
    :meth:`load_state_dict` let a restarted run continue exactly where it stopped.
    """

    def __init__(
        self,
        rows: Sequence[PromptRow],
        tokenizer: Any,
        *,
        max_prompt_len: int,
        apply_chat_template: bool | None = None,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if max_prompt_len <= 0:
            raise ValueError(f"max_prompt_len must be positive, got {max_prompt_len}")
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if apply_chat_template is None:
            apply_chat_template = has_template
        elif apply_chat_template and not has_template:
            raise DatasetError("apply_chat_template=True but the tokenizer has no chat_template")
        self.max_prompt_len = int(max_prompt_len)
        self.apply_chat_template = bool(apply_chat_template)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)

        texts, specials = [], []
        seen: set[int] = set()
        for row in rows:
            if row.index in seen:
                raise DatasetError(f"duplicate prompt row index {row.index}")
            seen.add(row.index)
            if isinstance(row.prompt, str) and not self.apply_chat_template:
                texts.append(row.prompt)
                specials.append(True)
            else:
                messages = row.prompt if not isinstance(row.prompt, str) else [{"role": "user", "content": row.prompt}]
                if not has_template:
                    raise DatasetError(
                        f"row {row.index}: prompt is a list of chat messages but the tokenizer has no chat_template"
                    )
                texts.append(
                    tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                )
                # The rendered template carries its own special tokens (BOS etc.).
                specials.append(False)

        token_ids = _tokenize(tokenizer, texts, specials)
        self._prompts: list[EncodedPrompt] = []
        self.num_filtered = 0
        for row, text, ids in zip(rows, texts, token_ids):
            if len(ids) > self.max_prompt_len:
                self.num_filtered += 1
                continue
            self._prompts.append(EncodedPrompt(prompt_id=row.index, token_ids=ids, label=row.label, text=text,
                                               columns=row.columns))
        if not texts:
            raise DatasetError("no prompts given")
        if self.num_filtered:
            dropped = (f"dropped {self.num_filtered} of {len(texts)} prompts, longer than {self.max_prompt_len} "
                       f"tokens (the longest has {max(map(len, token_ids))}): raise data.max_prompt_len and "
                       f"rollout.max_model_len to keep them")
            if not self._prompts:
                raise DatasetError(f"no prompts left: {dropped}")
            logger.warning(dropped)
        self._by_id = {p.prompt_id: p for p in self._prompts}
        self._epoch = 0
        self._offset = 0
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._prompts)

    @property
    def epoch(self) -> int:
        return self._epoch

    def get(self, prompt_id: int) -> EncodedPrompt:
        try:
            return self._by_id[prompt_id]
        except KeyError:
            raise KeyError(f"unknown or filtered prompt_id {prompt_id}") from None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self._prompts)
            if self.shuffle:
                self._order = np.random.default_rng(self.seed + epoch).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        assert self._order is not None
        return self._order

    def next_batch(self, n: int) -> list[EncodedPrompt]:
        """The next ``n`` prompts, continuing into the next epoch(s) when this one runs out."""
        if n <= 0:
            raise ValueError(f"batch size must be positive, got {n}")
        out: list[EncodedPrompt] = []
        size = len(self._prompts)
        while len(out) < n:
            order = self._epoch_order(self._epoch)
            take = min(n - len(out), size - self._offset)
            out.extend(self._prompts[i] for i in order[self._offset : self._offset + take])
            self._offset += take
            if self._offset >= size:
                self._epoch += 1
                self._offset = 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "offset": self._offset, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = {"epoch", "offset", "seed"} - set(state)
        if missing:
            raise ValueError(f"prompt dataset state is missing {sorted(missing)}")
        epoch, offset, seed = int(state["epoch"]), int(state["offset"]), int(state["seed"])
        if epoch < 0 or not 0 <= offset < len(self._prompts):
            raise ValueError(
                f"prompt dataset state epoch={epoch} offset={offset} does not fit a dataset of "
                f"{len(self._prompts)} prompts (was the prompt file or max_prompt_len changed?)"
            )
        self._epoch, self._offset, self.seed = epoch, offset, seed
        self._order_epoch = -1


def _tokenize(tokenizer: Any, texts: list[str], specials: list[bool]) -> list[list[int]]:
    """Batch-tokenise ``texts``; ``specials[i]`` says whether to add the tokenizer's special tokens."""
    out: list[list[int] | None] = [None] * len(texts)
    for flag in (True, False):
        idx = [i for i, s in enumerate(specials) if s is flag]
        if not idx:
            continue
        enc = tokenizer([texts[i] for i in idx], add_special_tokens=flag)["input_ids"]
        for i, ids in zip(idx, enc):
            out[i] = list(ids)
    return out  # type: ignore[return-value]
