"""Prompt datasets: loading prompt data and serving tokenised prompts in a resumable order.

Where a run's prompts come from is a :class:`DataSpec` (the options of the ``data`` config section;
another section can give one the same way): one or more sources, each

* a ``.jsonl`` file (one JSON object per line, blank lines skipped), a ``.json`` file (a list of
  objects) or a ``.parquet`` file, read as written (values keep their types; errors name the line);
* a ``.csv`` file, read by the ``datasets`` library (column types as it infers them);
* a glob of such files (``data/*.jsonl``; ``**`` for any depth), read file after file in name order;
* a directory of such files, which ``datasets`` assigns to splits as ``load_dataset`` would (from
  their names, ``train.jsonl``, ``data/test-00000-of-00001.parquet``, ..., or from the
  configurations its ``README.md`` declares) and which are then read as above;
* a directory written by ``datasets``' ``save_to_disk`` (``load_from_disk``);
* a Hugging Face Hub dataset id (``name`` or ``org/name``), loaded by ``datasets.load_dataset``.

Files are read by this module rather than by ``datasets``' JSON loader, which gives a column one type
across all rows (a JSONL file with a string prompt in one row and a number in another comes back
with JSON-encoded strings). Each source has a split in ``datasets``' syntax (``"test"``,
``"train[:100]"``, ``"train[:50%]+test"``; a file or a glob has the one split ``"train"``) and, for a
Hub dataset or a directory with configurations, a subset (configuration name). Several sources are
concatenated, or mixed with weights (see :class:`PromptDataset`).

Each row has an input key (default ``"prompt"``) holding either a plain string or a list of chat
messages ``[{"role": ..., "content": ...}, ...]``, and an optional label key (default ``"label"``)
holding a string, a number (converted to ``str``) or null. Every column but the input key (the
label's too, as it is) whose value is JSON (null, a bool, a number, a string, or lists and objects
of these) is kept with its prompt and handed to the reward functions as a keyword argument; a
column holding anything else (bytes, an image...) is left out, with a warning naming it. Every
problem is reported as a :class:`DatasetError` naming the source (the file), the row and what is
wrong; bad rows are never skipped silently.
"""

from __future__ import annotations

import glob
import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from protocol.config import DATA_FILE_SUFFIXES, is_glob, is_local_dataset

__all__ = [
    "DatasetError",
    "DataSpec",
    "PromptRow",
    "EncodedPrompt",
    "load_prompts",
    "load_prompt_rows",
    "PromptDataset",
]

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Records = Iterable[tuple[str, Any]]  # (where the row is, e.g. "p.jsonl: line 3"; the row)


class DatasetError(ValueError):
    """Prompt data that cannot be used; the message names the source, the row and the problem."""


@dataclass(frozen=True)
class PromptRow:
    """One validated row. ``index`` is the 0-based position among the rows of all sources (a stable
    id), ``source`` the position of its source in the DataSpec."""

    index: int
    prompt: str | Messages
    label: str | None
    columns: Mapping[str, Any] = field(default_factory=dict)  # the row's other JSON columns, by name
    source: int = 0


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


