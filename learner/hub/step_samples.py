"""One step's samples as torch tensors: the packed batches of a step, concatenated and sliceable."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protocol.messages import PackedBatch


@dataclass
class StepSamples:
    """B packed sequences (prompt + response); groups of n samples of one prompt are contiguous.

    tokens/loss_mask/behaviour_log_probs: [T]; cu_seqlens: [B+1]; prompt_lens, prompt_ids,
    weight_versions: [B]. Per-token tensors are aligned to tokens (see protocol.messages).
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    prompt_lens: torch.Tensor
    loss_mask: torch.Tensor
    behaviour_log_probs: torch.Tensor
    prompt_ids: torch.Tensor
    weight_versions: torch.Tensor
    finish_reasons: list[str]
    labels: list[str | None]

    @classmethod
    def from_batches(cls, batches: list[PackedBatch]) -> StepSamples:
        offsets = np.cumsum([0] + [b.num_tokens for b in batches[:-1]])
        cu = np.concatenate([[0]] + [b.cu_seqlens[1:].astype(np.int64) + off for b, off in zip(batches, offsets)])

        def cat(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([getattr(b, name) for b in batches])).to(dtype)

        return cls(tokens=cat("tokens", torch.long), cu_seqlens=torch.from_numpy(cu).to(torch.int32),
                   prompt_lens=cat("prompt_lens", torch.long), loss_mask=cat("loss_mask", torch.bool),
                   behaviour_log_probs=cat("behaviour_logprobs", torch.float32),
                   prompt_ids=cat("prompt_ids", torch.long), weight_versions=cat("weight_versions", torch.long),
                   finish_reasons=[r for b in batches for r in b.finish_reasons],
                   labels=[label for b in batches for label in b.labels])

    @classmethod
    def concat(cls, parts: list[StepSamples]) -> StepSamples:
        offsets = [0]
        for p in parts[:-1]:
            offsets.append(offsets[-1] + p.num_tokens)
        return cls(
            tokens=torch.cat([p.tokens for p in parts]),
            cu_seqlens=torch.cat([parts[0].cu_seqlens[:1]] + [p.cu_seqlens[1:] + o for p, o in zip(parts, offsets)]),
            prompt_lens=torch.cat([p.prompt_lens for p in parts]), loss_mask=torch.cat([p.loss_mask for p in parts]),
            behaviour_log_probs=torch.cat([p.behaviour_log_probs for p in parts]),
            prompt_ids=torch.cat([p.prompt_ids for p in parts]),
            weight_versions=torch.cat([p.weight_versions for p in parts]),
            finish_reasons=[r for p in parts for r in p.finish_reasons], labels=[x for p in parts for x in p.labels])

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def response_lengths(self) -> torch.Tensor:
        """Generated tokens per sequence, [B]."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1] - self.prompt_lens

    @property
    def truncated(self) -> torch.Tensor:
        """Whether each sequence was cut off at the token limit (finish reason 'length'), [B] bool."""
        return torch.tensor([reason == "length" for reason in self.finish_reasons], dtype=torch.bool)

    def rows(self, start: int, stop: int) -> StepSamples:
        """Sequences start..stop-1 as their own packed batch."""
        t0, t1 = int(self.cu_seqlens[start]), int(self.cu_seqlens[stop])
        return StepSamples(
            tokens=self.tokens[t0:t1], cu_seqlens=self.cu_seqlens[start: stop + 1] - t0,
            prompt_lens=self.prompt_lens[start:stop], loss_mask=self.loss_mask[t0:t1],
            behaviour_log_probs=self.behaviour_log_probs[t0:t1], prompt_ids=self.prompt_ids[start:stop],
            weight_versions=self.weight_versions[start:stop], finish_reasons=self.finish_reasons[start:stop],
            labels=self.labels[start:stop])

    def select(self, keep: torch.Tensor) -> StepSamples:
        """The sequences where `keep` ([B] bool) is True, in order, as their own packed batch."""
        runs, start = [], None
        for row, kept in enumerate([*keep.tolist(), False]):
            if kept and start is None:
                start = row
            elif not kept and start is not None:
                runs.append(self.rows(start, row))
                start = None
        return StepSamples.concat(runs) if runs else self.rows(0, 0)

    def micro_batch_bounds(self, token_budget: int) -> list[tuple[int, int]]:
        """Split into consecutive row ranges of at most `token_budget` tokens (one sequence may exceed it)."""
        lens = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()
        bounds, start, used = [], 0, 0
        for row, n in enumerate(lens):
            if used and used + n > token_budget:
                bounds.append((start, row))
                start, used = row, 0
            used += n
        bounds.append((start, len(lens)))
        return bounds

    def response_texts(self, tokenizer) -> tuple[list[str], list[str]]:
        """(prompt texts, completion texts) decoded without special tokens, for reward functions."""
        prompts, completions = [], []
        for b in range(self.num_sequences):
            start, stop = int(self.cu_seqlens[b]), int(self.cu_seqlens[b + 1])
            split = start + int(self.prompt_lens[b])
            prompts.append(tokenizer.decode(self.tokens[start:split].tolist(), skip_special_tokens=True))
            completions.append(tokenizer.decode(self.tokens[split:stop].tolist(), skip_special_tokens=True))
        return prompts, completions
