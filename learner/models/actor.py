"""Policy (actor) model: a Hugging Face causal LM that returns token-aligned log-probs.

Alignment (see :mod:`learner.models.packing`): ``log_probs[i] = log p(tokens[i] | tokens[start:i])``
for the sequence containing token ``i``, computed from temperature-scaled logits at position
``i - 1``; 0 at the first token of every sequence and at pads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F

from protocol.dtypes import float_dtype_name

from .logprobs import entropy_from_logits, log_probs_from_hidden, log_probs_from_logits
from .packing import (
    VARLEN_ATTN_IMPLEMENTATIONS,
    forward_in_length_buckets,
    packed_model_kwargs,
    padded_action_mask,
    padded_position_ids,
    sequence_start_mask,
)

logger = logging.getLogger(__name__)

__all__ = ["Actor", "LoraSpec", "resolve_dtype"]



def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or fp32/bf16/fp16, or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return getattr(torch, float_dtype_name(str(dtype)))


def check_4bit_available() -> None:
    """Raise a clear RuntimeError when 4-bit (bitsandbytes nf4) loading cannot work here."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "4-bit loading needs a CUDA GPU and bitsandbytes; no CUDA device is available on this "
            "machine (use load_in_4bit=False, e.g. dtype='bfloat16' or 'float32')"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            "4-bit loading needs a CUDA GPU and bitsandbytes; the bitsandbytes package is not "
            "installed (pip install bitsandbytes)"
        )


def nf4_config(compute_dtype: torch.dtype):
    """BitsAndBytesConfig for nf4 with double quantisation (QLoRA defaults)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


@dataclass
class LoraSpec:
    """LoRA settings applied with peft.

    ``target_modules``: module names (e.g. ``["q_proj", "v_proj"]``), ``"all-linear"``, or None
    for peft's default for the architecture.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = field(default="all-linear")

    def to_peft(self, task_type: str = "CAUSAL_LM"):
        from peft import LoraConfig

        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        tm = self.target_modules
        if isinstance(tm, (tuple, list)):
            tm = list(tm)
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=tm,
            bias="none",
            task_type=task_type,
        )


# Config attributes of models whose logits are not just ``output_layer(last_hidden_state)`` (Cohere's
# logit_scale, Gemma 2/3's final_logit_softcapping, Granite's logits_scaling, MiniCPM's width
# scaling, ...): with any of them set to something other than None / 1 the log-probs come from the
# model's own logits.
_LOGIT_TRANSFORM_ATTRS = ("logit_scale", "final_logit_softcapping", "attn_logit_softcapping_final",
                          "logits_scaling", "logit_softcapping", "output_multiplier_scale",
                          "lm_head_multiplier", "scale_width", "dim_model_base", "mup_width_multiplier",
                          "width_multiplier", "output_logits_scaling")


# Rows per chunk of the hidden-state path: about this many logits (256 MiB in fp32) per workspace,
# whatever the vocabulary (441 rows at V = 151936; a whole micro-batch for the tiny models).
HIDDEN_CHUNK_ELEMENTS = 1 << 26


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


