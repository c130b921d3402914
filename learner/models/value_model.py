"""Critic and reward models: a base transformer plus a scalar value head.

Layout (compatible with OpenRLHF / Hugging Face checkpoints): the base transformer (``AutoModel``,
i.e. the causal LM without its ``lm_head``) is stored under its ``base_model_prefix`` (``model``
for Llama/Qwen) and the head ``nn.Linear(hidden, 1, bias=False)`` under ``value_head_prefix``
(default ``score``), so the state dict has keys ``model.layers.0...`` and ``score.weight``.

``save_pretrained(dir)`` writes ``config.json`` (the base config plus ``value_model_kind``,
``value_head_prefix``, ``normalize_reward``, ``mean``, ``std``) and the weights as safetensors
(sharded with an index when large). ``from_pretrained(path)`` accepts such a directory, an
OpenRLHF reward/critic checkpoint, or a plain causal-LM checkpoint: the base weights are loaded by
``AutoModel.from_pretrained`` and the head is read from the checkpoint when it is there
(``<value_head_prefix>.weight``), otherwise freshly initialised:

* reward head: ``normal(0, std=1/sqrt(hidden+1))`` -- unit-scale scores for RMS-normalised
  hidden states;
* critic head: zeros -- every value starts at 0, so early advantages equal the returns and the
  first value-loss gradients do not push random noise into the shared trunk.

Output alignment follows :mod:`learner.models.packing`; packed inputs never attend across
sequence boundaries (:func:`packed_model_kwargs`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os

import torch
import torch.nn as nn

from .actor import resolve_dtype
from .packing import (
    VARLEN_ATTN_IMPLEMENTATIONS,
    forward_in_length_buckets,
    packed_model_kwargs,
    padded_action_mask,
    padded_position_ids,
    sequence_start_mask,
)

logger = logging.getLogger(__name__)

__all__ = ["ValueModel", "CriticModel", "RewardModel", "build_value_model", "VALUE_MODEL_KINDS"]

VALUE_MODEL_KINDS = ("critic", "reward")


def _hidden_size(config) -> int:
    hs = getattr(config, "hidden_size", None)
    if hs is None and hasattr(config, "get_text_config"):
        hs = getattr(config.get_text_config(), "hidden_size", None)
    if hs is None:
        raise ValueError(f"cannot find hidden_size in config of type {type(config).__name__}")
    return int(hs)


def _resolve_file(path: str, filename: str) -> str | None:
    if os.path.isdir(path):
        f = os.path.join(path, filename)
        return f if os.path.isfile(f) else None
    try:  # hub id: the files are already in the cache after AutoModel.from_pretrained
        from transformers.utils import cached_file

        return cached_file(path, filename, _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 - missing file / offline: treat as absent
        return None


def _read_checkpoint_tensor(path: str, key: str) -> torch.Tensor | None:
    """Read one tensor from a (possibly sharded) safetensors or torch checkpoint, or None."""
    from safetensors import safe_open

    index = _resolve_file(path, "model.safetensors.index.json")
    if index is not None:
        with open(index) as f:
            shard = json.load(f).get("weight_map", {}).get(key)
        if shard is None:
            return None
        file = _resolve_file(path, shard)
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(key)
    single = _resolve_file(path, "model.safetensors")
    if single is not None:
        with safe_open(single, framework="pt") as f:
            return f.get_tensor(key) if key in f.keys() else None
    for name in ("pytorch_model.bin.index.json", "pytorch_model.bin"):
        file = _resolve_file(path, name)
        if file is None:
            continue
        if name.endswith(".json"):
            with open(file) as f:
                shard = json.load(f).get("weight_map", {}).get(key)
            if shard is None:
                return None
            file = _resolve_file(path, shard)
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return sd.get(key)
    return None


class ValueModel(nn.Module):
    """Base transformer + scalar head. Use :class:`CriticModel` or :class:`RewardModel`."""

    kind: str = ""

    def __init__(
        self,
        base: nn.Module,
        *,
        value_head_prefix: str = "score",
        normalize_reward: bool = False,
        mean: float = 0.0,
        std: float = 1.0,
    ):
        super().__init__()
        prefix = getattr(base, "base_model_prefix", "") or "model"
        if (
            not value_head_prefix.isidentifier()
            or value_head_prefix in (prefix, "mean", "std")
            or hasattr(type(self), value_head_prefix)  # a method / property of this class
            or value_head_prefix in self.__dict__
        ):
            raise ValueError(
                f"invalid value_head_prefix {value_head_prefix!r}: it must be an identifier that is not "
                f"the base model prefix {prefix!r} nor an attribute of {type(self).__name__}"
            )
        self.base_model_prefix = prefix
        self.value_head_prefix = value_head_prefix
        setattr(self, prefix, base)
        p = next(base.parameters())
        head = nn.Linear(_hidden_size(base.config), 1, bias=False, device=p.device, dtype=p.dtype)
        setattr(self, value_head_prefix, head)
        self.init_value_head()
        self.normalize_reward = bool(normalize_reward)
        self.max_padding: float | None = 0.25  # packs under sdpa/eager: as in Actor
        # constants recorded in config.json (not trained, not in the state dict)
        self.register_buffer("mean", torch.tensor([float(mean)]), persistent=False)
        self.register_buffer("std", torch.tensor([float(std)]), persistent=False)
        if getattr(base.config, "use_cache", None):
            base.config.use_cache = False
        self.train(base.training)

    # ------------------------------------------------------------------ accessors
    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix)

    def get_value_head(self) -> nn.Linear:
        """The head module (stored under the attribute named ``value_head_prefix``)."""
        return getattr(self, self.value_head_prefix)

    @property
    def config(self):
        return self.base_model.config

    @property
    def attn_implementation(self) -> str:
        return self.config._attn_implementation

    def init_value_head(self) -> None:
        """Fresh head init (see module docstring): critic zeros, reward normal(0, 1/sqrt(h+1))."""
        w = self.get_value_head().weight
        with torch.no_grad():
            if self.kind == "critic":
                w.zero_()
            else:
                w.normal_(mean=0.0, std=1.0 / math.sqrt(w.shape[1] + 1))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None):
        if gradient_checkpointing_kwargs is None:
            gradient_checkpointing_kwargs = {"use_reentrant": False}
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        self.base_model.gradient_checkpointing_disable()

    def _compute_dtype(self) -> torch.dtype:
        return self.get_value_head().weight.dtype

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        config,
        *,
        value_head_prefix: str = "score",
        dtype: str | torch.dtype = "float32",
        attn_implementation: str = "sdpa",
        normalize_reward: bool = False,
        mean: float = 0.0,
        std: float = 1.0,
        trust_remote_code: bool = False,
    ) -> "ValueModel":
        """Randomly initialised base transformer from a config (tests, from-scratch runs)."""
        from transformers import AutoModel

        base = AutoModel.from_config(
            config,
            dtype=resolve_dtype(dtype),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        return cls(base, value_head_prefix=value_head_prefix, normalize_reward=normalize_reward, mean=mean, std=std)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        value_head_prefix: str = "score",
        dtype: str | torch.dtype = "float32",
        attn_implementation: str = "sdpa",
        normalize_reward: bool | None = None,
        trust_remote_code: bool = False,
    ) -> "ValueModel":
        """Load from a saved value model, an OpenRLHF checkpoint or a plain causal-LM checkpoint.

        A ``value_head_prefix`` recorded in the checkpoint's config wins over the argument (as in
        OpenRLHF). ``normalize_reward=None`` takes the checkpoint's setting (False if absent);
        ``mean``/``std`` always come from the checkpoint config (0/1 if absent).
        """
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        saved_prefix = getattr(config, "value_head_prefix", None)
        if saved_prefix and saved_prefix != value_head_prefix:
            logger.info("using value_head_prefix=%r from %s (argument was %r)", saved_prefix, path, value_head_prefix)
        prefix = saved_prefix or value_head_prefix
        saved_kind = getattr(config, "value_model_kind", None)
        if saved_kind and saved_kind != cls.kind:
            logger.info("loading a %s checkpoint from %s as a %s model", saved_kind, path, cls.kind)
        if normalize_reward is None:
            normalize_reward = bool(getattr(config, "normalize_reward", False))
        base = AutoModel.from_pretrained(
            path,
            config=config,
            dtype=resolve_dtype(dtype),
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        model = cls(
            base,
            value_head_prefix=prefix,
            normalize_reward=normalize_reward,
            mean=float(getattr(config, "mean", 0.0) or 0.0),
            std=float(getattr(config, "std", 1.0) or 1.0),
        )
        w = _read_checkpoint_tensor(path, f"{prefix}.weight")
        if w is not None:
            if tuple(w.shape) != tuple(model.get_value_head().weight.shape):
                raise ValueError(
                    f"value head {prefix}.weight in {path} has shape {tuple(w.shape)}, "
                    f"expected {tuple(model.get_value_head().weight.shape)}"
                )
            with torch.no_grad():
                model.get_value_head().weight.copy_(w)
        else:
            logger.info("no %s.weight in %s: value head freshly initialised (%s)", prefix, path, cls.kind)
        return model

    def save_pretrained(
        self,
        save_dir: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_size: str | int = "5GB",
    ) -> None:
        """Write ``config.json`` + safetensors weights (head included) reloadable by ``from_pretrained``.

        ``state_dict`` lets a distributed trainer pass gathered weights (same keys as
        ``self.state_dict()``).
        """
        from huggingface_hub import save_torch_state_dict

        os.makedirs(save_dir, exist_ok=True)
        cfg = copy.deepcopy(self.config)
        cfg.architectures = [type(self.base_model).__name__]  # base transformer, no LM head
        cfg.value_model_kind = self.kind
        cfg.value_head_prefix = self.value_head_prefix
        cfg.normalize_reward = self.normalize_reward
        cfg.mean = float(self.mean[0])
        cfg.std = float(self.std[0])
        cfg.save_pretrained(save_dir)
        sd = self.state_dict() if state_dict is None else state_dict
        sd = {k: v.detach() for k, v in sd.items()}
        save_torch_state_dict(sd, save_dir, max_shard_size=max_shard_size, metadata={"format": "pt"})

    # ------------------------------------------------------------------ forward helpers
    def _hidden_packed(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.attn_implementation in VARLEN_ATTN_IMPLEMENTATIONS:
            kw = packed_model_kwargs(input_ids, cu_seqlens, self.attn_implementation)
            hidden = self.base_model(**kw).last_hidden_state[0]  # [T, H]
        else:  # sdpa/eager: padded groups of similar lengths, no [T, T] mask
            hidden = forward_in_length_buckets(
                input_ids, cu_seqlens, lambda ids, mask: {"hidden": self._hidden_padded(ids, mask)[0]},
                self.max_padding)["hidden"]
        return hidden, cu_seqlens.to(hidden.device)

    def _hidden_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        if input_ids.dim() != 2:
            raise ValueError(f"padded input_ids must be [B, L], got {tuple(input_ids.shape)} (packed needs cu_seqlens)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=padded_position_ids(attention_mask)
        ).last_hidden_state  # [B, L, H]
        return hidden, attention_mask

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.get_value_head()(hidden).squeeze(-1).float()


class RewardModel(ValueModel):
    """Sequence reward read at the last valid token: ``forward(...) -> scores [B]`` (fp32)."""

    kind = "reward"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed (``cu_seqlens``; ``input_ids [T]``/``[1, T]``): score at ``cu[b+1] - 1``.
        Padded (``[B, L]``): score at the last position with ``attention_mask == 1`` (left or
        right padding). When ``normalize_reward`` and in eval mode: ``(r - mean) / std``.
        """
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("pass either cu_seqlens (packed) or attention_mask (padded), not both")
            hidden, cu = self._hidden_packed(input_ids, cu_seqlens)
            last = cu[1:].long() - 1
            scores = self._head(hidden[last])
        else:
            hidden, mask = self._hidden_padded(input_ids, attention_mask)
            length = mask.shape[1]
            last = length - 1 - mask.long().fliplr().argmax(dim=1)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            scores = self._head(hidden[rows, last])
        if self.normalize_reward and not self.training:
            scores = (scores - self.mean.float()) / self.std.float()
        return scores


