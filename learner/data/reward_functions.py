"""User reward functions: loading them, and calling them safely, batched and concurrently.

A reward function is called once per batch::

    fn(prompts: list[str], completions: list[str], labels: list[str | None], **columns) -> rewards

and must return one finite number per completion (a list / sequence of numbers, a 1-D numpy array
or a 1-D torch tensor). ``columns`` are the prompt rows' other dataset columns, one list entry per
completion; a function gets those it names as parameters (all of them if it takes ``**kwargs``).
An ``async def`` function is awaited: :func:`score_functions` runs all of a batch's functions on
one event loop, so the async ones wait (on a server, say) concurrently. :class:`RewardServer` is
such a function that asks an HTTP server (``reward.url``). Every problem is reported as a
:class:`RewardFnError` naming the function, and for a bad value the sample.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import json
import math
import numbers
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from protocol.config import RewardConfig, is_file_spec

__all__ = [
    "RewardFnError",
    "RewardFn",
    "RewardFunctions",
    "RewardServer",
    "RewardServerError",
    "load_reward_fn",
    "score_batch",
    "score_functions",
]


class RewardFnError(ValueError):
    """A reward function that cannot be loaded, raised, or returned unusable rewards."""


class RewardServerError(RuntimeError):
    """A request to the reward server failed; ``retryable``: a later attempt may succeed."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class RewardFn:
    """A loaded reward function and the ``module:name`` it is reported as."""

    fn: Callable[..., Any]
    name: str

    @property
    def short_name(self) -> str:
        """The function's own name (``score`` of ``path/r.py:Class.score``), which names its metric."""
        return self.name.rpartition(":")[2].rpartition(".")[2]

    def __call__(self, prompts: list[str], completions: list[str], labels: list[str | None],
                 columns: Mapping[str, list[Any]]) -> Any:
        return self.fn(prompts, completions, labels, **self.keyword_columns(columns))

    def keyword_columns(self, columns: Mapping[str, list[Any]]) -> dict[str, list[Any]]:
        """The columns the function takes: those it names, or all with ``**kwargs``; never one that
        would fill its positional (prompts, completions, labels) parameters a second time."""
        try:
            params = list(inspect.signature(self.fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: it takes none
            return {}
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:3]
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return {k: v for k, v in columns.items() if k not in positional}
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return {k: v for k, v in columns.items() if k in named and k not in positional}


@dataclass(frozen=True)
class RewardFunctions:
    """A run's reward functions (reward.function, then reward.url) and their weights, in that order."""

    fns: list[RewardFn]
    weights: list[float]

    @classmethod
    def from_config(cls, r: RewardConfig) -> RewardFunctions:
        fns = [load_reward_fn(spec) for spec in r.function]
        weights = [float(w) for w in r.function_weights] or [1.0] * len(fns)
        if r.url:
            fns.append(RewardFn(RewardServer(r.url, r.timeout_s, r.retries), "reward.url"))
            weights.append(r.url_weight)
        return cls(fns, weights)

    def __post_init__(self) -> None:
        if len(self.fns) != len(self.weights):
            raise ValueError(f"{len(self.fns)} reward functions but {len(self.weights)} weights")
        seen: dict[str, str] = {}
        for fn in self.fns:
            if fn.short_name in seen:
                raise RewardFnError(f"reward functions {seen[fn.short_name]} and {fn.name} are both named "
                                    f"{fn.short_name!r}, and each one's metric is named after it: rename one")
            seen[fn.short_name] = fn.name

    @property
    def names(self) -> list[str]:
        return [fn.short_name for fn in self.fns]


def load_reward_fn(spec: str) -> RewardFn:
    """Load ``package.module:function`` (imported) or ``path/to/file.py:function`` (loaded from the file).

    ``function`` may be dotted (``module:Class.method``).
    """
    module_part, sep, attr_path = spec.rpartition(":")
    if not sep or not module_part or not attr_path:
        raise RewardFnError(
            f"reward function spec {spec!r} must look like 'package.module:function' or 'path/to/file.py:function'"
        )
    if is_file_spec(module_part):
        module = _load_file_module(module_part)
    else:
        module = _import_module(module_part)
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise RewardFnError(f"reward function {spec!r}: {module_part!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardFnError(
            f"reward function {spec!r}: {attr_path!r} is not callable (it is a {type(obj).__name__})"
        )
    return RewardFn(fn=obj, name=f"{module_part}:{attr_path}")


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        # Distinguish "the module does not exist" from "the module imports something missing".
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            raise RewardFnError(f"reward function module {name!r} not found") from e
        raise RewardFnError(f"importing reward function module {name!r} failed: {e}") from e
    except Exception as e:
        raise RewardFnError(f"importing reward function module {name!r} failed: {type(e).__name__}: {e}") from e


def _load_file_module(path_str: str) -> Any:
    path = Path(path_str).expanduser().resolve()
    if not path.is_file():
        raise RewardFnError(f"reward function file {path_str!r} not found")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    mod_name = f"_streamrlhf_reward_{path.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise RewardFnError(f"reward function file {path_str!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # needed by dataclasses / pickling inside the module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise RewardFnError(f"loading reward function file {path_str!r} failed: {type(e).__name__}: {e}") from e
    return module


def _fn_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{qualname}"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def score_batch(
    fn: Callable[..., Any],
    prompts: Sequence[str],
    completions: Sequence[str],
    labels: Sequence[str | None],
    columns: Mapping[str, Sequence[Any]] | None = None,
) -> list[float]:
    """One function's rewards for one batch (see :func:`score_functions`)."""
    return score_functions([fn], prompts, completions, labels, columns)[0]


def score_functions(
    fns: Sequence[Callable[..., Any]],
    prompts: Sequence[str],
    completions: Sequence[str],
    labels: Sequence[str | None],
    columns: Mapping[str, Sequence[Any]] | None = None,
) -> list[list[float]]:
    """Call every function on one batch (``async def`` ones concurrently) and return, in the order
    of ``fns``, each one's finite float per completion; or raise RewardFnError for the first of
    ``fns`` that failed. ``columns``: name -> one value per completion."""
    n = len(completions)
    columns = dict(columns or {})
    lengths = {"prompts": len(prompts), "labels": len(labels), **{k: len(v) for k, v in columns.items()}}
    if any(length != n for length in lengths.values()):
        raise ValueError(f"score_functions needs equal lengths, got {n} completions and {lengths}")
    named = [fn if isinstance(fn, RewardFn) else RewardFn(fn, _fn_name(fn)) for fn in fns]
    results = _REWARD_LOOP.run(_call_all(named, prompts, completions, labels, columns))
    return [_checked_rewards(result, fn.name, completions) for fn, result in zip(named, results)]


async def _call_all(fns: list[RewardFn], prompts: Sequence[str], completions: Sequence[str],
                    labels: Sequence[str | None], columns: Mapping[str, Sequence[Any]]) -> list[Any]:
    """Each function's result, or the exception it raised."""

    async def call(fn: RewardFn) -> Any:
        try:
            # copies: one function cannot change what the next one is given
            result = fn(list(prompts), list(completions), list(labels), {k: list(v) for k, v in columns.items()})
            return await result if inspect.isawaitable(result) else result
        except BaseException as e:  # SystemExit too: out of a task it would stop the loop, and the caller wait forever
            return e

    return await asyncio.gather(*(call(fn) for fn in fns))


class _PrivateLoop:
    """An event loop of the reward functions' own, in a daemon thread. The learner scores from
    worker threads of its asyncio program; a loop of their own neither blocks the learner's nor
    needs one in the calling thread, and it lives on so that clients an async function keeps
    (an HTTP session, say) stay bound to a running loop from batch to batch."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def run(self, coroutine: Any) -> Any:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="reward-functions", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()


_REWARD_LOOP = _PrivateLoop()


def _checked_rewards(result: Any, name: str, completions: Sequence[str]) -> list[float]:
    """``result`` (a function's return value, or what it raised) as one finite float per completion."""
    if isinstance(result, BaseException):
        raise RewardFnError(f"reward function {name} raised {type(result).__name__}: {result}") from result
    n = len(completions)
    values = _as_list(result, name)
    if len(values) != n:
        detail = (
            f"; first missing index {len(values)} (completion: {_short(completions[len(values)])!r})"
            if len(values) < n
            else f"; first extra index {n}"
        )
        raise RewardFnError(
            f"reward function {name} returned {len(values)} rewards for {n} completions{detail}"
        )
    for i, v in enumerate(values):
        if isinstance(v, numbers.Real):
            f = float(v)
            if math.isfinite(f):
                values[i] = f
                continue
            problem = f"non-finite reward {f}"
        else:
            problem = f"non-numeric reward {_short(repr(v), 40)} ({type(v).__name__})"
        raise RewardFnError(
            f"reward function {name} returned {problem} at index {i} "
            f"(completion: {_short(completions[i])!r})"
        )
    return values


def _as_list(result: Any, name: str) -> list[Any]:
    """Turn a tensor / array / sequence of rewards into a Python list (elements not yet checked)."""
    if hasattr(result, "detach") and hasattr(result, "tolist"):  # torch tensor
        result = result.detach().cpu()
    if hasattr(result, "ndim") and hasattr(result, "tolist"):  # torch tensor or numpy array
        if result.ndim != 1:
            raise RewardFnError(
                f"reward function {name} must return a 1-D array of rewards, got shape {tuple(result.shape)}"
            )
        return list(result.tolist())
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, (Sequence, list, tuple)):
        raise RewardFnError(
            f"reward function {name} must return a sequence of numbers (one per completion), "
            f"got {type(result).__name__}"
        )
    return list(result)


class RewardServer:
    """reward.url as a reward function: the batch POSTed as JSON ``{prompts, completions, labels,
    <column>: [...]}``, answered with ``{"rewards": [...]}``. A request that cannot connect, times
    out or gets status 429 or 5xx is retried ``retries`` times, after ``backoff_s``, then twice as
    long each time; other failures are final (asking again would get the same answer)."""

    def __init__(self, url: str, timeout_s: float, retries: int, backoff_s: float = 1.0):
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s

    async def __call__(self, prompts: list[str], completions: list[str], labels: list[str | None],
                       **columns: list[Any]) -> list[Any]:
        # the three fields win over columns of the same names
        body = json.dumps({**columns, "prompts": prompts, "completions": completions, "labels": labels}).encode()
        return await asyncio.to_thread(self._post_with_retries, body)  # urllib blocks: off the loop

    def _post_with_retries(self, body: bytes) -> list[Any]:
        for attempt in itertools.count():
            try:
                return self._post(body)
            except RewardServerError as e:
                if not e.retryable or attempt == self.retries:
                    attempts = f" (attempt {attempt + 1} of {self.retries + 1})" if self.retries else ""
                    raise RewardServerError(f"{e}{attempts}", e.retryable) from e
            time.sleep(self.backoff_s * 2**attempt)

    def _post(self, body: bytes) -> list[Any]:
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                status, text = response.status, response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", errors="replace")
            raise RewardServerError(f"reward server {self.url} answered status {e.code}: {text[:200]!r}",
                                    retryable=e.code == 429 or e.code >= 500) from None
        except (urllib.error.URLError, OSError) as e:  # no connection, a timeout (TimeoutError is an OSError)
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise RewardServerError(f"reward server {self.url} did not answer: {reason}", retryable=True) from None
        try:
            rewards = json.loads(text)["rewards"]
        except (ValueError, TypeError, KeyError):
            rewards = None
        if not isinstance(rewards, list):
            raise RewardServerError(f"reward server {self.url} answered status {status} without a JSON "
                                    f"{{\"rewards\": [...]}}: {text[:200]!r}", retryable=False)
        return rewards
