"""Deterministic small Llama-style models and their tokenizers, built from a config.

Nothing can be downloaded on the machines this project runs on, so the default job and the tests
build their own model. The same training code loads any Hugging Face model path; this module only
makes small ones that vLLM's CPU backend accepts (head_dim 64, e.g. hidden 128, 2 heads, 1 KV head).
Two tokenizers: one token per character (the default job), or the 512-token byte-level BPE of
learner.tiny.bpe (the tasks learner.tasks.addition and learner.tasks.longtail, whose models come in the
sizes of MODEL_SIZES).
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from learner.tiny import bpe

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHARSET = string.digits + string.ascii_letters + " +-*/=?.,:!()'\"\n"


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a built-in model. head_dim = hidden_size / num_attention_heads must be 64 on CPU vLLM.

    tokenizer: "char" (build_tokenizer) or "bpe" (build_bpe_tokenizer); vocab_size must hold it.
    """

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    vocab_size: int = 128
    max_position_embeddings: int = 256
    seed: int = 0
    tokenizer: str = "char"


_BPE = dict(vocab_size=bpe.VOCAB_SIZE, max_position_embeddings=1024, tokenizer="bpe")
# The sizes of the built-in tasks' models (parameters include the untied input and output embeddings).
MODEL_SIZES: dict[str, TinyModelSpec] = {
    "tiny": TinyModelSpec(**_BPE),  # 0.43M parameters
    "small": TinyModelSpec(hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, **_BPE),  # 3.0M
    "medium": TinyModelSpec(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4, **_BPE),  # 25.7M
}


def sized_spec(size: str, seed: int = 0) -> TinyModelSpec:
    """The MODEL_SIZES entry `size`, initialised from `seed`."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    return replace(MODEL_SIZES[size], seed=seed)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of CHARSET plus four special tokens; a BOS token starts every text."""
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARSET])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return _with_bos(backend, unk_token=UNK)


def build_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """The built-in byte-level BPE (learner.tiny.bpe) with PAD, BOS and EOS; a BOS token starts every text."""
    return _with_bos(bpe.train_bpe([PAD, BOS, EOS]))


def _with_bos(backend: Tokenizer, unk_token: str | None = None) -> PreTrainedTokenizerFast:
    """Wrap a backend whose vocabulary holds PAD, BOS and EOS; BOS is prepended to every text."""
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=unk_token
    )


TOKENIZERS = {"char": build_tokenizer, "bpe": build_bpe_tokenizer}


def build_tiny_model(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a randomly initialised (seeded) model and its tokenizer as a Hugging Face directory.

    Idempotent: an existing directory built from the same spec is kept as it is.
    """
    out = Path(out_dir)
    marker = out / "tiny_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec):
        return out
    tokenizer = TOKENIZERS[spec.tokenizer]()
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


def remove_eos(model_dir: str | Path) -> Path:
    """Make a model directory's responses end only at their token limit: its configs and tokenizer
    no longer name an end-of-sequence token, so vLLM never stops on one. Fixed-length generation for
    benchmarks and tests that compare behaviour log-probs with the learner's: unlike
    rollout.min_new_tokens (vLLM's min_tokens, which masks EOS and so renormalises what is sampled),
    the sampled distribution stays the model's own."""
    out = Path(model_dir)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        path = out / name
        if path.exists():
            settings = json.loads(path.read_text())
            settings.update({key: None for key in ("eos_token_id", "eos_token") if key in settings})
            path.write_text(json.dumps(settings, indent=1))
    return out