class CriticModel(ValueModel):
    """Token-aligned values: ``values[i] = head(hidden[i-1])`` = V(state before token ``i``)."""

    kind = "critic"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed -> ``[T]``, padded ``[B, L]`` -> ``[B, L]`` (fp32); 0 at sequence starts and pads."""
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("pass either cu_seqlens (packed) or attention_mask (padded), not both")
            hidden, cu = self._hidden_packed(input_ids, cu_seqlens)
            v = self._head(hidden[:-1])
            starts = sequence_start_mask(cu, hidden.shape[0])
            return torch.cat([v.new_zeros(1), v]).masked_fill(starts, 0.0)
        hidden, mask = self._hidden_padded(input_ids, attention_mask)
        v = self._head(hidden[:, :-1])
        shifted = torch.cat([v.new_zeros(v.shape[0], 1), v], dim=1)
        return torch.where(padded_action_mask(mask), shifted, 0.0)


_KINDS = {"critic": CriticModel, "reward": RewardModel}


def build_value_model(
    kind: str,
    path_or_config,
    *,
    value_head_prefix: str = "score",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    normalize_reward: bool | None = None,
    trust_remote_code: bool = False,
) -> ValueModel:
    """``kind`` in ``("critic", "reward")``; ``path_or_config`` a checkpoint path / hub id or a
    ``PretrainedConfig`` (random init). ``normalize_reward=None``: from the checkpoint (else False).
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown value model kind {kind!r}; expected one of {VALUE_MODEL_KINDS}")
    cls = _KINDS[kind]
    from transformers import PreTrainedConfig

    if isinstance(path_or_config, PreTrainedConfig):
        return cls.from_config(
            path_or_config,
            value_head_prefix=value_head_prefix,
            dtype=dtype,
            attn_implementation=attn_implementation,
            normalize_reward=bool(normalize_reward),
            trust_remote_code=trust_remote_code,
        )
    return cls.from_pretrained(
        str(path_or_config),
        value_head_prefix=value_head_prefix,
        dtype=dtype,
        attn_implementation=attn_implementation,
        normalize_reward=normalize_reward,
        trust_remote_code=trust_remote_code,
    )
