"""User reward functions: loading them from a spec string and calling them safely, batched.

A reward function is called once per batch::

    fn(prompts: list[str], completions: list[str], labels: list[str | None]) -> rewards

and must return one finite number per completion (a list / sequence of numbers, a 1-D numpy array
or a 1-D torch tensor). :func:`score_batch` checks all of that and reports any problem as a
:class:`RewardFnError` naming the function.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from protocol.config import is_file_spec

__all__ = [
    "RewardFnError",
    "RewardFn",
    "load_reward_fn",
    "score_batch",
    "combine_rewards",
    "clip_rewards",
]


class RewardFnError(ValueError):
    """A reward function that cannot be loaded, raised, or returned unusable rewards."""


@dataclass(frozen=True)
class RewardFn:
    """A loaded reward function and the ``module:name`` it is reported as."""

    fn: Callable[..., Any]
    name: str

    def __call__(self, prompts: list[str], completions: list[str], labels: list[str | None]) -> Any:
        return self.fn(prompts, completions, labels)


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
    if isinstance(fn, RewardFn):
        return fn.name
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
) -> list[float]:
    """Call ``fn`` on one batch and return one finite float per completion, or raise RewardFnError."""
    n = len(completions)
    if len(prompts) != n or len(labels) != n:
        raise ValueError(
            f"score_batch needs equal lengths, got {len(prompts)} prompts, {n} completions, {len(labels)} labels"
        )
    name = _fn_name(fn)
    try:
        result = fn(list(prompts), list(completions), list(labels))
    except Exception as e:
        raise RewardFnError(f"reward function {name} raised {type(e).__name__}: {e}") from e

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


def combine_rewards(components: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> list[float]:
    """Weighted sum ``sum_k weights[k] * components[k][i]``; the two key sets must be equal."""
    if set(components) != set(weights):
        raise ValueError(
            f"reward components {sorted(components)} and weights {sorted(weights)} must have the same keys"
        )
    if not components:
        raise ValueError("combine_rewards needs at least one component")
    lengths = {k: len(v) for k, v in components.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"reward components have different lengths: {lengths}")
    n = next(iter(lengths.values()))
    return [sum(float(weights[k]) * float(components[k][i]) for k in components) for i in range(n)]


def clip_rewards(values: Sequence[float], clip: float | None) -> list[float]:
    """Clamp each value to ``[-clip, clip]``; ``None`` leaves them unchanged."""
    if clip is None:
        return [float(v) for v in values]
    if not clip > 0:
        raise ValueError(f"reward clip must be positive, got {clip}")
    return [min(max(float(v), -clip), clip) for v in values]
