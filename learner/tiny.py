"""A deterministic tiny Llama-style model and character tokenizer, built from a config.

Nothing can be downloaded on the machines this project runs on, so the default job and the tests
build their own model. The same training code loads any Hugging Face model path; this module only
makes a small one that vLLM's CPU backend accepts (head_dim 64: hidden 128, 2 heads, 1 KV head).
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHARSET = string.digits + string.ascii_letters + " +-*/=?.,:!()'\"\n"


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the built-in model. head_dim = hidden_size / num_attention_heads must be 64 on CPU vLLM."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    vocab_size: int = 128
    max_position_embeddings: int = 256
    seed: int = 0


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of CHARSET plus four special tokens; a BOS token starts every text."""
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARSET])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def build_tiny_model(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a randomly initialised (seeded) model and its tokenizer as a Hugging Face directory.

    Idempotent: an existing directory built from the same spec is kept as it is.
    """
    out = Path(out_dir)
    marker = out / "tiny_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec):
        return out
    tokenizer = build_tokenizer()
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={spec.vocab_size}")
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    marker.write_text(json.dumps(asdict(spec), indent=1))
    return out
