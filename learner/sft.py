"""A short supervised pass (prompt -> answer) used to warm a policy up before RL.

RL from a random model never finds a reward; the default job first teaches the tiny model the
task's format and some answers so that RL starts from a policy that is sometimes right.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def supervised_warmup(model_dir: str | Path, pairs: list[tuple[str, str]], out_dir: str | Path, *,
                      steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Train on `answer + EOS` given `prompt` (cross-entropy on answer tokens only); save to out_dir.

    Returns the per-step losses. Deterministic for a given seed on the CPU.
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
        length = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), length), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for row, (p, a) in enumerate(batch):
            seq = p + a
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, len(p): len(seq)] = torch.tensor(a)
            mask[row, : len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return losses