@dataclass(frozen=True)
class DataSpec:
    """Where prompts come from. ``splits`` and ``subsets`` hold one entry for every path or one per
    path (``subsets`` may be empty, and an entry ``""``: none); ``weights`` is empty (the sources
    are concatenated) or holds one weight > 0 per path (they are mixed, see PromptDataset).
    ``section`` is the config section the spec came from, named in errors."""

    paths: tuple[str, ...]
    splits: tuple[str, ...] = ("train",)
    subsets: tuple[str | None, ...] = ()
    weights: tuple[float, ...] = ()
    input_key: str = "prompt"
    label_key: str = "label"
    section: str = "data"

    @classmethod
    def of(cls, config_section: Any, section: str = "data") -> DataSpec:
        """The spec of a config section with the options of ``data`` (path, and optionally split, subset,
        weights, input_key, label_key; a missing one takes its default, a ``path`` string is one source)."""
        path = config_section.path
        return cls(paths=(path,) if isinstance(path, str) else tuple(path),
                   splits=tuple(getattr(config_section, "split", cls.splits)),
                   subsets=tuple(getattr(config_section, "subset", cls.subsets)),
                   weights=tuple(getattr(config_section, "weights", cls.weights)),
                   input_key=getattr(config_section, "input_key", cls.input_key),
                   label_key=getattr(config_section, "label_key", cls.label_key), section=section)

    def sources(self) -> list[tuple[str, str, str]]:
        """(path, split, subset) of every source, in order."""
        n = len(self.paths)
        if not n:
            raise DatasetError(f"--{self.section}.path: no dataset given")
        if self.weights and len(self.weights) != n:
            raise self._count_error("weights", len(self.weights))
        splits = self._one_or_each("split", self.splits, n)
        subsets = self._one_or_each("subset", self.subsets or ("",), n)
        return [(path, split, subset or "") for path, split, subset in zip(self.paths, splits, subsets)]

    def _one_or_each(self, key: str, values: tuple, n: int) -> tuple:
        if len(values) not in (1, n):
            raise self._count_error(key, len(values))
        return values * (n // len(values))

    def _count_error(self, key: str, count: int) -> DatasetError:
        return DatasetError(f"--{self.section}.{key} has {count} entries for {len(self.paths)} dataset(s) in "
                            f"--{self.section}.path")


def load_prompts(spec: DataSpec) -> list[PromptRow]:
    """Every row of every source of ``spec``, validated; ``index`` numbers them across the sources."""
    rows: list[PromptRow] = []
    for number, (path, split, subset) in enumerate(spec.sources()):
        for row in load_prompt_rows(path, split=split, subset=subset, input_key=spec.input_key,
                                    label_key=spec.label_key, section=spec.section):
            rows.append(replace(row, index=len(rows), source=number))
    return rows


def load_prompt_rows(
    path: str | Path, *, split: str = "train", subset: str = "", input_key: str = "prompt",
    label_key: str = "label", section: str = "data",
) -> list[PromptRow]:
    """Read and validate every row of one source (see the module docstring for what it may be)."""
    source = str(path)
    rows: list[PromptRow] = []
    left_out: set[str] = set()
    for where, record in _source_records(source, split, subset, section):
        rows.append(_validate_row(where, len(rows), record, input_key, label_key, left_out))
    if not rows:
        raise DatasetError(f"{source}: empty prompt file (no rows)" if split == "train"
                           else f"{source}: split {split!r} has no rows")
    if left_out:
        logger.warning("%s: column(s) %s hold values that are not JSON; reward functions do not get them",
                       source, ", ".join(sorted(left_out)))
    return rows


def _source_records(source: str, split: str, subset: str, section: str) -> Records:
    """The (where, row) pairs of a source's split: by the source's kind, see the module docstring."""
    p = Path(source)
    if not is_local_dataset(source, Path.cwd()):
        return _hub_records(source, split, subset)
    if is_glob(source):
        files = sorted(f for f in glob.glob(source, recursive=True) if Path(f).is_file())
        if not files:
            raise DatasetError(f"{source}: no file matches this pattern")
        splits, kind = {"train": files}, "a glob of files"
    elif p.is_file():
        splits, kind = {"train": [source]}, "a file"
    elif p.is_dir() and _is_saved_dataset(p):
        _no_subset(source, subset, section, "a save_to_disk directory")
        return _saved_dataset_records(p, split)
    elif p.is_dir():
        return _select_split(source, _files_loaders(_directory_splits(p, subset)), split)
    else:
        raise DatasetError(f"{source}: prompt file not found")
    _no_subset(source, subset, section, kind)
    return _select_split(source, _files_loaders(splits), split)


def _no_subset(source: str, subset: str, section: str, kind: str) -> None:
    if subset:
        raise DatasetError(f"{source}: --{section}.subset {subset!r} does not apply to {kind} (a subset is a "
                           f"configuration of a Hub dataset or a directory of data files)")


def _directory_splits(p: Path, subset: str) -> dict[str, list[str]]:
    """Split -> data files of a directory, as datasets.load_dataset finds them (from the file names, or
    the configurations its README.md declares)."""
    datasets = _import_datasets(str(p))
    try:
        builder = datasets.load_dataset_builder(str(p), name=subset or None)
    except Exception as e:  # no data files, an unknown subset, ...
        raise DatasetError(f"{p}: cannot read as a directory of data files: {type(e).__name__}: {e}") from e
    return {str(name): sorted(map(str, files)) for name, files in builder.config.data_files.items()}


def _files_loaders(splits: Mapping[str, list[str]]) -> dict[str, Callable[[], list[tuple[str, Any]]]]:
    """Split -> a function reading its files (only the splits asked for are read)."""
    return {name: (lambda files=files: [r for f in files for r in _file_records(Path(f))])
            for name, files in splits.items()}


def _file_records(p: Path) -> Records:
    """A data file's rows, read as written (JSONL, JSON, Parquet), or by datasets (CSV)."""
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _iter_jsonl(p)
    if suffix == ".json":
        return _iter_json(p)
    if suffix == ".parquet":
        return _iter_parquet(p)
    if suffix == ".csv":
        return _iter_csv(p)
    raise DatasetError(f"{p}: unsupported prompt file type {p.suffix!r}; expected one of "
                       f"{', '.join(DATA_FILE_SUFFIXES)}, a glob of such files, a directory or a Hub dataset id")


def _select_split(source: str, splits: Mapping[str, Callable[[], list[tuple[str, Any]]]], split: str) -> Records:
    """The records ``split`` selects, in datasets' syntax ('train', 'test[:100]', 'train[:10%]+test'),
    from split -> a function reading its records."""
    if split in splits:
        return splits[split]()
    datasets = _import_datasets(source)
    try:
        instruction = datasets.ReadInstruction.from_spec(split)
    except (ValueError, AssertionError) as e:
        raise DatasetError(f"{source}: split {split!r}: {e}") from None
    records = {name: read() for name, read in splits.items()}
    try:
        ranges = instruction.to_absolute({name: len(rows) for name, rows in records.items()})
    except (ValueError, AssertionError) as e:
        raise DatasetError(f"{source}: split {split!r}: {e} (its splits: {', '.join(splits)})") from None
    return [r for i in ranges for r in records[i.splitname][i.from_:i.to]]


def _iter_jsonl(p: Path) -> Iterator[tuple[str, Any]]:
    with p.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{p}: line {lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
            yield f"{p}: line {lineno}", record


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
        yield f"{p}: row {i}", record


def _iter_parquet(p: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
        raise DatasetError(f"{p}: cannot read parquet file: {e}") from e
    for i, record in enumerate(table.to_pylist(), start=1):
        yield f"{p}: row {i}", record


def _iter_csv(p: Path) -> Iterator[tuple[str, Any]]:
    datasets = _import_datasets(str(p))
    try:
        table = datasets.load_dataset("csv", data_files=str(p), split="train")
    except Exception as e:  # pandas' parser errors, an empty file, ...
        raise DatasetError(f"{p}: cannot read CSV file: {e}") from e
    yield from _table_records(str(p), table)


def _is_saved_dataset(p: Path) -> bool:
    """Whether ``p`` was written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def _saved_dataset_records(p: Path, split: str) -> Records:
    datasets = _import_datasets(str(p))
    try:
        saved = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DatasetError(f"{p}: cannot load as a datasets.save_to_disk directory: {e}") from e
    tables = saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
    return _select_split(str(p), {name: (lambda name=name, table=table: list(_table_records(f"{p} ({name})", table)))
                                  for name, table in tables.items()}, split)


def _hub_records(source: str, split: str, subset: str) -> Records:
    datasets = _import_datasets(source)
    try:
        table = datasets.load_dataset(source, name=subset or None, split=split)
    except Exception as e:  # unreachable Hub, unknown dataset, split or subset, ...
        subset_text = f", subset {subset!r}" if subset else ""
        raise DatasetError(f"{source}: cannot load the Hugging Face Hub dataset (split {split!r}{subset_text}): "
                           f"{type(e).__name__}: {e} (no connection to the Hub? with HF_HUB_OFFLINE=1 a dataset "
                           f"loaded before comes from the cache)") from e
    return _table_records(f"{source} ({split})", table)


def _table_records(name: str, table: Iterable[Any]) -> Iterator[tuple[str, Any]]:
    """The rows of a datasets table."""
    for i, record in enumerate(table, start=1):
        yield f"{name}: row {i}", record


def _import_datasets(source: str) -> Any:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise DatasetError(f"{source}: loading this needs the `datasets` package (pip install datasets), "
                           "which is not installed") from e
    datasets.disable_progress_bars()  # (the learner's own progress bar owns the terminal)
    return datasets


def _validate_row(
    where: str, index: int, record: Any, input_key: str, label_key: str, left_out: set[str]
) -> PromptRow:
    """The row as a PromptRow; names of its columns that are not JSON are added to ``left_out``."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: row is not a JSON object (got {type(record).__name__})")
    if input_key not in record:
        raise DatasetError(
            f"{where}: missing input key {input_key!r}; the row has keys {sorted(map(str, record))}"
        )
    prompt = _validate_prompt(where, input_key, record[input_key])
    label = _validate_label(where, label_key, record.get(label_key))
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


def _validate_prompt(where: str, key: str, value: Any) -> str | Messages:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise DatasetError(f"{where}: {key!r} is an empty list of messages")
        messages: Messages = []
        for j, m in enumerate(value):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise DatasetError(
                    f"{where}: {key!r} message {j} must be an object with string 'role' and "
                    f"'content', got {_short(m)}"
                )
            messages.append({"role": m["role"], "content": m["content"]})
        return messages
    raise DatasetError(
        f"{where}: {key!r} must be a string or a list of {{role, content}} messages, "
        f"got {type(value).__name__}"
    )


def _validate_label(where: str, key: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DatasetError(
            f"{where}: label {key!r} must be a string, a number or null, got {type(value).__name__}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise DatasetError(f"{where}: label {key!r} is not finite ({value})")
    return str(value)


def _short(value: Any, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Tokenised dataset with a resumable, epoch-aware order
# --------------------------------------------------------------------------------------------------


# Mixing draws are made in blocks of this many, block b from its own seed: the sources of any
# stretch of draws are found without making the draws before it.
MIX_BLOCK = 1024


class PromptDataset:
    """Tokenised prompts served in a deterministic, resumable order.

    Without ``weights``, epoch ``e`` visits every kept prompt once, in the order of
    ``numpy.random.default_rng(seed + e).permutation(len(self))`` (the rows' order when ``shuffle``
    is False). With ``weights`` (one > 0 per source, see ``PromptRow.source``), the k-th prompt
    served comes from source s with probability ``weights[s] / sum(weights)``, independently of
    the others (``default_rng([seed, 0, k // MIX_BLOCK])``), and is that source's next prompt: each
    source goes through its own epochs, epoch e of source s in the order
    ``default_rng([seed, s + 1, e]).permutation(size of s)``, so every prompt of a source is served
    once per epoch of its source. :meth:`next_batch` wraps into the next epoch seamlessly;
    :meth:`state_dict` / :meth:`load_state_dict` let a restarted run continue exactly where it stopped.
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
        weights: Sequence[float] = (),
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
        sources: list[int] = []  # of each kept prompt
        self.num_filtered = 0
        for row, text, ids in zip(rows, texts, token_ids):
            if len(ids) > self.max_prompt_len:
                self.num_filtered += 1
                continue
            self._prompts.append(EncodedPrompt(prompt_id=row.index, token_ids=ids, label=row.label, text=text,
                                               columns=row.columns))
            sources.append(row.source)
        if not texts:
            raise DatasetError("no prompts given")
        dropped = (f"dropped {self.num_filtered} of {len(texts)} prompts, longer than {self.max_prompt_len} "
                   f"tokens (the longest has {max(map(len, token_ids))}): raise data.max_prompt_len and "
                   f"rollout.max_model_len to keep them")
        if self.num_filtered:
            if not self._prompts:
                raise DatasetError(f"no prompts left: {dropped}")
            logger.warning(dropped)
        self._by_id = {p.prompt_id: p for p in self._prompts}
        self._mix = _probabilities(weights, {row.source for row in rows}) if weights else None
        # members[s]: positions in self._prompts of source s (all of them, as one source, without weights)
        members = [[i for i, src in enumerate(sources) if src == s] for s in range(len(weights))] if weights \
            else [list(range(len(self._prompts)))]
        for s, positions in enumerate(members):
            if not positions:
                raise DatasetError(f"no prompts left in dataset {s + 1} of {len(members)} (mixed with weights): "
                                   f"{dropped}")
        self._members = [np.asarray(m) for m in members]
        self._epochs = [_Epochs(len(m), self._order_function(s)) for s, m in enumerate(members)]
        self._drawn = 0  # prompts served so far (the mixture's draws)
        self._mix_cache: tuple[int, np.ndarray] | None = None  # (block, its draws)

    def __len__(self) -> int:
        return len(self._prompts)

    @property
    def epoch(self) -> int:
        """Epochs completed (with weights: by the source that has completed the fewest)."""
        return min(e.epoch for e in self._epochs)

    def get(self, prompt_id: int) -> EncodedPrompt:
        try:
            return self._by_id[prompt_id]
        except KeyError:
            raise KeyError(f"unknown or filtered prompt_id {prompt_id}") from None

    def _order_function(self, source: int) -> Callable[[int], np.ndarray]:
        """Epoch -> the order in which ``source``'s prompts are served in it (see the class docstring)."""

        def order(epoch: int) -> np.ndarray:
            n = len(self._members[source])
            if not self.shuffle:
                return np.arange(n)
            seed = [self.seed, source + 1, epoch] if self._mix is not None else self.seed + epoch
            return np.random.default_rng(seed).permutation(n)

        return order

    def next_batch(self, n: int) -> list[EncodedPrompt]:
        """The next ``n`` prompts, continuing into the next epoch(s) when one runs out."""
        if n <= 0:
            raise ValueError(f"batch size must be positive, got {n}")
        if self._mix is None:
            positions = self._members[0][self._epochs[0].take(n)]
        else:
            positions = [self._members[s][self._epochs[s].take(1)[0]] for s in self._draws(self._drawn, n)]
        self._drawn += n
        return [self._prompts[i] for i in positions]

    def _draws(self, start: int, n: int) -> list[int]:
        """The sources of the mixture's draws start, ..., start + n - 1."""
        out: list[int] = []
        for k in range(start, start + n):
            block, at = divmod(k, MIX_BLOCK)
            if self._mix_cache is None or self._mix_cache[0] != block:
                rng = np.random.default_rng([self.seed, 0, block])
                self._mix_cache = (block, rng.choice(len(self._mix), size=MIX_BLOCK, p=self._mix))
            out.append(int(self._mix_cache[1][at]))
        return out

    def state_dict(self) -> dict[str, Any]:
        if self._mix is None:
            return {**self._epochs[0].position(), "seed": self.seed}
        return {"seed": self.seed, "drawn": self._drawn, "datasets": [e.position() for e in self._epochs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mixed = self._mix is not None
        required = {"seed", "drawn", "datasets"} if mixed else {"epoch", "offset", "seed"}
        missing = required - set(state)
        if missing:
            raise ValueError(f"prompt dataset state is missing {sorted(missing)} (was it saved by a run "
                             f"{'without' if mixed else 'with'} data.weights?)")
        positions = state["datasets"] if mixed else [state]
        if len(positions) != len(self._epochs):
            raise ValueError(f"prompt dataset state has positions in {len(positions)} datasets, this run mixes "
                             f"{len(self._epochs)} (was data.path changed?)")
        for epochs, position in zip(self._epochs, positions):
            epochs.seek(int(position["epoch"]), int(position["offset"]))
        self.seed, self._drawn, self._mix_cache = int(state["seed"]), int(state.get("drawn", 0)), None


class _Epochs:
    """Positions 0 .. size - 1, epoch after epoch, epoch e in the order ``order_of(e)``; resumable."""

    def __init__(self, size: int, order_of: Callable[[int], np.ndarray]):
        self.size, self.order_of = size, order_of
        self.epoch = self.offset = 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order)

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            if self._order is None or self._order[0] != self.epoch:
                self._order = (self.epoch, self.order_of(self.epoch))
            count = min(n - len(out), self.size - self.offset)
            out.extend(self._order[1][self.offset: self.offset + count].tolist())
            self.offset += count
            if self.offset == self.size:
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def seek(self, epoch: int, offset: int) -> None:
        if epoch < 0 or not 0 <= offset < self.size:
            raise ValueError(
                f"prompt dataset state epoch={epoch} offset={offset} does not fit a dataset of {self.size} "
                f"prompts (was the prompt file or max_prompt_len changed?)"
            )
        self.epoch, self.offset, self._order = epoch, offset, None


def _probabilities(weights: Sequence[float], sources: set[int]) -> np.ndarray:
    """Mixing weights (one > 0 per source) as probabilities."""
    w = np.asarray(weights, dtype=np.float64)
    if not (np.all(np.isfinite(w)) and np.all(w > 0)):
        raise DatasetError(f"mixing weights must be finite numbers > 0, got {list(weights)}")
    if sources != set(range(len(w))):
        raise DatasetError(f"{len(w)} mixing weights for rows of {len(sources)} dataset(s): give one per dataset")
    return w / w.sum()


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
