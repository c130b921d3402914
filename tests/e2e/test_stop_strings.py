"""Stop strings in the real vLLM engine: where a response ends, and which tokens it keeps.

The rule (protocol.messages.SamplingSpec): a response whose text comes to contain a stop string
keeps every token up to the one that completes it, that token included even where it goes on past
the stop string; the text decoded from the kept tokens contains the stop string. The model uses the
built-in byte-level BPE, so tokens span several characters and a stop string can end inside one;
its output layer samples only tokens of printable ASCII text (so that the text of a prefix of the
tokens is a prefix of the text, as the engine sees it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.tiny.model import build_bpe_tokenizer, build_tiny_model, sized_spec
from learner.training.weight_sync import build_weight_update
from protocol.config import RolloutConfig
from protocol.messages import PromptSpec, SamplingSpec, WorkGrant
from tests.e2e.conftest import vllm_engine

pytestmark = pytest.mark.e2e

MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = build_tiny_model(tmp_path_factory.mktemp("bpe"), sized_spec("tiny"))
    with vllm_engine(model_dir, RolloutConfig(max_model_len=256)) as engine:
        engine.apply_weights(readable_text_weights(model_dir), str(tmp_path_factory.mktemp("staging")), 60)
        yield engine


def readable_text_weights(model_dir):
    """Version 0: the model with the output layer rows of printable-ASCII tokens scaled up (the largest
    logit about +17) and the others' (EOS's too) zero, so that only the former are ever sampled."""
    state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    head = state["lm_head.weight"]
    tokenizer = build_bpe_tokenizer()
    texts = [tokenizer.decode([t]) if t < len(tokenizer) else "" for t in range(head.shape[0])]
    readable = torch.tensor([t.isascii() and t.isprintable() and t != "" for t in texts])
    return build_weight_update(0, {**state, "lm_head.weight": head * 30 * readable[:, None]}.items(),
                               dtype=torch.float32, bucket_bytes=1 << 20)


def generate(engine, tokenizer, stop_strings: list[str]) -> list[tuple[list[int], str, np.ndarray]]:
    """(response tokens, finish reason, behaviour log-probs) of every sample of one seeded grant."""
    sampling = SamplingSpec(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=MAX_NEW_TOKENS,
                            stop_token_ids=[], seed=11, stop_strings=stop_strings)
    prompts = [PromptSpec(prompt_id=i, token_ids=tokenizer(text)["input_ids"], label=None)
               for i, text in enumerate(["the cat", "12+7=", "one two three"])]
    # the same grant id and seed each time: the samples draw the same randomness
    engine.submit(WorkGrant(grant_id=0, step=0, min_weight_version=0, n_samples=3, sampling=sampling,
                            prompts=prompts))
    batches = []
    while engine.busy:
        batches += engine.step()
    (batch,) = batches
    out = []
    for b in range(batch.num_sequences):
        start, stop = batch.cu_seqlens[b] + batch.prompt_lens[b], batch.cu_seqlens[b + 1]
        assert batch.loss_mask[batch.cu_seqlens[b]:start].sum() == 0 and batch.loss_mask[start:stop].all()
        out.append((batch.tokens[start:stop].tolist(), batch.finish_reasons[b], batch.behaviour_logprobs[start:stop]))
    return out


def stop_string_ending_inside_a_token(tokenizer, tokens: list[int]) -> tuple[str, int]:
    """A stop string found first where it ends inside a multi-character token of `tokens`, and the
    number of tokens up to that one."""
    ends = [len(tokenizer.decode(tokens[:k], skip_special_tokens=True)) for k in range(len(tokens) + 1)]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    assert text.isascii(), text  # (a prefix of the tokens then decodes to a prefix of the text)
    for m in range(3, len(tokens)):
        start = ends[m] - 3
        stop_string = text[start:ends[m] + 1]
        if ends[m + 1] - ends[m] >= 2 and text.find(stop_string) == start:
            return stop_string, m + 1
    raise AssertionError(f"no token of two or more characters to stop inside: {text!r}")


def kept_by_rule(tokenizer, tokens: list[int], stop_string: str) -> int:
    """How many tokens the rule keeps: up to the first whose text completes the stop string."""
    for k in range(1, len(tokens) + 1):
        if stop_string in tokenizer.decode(tokens[:k], skip_special_tokens=True):
            return k
    return len(tokens)


def test_a_response_keeps_the_tokens_up_to_the_one_completing_the_stop_string(engine):
    tokenizer = build_bpe_tokenizer()
    free = generate(engine, tokenizer, [])
    stop_string, kept = stop_string_ending_inside_a_token(tokenizer, free[0][0])

    stopped = generate(engine, tokenizer, [stop_string])
    assert len(stopped[0][0]) == kept
    for (tokens, free_reason, logprobs), (cut, reason, cut_logprobs) in zip(free, stopped):
        k = kept_by_rule(tokenizer, tokens, stop_string)
        assert cut == tokens[:k]  # the tokens sampled, none dropped, none after the completing one
        assert np.allclose(cut_logprobs, logprobs[:k], atol=1e-5)  # and their behaviour log-probs
        text = tokenizer.decode(cut, skip_special_tokens=True)
        if k < len(tokens):
            assert reason == "stop" and stop_string in text
            assert stop_string not in tokenizer.decode(cut[:-1], skip_special_tokens=True)
        else:  # no stop string: the response ends as before (EOS or the length limit)
            assert reason == free_reason and stop_string not in text
    # the first sample's last token goes on past the stop string: it is kept whole
    text = tokenizer.decode(stopped[0][0], skip_special_tokens=True)
    assert text.index(stop_string) + len(stop_string) < len(text)