class Actor(nn.Module):
    """Wraps a Hugging Face causal LM (optionally LoRA-wrapped with peft).

    ``Actor(model)`` wraps an existing model object (LoRA / gradient checkpointing applied when
    asked); :meth:`from_pretrained` loads one from a path or hub id.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lora: LoraSpec | None = None,
        gradient_checkpointing: bool = False,
        logprobs_chunk_size: int = 4096,
        logprobs_from_hidden: bool = True,
    ):
        super().__init__()
        if getattr(getattr(model, "config", None), "use_cache", None):
            model.config.use_cache = False  # training / scoring never uses the KV cache
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:
            from peft import get_peft_model

            if gradient_checkpointing:
                # frozen embeddings would otherwise cut the graph at checkpoint boundaries
                model.enable_input_require_grads()
            model = get_peft_model(model, lora.to_peft())
        self.model = model
        self.logprobs_chunk_size = int(logprobs_chunk_size)
        # Log-probs from the backbone's hidden states through the output layer chunk by chunk
        # (`log_probs_from_hidden`) where the model allows it (see `hidden_path`), so the [T, V]
        # logits never exist; else from the model's logits.
        self.logprobs_from_hidden = bool(logprobs_from_hidden)
        self._hidden_path_reason: str | None = None
        self.hidden_chunk_rows: int | None = None  # None: HIDDEN_CHUNK_ELEMENTS // vocab (tests set it)
        # Packs under sdpa/eager run as padded forwards over groups of similar lengths with at most
        # this much padding (see `forward_in_length_buckets`); None: one forward per call (ZeRO-3).
        self.max_padding: float | None = 0.25
        self.train(model.training)  # mirror the wrapped model (HF loads in eval mode)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        dtype: str | torch.dtype = "float32",
        attn_implementation: str = "sdpa",
        lora: LoraSpec | None = None,
        load_in_4bit: bool = False,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        logprobs_chunk_size: int = 4096,
        logprobs_from_hidden: bool = True,
    ) -> "Actor":
        """Load a causal LM from ``path``.

        ``load_in_4bit`` loads nf4 weights with bitsandbytes (CUDA only; checked before anything
        is loaded) and is meant to be combined with ``lora``.
        """
        torch_dtype = resolve_dtype(dtype)
        kwargs = {}
        if load_in_4bit:
            check_4bit_available()
            kwargs["quantization_config"] = nf4_config(
                torch_dtype if torch_dtype != torch.float32 else torch.bfloat16
            )
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
        return cls(
            model,
            lora=lora,
            gradient_checkpointing=gradient_checkpointing,
            logprobs_chunk_size=logprobs_chunk_size,
            logprobs_from_hidden=logprobs_from_hidden,
        )

    # ------------------------------------------------------------------ properties
    @property
    def config(self):
        return self.model.config

    @property
    def attn_implementation(self) -> str:
        return self.model.config._attn_implementation

    @property
    def is_lora(self) -> bool:
        return _is_peft(self.model)

    def _compute_dtype(self) -> torch.dtype:
        dt = getattr(self.model, "dtype", None)
        return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None):
        if gradient_checkpointing_kwargs is None:
            gradient_checkpointing_kwargs = {"use_reentrant": False}
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if self.is_lora:
            self.model.enable_input_require_grads()

    def gradient_checkpointing_disable(self):
        self.model.gradient_checkpointing_disable()

    def hidden_path(self) -> tuple[nn.Module, nn.Linear] | str:
        """``(backbone, output_layer)`` when the log-probs can come from hidden states, else why not.

        Needs a Transformers causal LM (not remote code) whose logits are exactly
        ``output_layer(backbone(...).last_hidden_state)``: the output layer a plain ``nn.Linear``
        (not LoRA-wrapped, not quantised, not ZeRO-3 partitioned) and no logit scaling or
        soft-capping in the config.
        """
        base = self.model.get_base_model() if self.is_lora else self.model
        if not type(base).__module__.startswith("transformers.models."):
            return f"{type(base).__name__} is not a Transformers model class"
        cfg = getattr(base, "config", None)
        for name in _LOGIT_TRANSFORM_ATTRS:
            val = getattr(cfg, name, None)
            if val not in (None, False, 1, 1.0):
                return f"config.{name} = {val!r} transforms the logits"
        get_head = getattr(base, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if type(head) is not nn.Linear:
            return f"the output layer is {type(head).__name__}, not a plain nn.Linear (LoRA-wrapped?)"
        w = head.weight
        if not w.dtype.is_floating_point or w.dim() != 2 or hasattr(w, "ds_id") or hasattr(w, "quant_state"):
            return "the output layer's weight is quantised or partitioned (ZeRO-3)"
        backbone = getattr(base, getattr(base, "base_model_prefix", "") or "model", None)
        if not isinstance(backbone, nn.Module) or backbone is base:
            return f"{type(base).__name__} has no backbone attribute {base.base_model_prefix!r}"
        return backbone, head

    def _use_hidden_path(self) -> tuple[nn.Module, nn.Linear] | None:
        if not self.logprobs_from_hidden:
            return None
        path = self.hidden_path()
        if isinstance(path, str):
            if self._hidden_path_reason != path:
                logger.warning("model.logprobs_from_hidden: using the logits instead (%s)", path)
                self._hidden_path_reason = path
            return None
        return path

    def _scores(self, model_kwargs: dict, labels: torch.Tensor, temperature: float, return_entropy: bool,
                drop_last: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) of ``labels [B, L]`` under the distributions at each position.

        ``drop_last``: score positions ``[:, :-1]`` only (their labels being ``labels[:, :-1]``);
        else every position (the caller drops what it does not need). Returns ``[B, L']`` fp32.
        """
        path = self._use_hidden_path()
        cs = self.logprobs_chunk_size
        if path is not None:
            backbone, head = path
            cs = self.hidden_chunk_rows or max(16, HIDDEN_CHUNK_ELEMENTS // head.out_features)
            hidden = backbone(**model_kwargs, use_cache=False).last_hidden_state  # [B, L, H]
            if drop_last:
                hidden = hidden[:, :-1]
            b, l = labels.shape[0], hidden.shape[1]
            lp, ent = log_probs_from_hidden(hidden.reshape(b * l, -1), head.weight, head.bias,
                                            labels[:, :l].reshape(-1), temperature, cs, return_entropy)
            return lp.view(b, l), (ent.view(b, l) if ent is not None else None)
        logits = self.model(**model_kwargs, use_cache=False).logits  # [B, L, V]
        if drop_last:
            logits = logits[:, :-1]
        lab = labels[:, : logits.shape[1]]
        lp = log_probs_from_logits(logits, lab, temperature, cs)
        ent = entropy_from_logits(logits, temperature, cs) if return_entropy else None
        return lp, ent

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ) -> dict:
        """Token-aligned log-probs (and entropies) of ``input_ids``.

        Packed (``cu_seqlens [B+1]`` given): ``input_ids [T]`` or ``[1, T]`` -> outputs ``[T]``;
        sequences never attend to each other.
        Padded: ``input_ids [B, L]`` with ``attention_mask [B, L]`` (left or right padding;
        default all ones) -> outputs ``[B, L]``, position ids ``cumsum(mask) - 1``.

        ``log_probs[i]`` is the log-prob of token ``i`` under ``softmax(logits[i-1] / temperature)``
        (fp32), ``entropy[i]`` the entropy of that same distribution; both are 0 at each
        sequence's first token and at pads.
        """
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("pass either cu_seqlens (packed) or attention_mask (padded), not both")
            if self.attn_implementation in VARLEN_ATTN_IMPLEMENTATIONS:
                return self._varlen_forward(input_ids, cu_seqlens, temperature, return_entropy)
            return self._bucketed_forward(input_ids, cu_seqlens, temperature, return_entropy)

        if input_ids.dim() != 2:
            raise ValueError(f"padded input_ids must be [B, L], got {tuple(input_ids.shape)} (packed needs cu_seqlens)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self._padded_forward(input_ids, attention_mask, temperature, return_entropy)

    def _padded_forward(self, input_ids, attention_mask, temperature: float, return_entropy: bool) -> dict:
        """``[B, L]`` in, ``[B, L]`` out (see `forward`)."""
        position_ids = padded_position_ids(attention_mask)
        valid = padded_action_mask(attention_mask)
        # Scored at every position (the last one's label is a dummy) rather than on logits[:, :-1]:
        # a strided view would be processed row by row, a contiguous [B*L, V] block in one go.
        next_ids = F.pad(input_ids[:, 1:], (0, 1))
        lp, ent = self._scores(dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids),
                               next_ids, temperature, return_entropy, drop_last=False)
        lp = lp[:, :-1]
        zero = lp.new_zeros(lp.shape[0], 1)
        # torch.where (not a product) so a non-finite value at a pad can never leak into the output
        out = {"log_probs": torch.where(valid, torch.cat([zero, lp], 1), 0.0)}
        if return_entropy:
            out["entropy"] = torch.where(valid, torch.cat([zero, ent[:, :-1]], 1), 0.0)
        return out

    def _bucketed_forward(self, tokens, cu_seqlens, temperature: float, return_entropy: bool) -> dict:
        """Packed ``[T]`` in and out, as padded forwards over groups of similar lengths (sdpa/eager:
        no ``[T, T]`` mask, see `forward_in_length_buckets`)."""
        return forward_in_length_buckets(
            tokens, cu_seqlens, lambda ids, mask: self._padded_forward(ids, mask, temperature, return_entropy),
            self.max_padding)

    def _varlen_forward(self, tokens, cu_seqlens, temperature: float, return_entropy: bool) -> dict:
        """Packed ``[T]`` in and out in one forward (flash-attention's varlen kernels)."""
        kw = packed_model_kwargs(tokens, cu_seqlens, self.attn_implementation)
        tokens = kw["input_ids"][0]
        starts = sequence_start_mask(cu_seqlens.to(tokens.device), tokens.shape[0])
        lp, ent = self._scores(kw, kw["input_ids"][:, 1:], temperature, return_entropy, drop_last=True)
        zero = lp.new_zeros(1)
        out = {"log_probs": torch.cat([zero, lp[0]]).masked_fill(starts, 0.0)}
        if return_entropy:
            out["entropy"] = torch.cat([zero, ent[0]]).masked_fill(starts, 0.0)
        return out

    # ------------------------------------------------------------------ saving
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict of the base model with every LoRA delta folded into its weight.

        Does not modify the live model (no merge/unmerge round trip, so no rounding drift in
        bf16). Only the merged weights are new tensors; the rest are references.
        """
        return dict(self.merged_weights())

    def merged_weights(self, gather: Callable[[list[nn.Parameter]], ContextManager] | None = None,
                       ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` of :meth:`merged_state_dict`, one module at a time, in state-dict order.

        ``gather(params)`` is entered around each module's parameters while its tensors are read:
        ZeRO-3's ``GatheredParameters``, so that only one module is whole at a time instead of the
        whole model. A tensor yielded inside a gather may be released once the generator resumes:
        copy what you keep before asking for the next one.
        """
        model = self.model.get_base_model() if self.is_lora else self.model
        lora_types: tuple[type, ...] = ()
        if self.is_lora:
            from peft.tuners.lora import LoraLayer

            lora_types = (LoraLayer,)
        merged_into_parent: list[str] = []  # the inside of a LoRA layer is read with the layer itself
        for mod_name, module in model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            if any(prefix.startswith(inner) for inner in merged_into_parent):
                continue
            if isinstance(module, lora_types):
                merged_into_parent.append(prefix)
                with _gathered(gather, list(module.parameters())):
                    yield from self._merged_lora_layer(prefix, module)
                continue
            own = _own_tensors(module)
            with _gathered(gather, [t for _, t in own if isinstance(t, nn.Parameter)]):
                for name, tensor in own:
                    yield prefix + name, tensor.detach()

    @staticmethod
    def _merged_lora_layer(prefix: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        base_layer = module.get_base_layer()
        if getattr(base_layer.weight, "quant_state", None) is not None or base_layer.weight.dtype in (
            torch.uint8,
            torch.int8,
        ):
            raise NotImplementedError(
                "merge_lora on a quantised (4-bit) base model is not supported; save the adapter "
                "(merge_lora=False) and merge into the full-precision base offline"
            )
        for name, tensor in _own_tensors(base_layer):
            tensor = tensor.detach()
            if name == "weight":
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        tensor = tensor + module.get_delta_weight(adapter).to(tensor.dtype).detach()
            yield prefix + name, tensor

    def save_pretrained(self, save_dir: str | os.PathLike, merge_lora: bool = False, **kwargs) -> None:
        """Save in Hugging Face format (safetensors).

        Plain model: ``model.save_pretrained``. LoRA model: the adapter only (peft format) unless
        ``merge_lora=True``, which writes a plain causal-LM checkpoint with the LoRA deltas folded
        in (loadable with :meth:`from_pretrained` or vLLM). The live model is left unchanged.
        """
        os.makedirs(save_dir, exist_ok=True)
        if self.is_lora and merge_lora:
            base = self.model.get_base_model()
            base.save_pretrained(save_dir, state_dict=self.merged_state_dict(), **kwargs)
        else:
            self.model.save_pretrained(save_dir, **kwargs)


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A module's own entries of its state dict: parameters, then persistent buffers."""
    params = [(n, p) for n, p in module._parameters.items() if p is not None]
    buffers = [(n, b) for n, b in module._buffers.items()
               if b is not None and n not in module._non_persistent_buffers_set]
    return params + buffers


def _gathered(gather: Callable[[list[nn.Parameter]], ContextManager] | None,
              params: list[nn.Parameter]) -> ContextManager:
    return gather(params) if gather is not None and params else contextlib.nullcontext()
