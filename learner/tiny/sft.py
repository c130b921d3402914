"""A short supervised pass (prompt -> answer) used to warm a policy up before RL.

RL from a random model never finds a reward; the default job first teaches the tiny model the
task's format and some answers so that RL starts from a policy that is sometimes right.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

Example = tuple[list[int], list[int]]  # prompt token ids, answer token ids (EOS included)


def supervised_warmup(model_dir: str | Path, pairs: list[tuple[str, str]], out_dir: str | Path, *,
                      steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                      micro_batch_tokens: int | None = None) -> list[float]:
    """Train on `answer + EOS` given `prompt` (cross-entropy on answer tokens only); save to out_dir.

    Each step averages the loss over the answer tokens of `batch_size` sampled pairs. With
    `micro_batch_tokens`, the batch is cut into micro-batches of similar lengths holding at most
    that many tokens (padding included) whose gradients add up to the same step: when answer
    lengths vary widely, far less compute goes to padding. Returns the per-step losses.
    Deterministic for a given seed on the CPU.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    encoded = []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((p, a))
    losses = []
    for _ in range(steps):
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        answer_tokens = sum(len(a) for _, a in batch)
        optimizer.zero_grad()
        step_loss = 0.0
        for micro in _micro_batches(batch, micro_batch_tokens):
            ids, mask, labels = _collate(micro, tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=answer_tokens).loss
            loss.backward()
            step_loss += loss.item()
        optimizer.step()
        losses.append(step_loss)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return losses


def _micro_batches(batch: list[Example], max_tokens: int | None) -> list[list[Example]]:
    """The whole batch when max_tokens is None; otherwise runs of the batch sorted by length, each
    padded to its longest member and within max_tokens (a longer single example goes alone)."""
    if max_tokens is None:
        return [batch]
    micros: list[list[Example]] = []
    current: list[Example] = []
    for example in sorted(batch, key=lambda e: len(e[0]) + len(e[1])):
        if current and (len(current) + 1) * (len(example[0]) + len(example[1])) > max_tokens:
            micros.append(current)
            current = []
        current.append(example)
    return micros + [current]


def _collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels (-100 except on the answer tokens)."""
    length = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for row, (p, a) in enumerate(examples):
        seq = p + a
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(p): len(seq)] = torch.tensor(a)
        mask[row, : len(seq)] = 1
    return ids, mask, labels
