"""The vLLM engine of one rollout process: generation with behaviour log-probs, in-place weight reload."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from protocol.config import RolloutConfig
from protocol.messages import PackedBatch, WeightUpdate, WorkGrant

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int64": torch.int64, "int32": torch.int32}


def configure_cpu_threads(cfg: RolloutConfig, process_index: int) -> None:
    """Pin this process's vLLM CPU threads to its own cores, unless the user already chose.

    vLLM's CPU backend binds OpenMP threads itself and by default every engine takes the same
    cores; with several rollout processes and a learner on one machine they would fight over
    them. Process i gets `omp_threads` consecutive cores starting at i * omp_threads (wrapping).
    """
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cores = sorted(os.sched_getaffinity(0))
    first = (process_index * cfg.omp_threads) % len(cores)
    chosen = [cores[(first + k) % len(cores)] for k in range(min(cfg.omp_threads, len(cores)))]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, chosen))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_space_gib))


@dataclass
class Completion:
    prompt_id: int
    sample_index: int
    prompt_tokens: list[int]
    response_tokens: list[int]
    response_logprobs: list[float]
    finish_reason: str
    label: str | None
    weight_version: int


class VLLMGenerator:
    """One vLLM `LLM` engine. Not thread-safe: generation and weight reloads must alternate."""

    def __init__(self, model_path: str, cfg: RolloutConfig, *, seed: int, trust_remote_code: bool = False):
        from vllm import LLM  # imported here: vLLM start-up is heavy and spawns workers

        kwargs = {}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        self.llm = LLM(
            model=model_path,
            dtype=cfg.engine_dtype,
            seed=seed,
            enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            trust_remote_code=trust_remote_code,
            # Log-probs after temperature scaling: the learner scores tokens with the same
            # temperature, so behaviour and learner log-probs are comparable.
            logprobs_mode="processed_logprobs",
            worker_extension_cls="rollout.worker_extension.WeightReloadExtension",
            **kwargs,
        )
        # Nothing is generated before the learner's first update: the engine loaded weights from
        # a path, and only a fingerprinted update proves they are the learner's.
        self.weight_version = -1

    def generate(self, grant: WorkGrant) -> list[Completion]:
        from vllm import SamplingParams

        s = grant.sampling
        params = SamplingParams(
            n=grant.n_samples, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            max_tokens=s.max_new_tokens, stop_token_ids=list(s.stop_token_ids) or None,
            seed=s.request_seed(grant.grant_id), logprobs=0,
        )
        prompts = [{"prompt_token_ids": p.token_ids.tolist()} for p in grant.prompts]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        completions = []
        for spec, out in zip(grant.prompts, outputs):
            for index, sample in enumerate(out.outputs):
                tokens = list(sample.token_ids)
                logprobs = [step[tok].logprob for step, tok in zip(sample.logprobs, tokens)]
                completions.append(Completion(
                    prompt_id=spec.prompt_id, sample_index=index, prompt_tokens=spec.token_ids.tolist(),
                    response_tokens=tokens, response_logprobs=logprobs,
                    finish_reason=sample.finish_reason if sample.finish_reason in ("stop", "length") else "abort",
                    label=spec.label, weight_version=self.weight_version))
        return completions

    def apply_weights(self, update: WeightUpdate, staging_dir: str, timeout_s: float) -> dict[str, str]:
        """Load a WeightUpdate into the running engine; returns the fingerprint the workers saw.

        A worker that does not finish within `timeout_s` raises TimeoutError instead of hanging.
        """
        tensors = {m.name: torch.frombuffer(bytearray(update.tensor_bytes(m)), dtype=_TORCH_DTYPES[m.dtype])
                   .view(m.shape) for m in update.tensors}
        path = Path(staging_dir) / f"streamrlhf-{os.getpid()}-v{update.version}.safetensors"
        save_file(tensors, str(path))
        try:
            prints = self.llm.collective_rpc("apply_weights_file", args=(str(path), sorted(update.fingerprint)),
                                             timeout=timeout_s)
        finally:
            path.unlink(missing_ok=True)
        # KV blocks cached for shared prompt prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
        if any(p != prints[0] for p in prints):
            raise RuntimeError(f"workers of one engine loaded different weights for version {update.version}")
        self.weight_version = update.version
        return prints[0]


def pack_completions(completions: list[Completion], grant: WorkGrant, gen_seconds: float) -> PackedBatch:
    """Concatenate prompt + response of every completion into one PackedBatch (see protocol)."""
    seqs = [c.prompt_tokens + c.response_tokens for c in completions]
    lens = np.array([len(s) for s in seqs], dtype=np.int32)
    prompt_lens = np.array([len(c.prompt_tokens) for c in completions], dtype=np.int32)
    cu = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])
    loss_mask = np.zeros(int(cu[-1]), dtype=np.uint8)
    logprobs = np.zeros(int(cu[-1]), dtype=np.float32)
    for b, c in enumerate(completions):
        start = cu[b] + prompt_lens[b]
        loss_mask[start: cu[b + 1]] = 1
        logprobs[start: cu[b + 1]] = c.response_logprobs
    return PackedBatch(
        grant_id=grant.grant_id, step=grant.step,
        tokens=np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs]),
        cu_seqlens=cu, prompt_lens=prompt_lens, loss_mask=loss_mask,
        # vLLM can report -0.0 or tiny positive rounding for certain tokens; log-probs are <= 0.
        behaviour_logprobs=np.minimum(logprobs, 0.0),
        prompt_ids=np.array([c.prompt_id for c in completions], dtype=np.int64),
        sample_indices=np.array([c.sample_index for c in completions], dtype=np.int32),
        weight_versions=np.array([c.weight_version for c in completions], dtype=np.int32),
        finish_reasons=[c.finish_reason for c in completions],
        labels=[c.label for c in completions],
        gen_seconds=gen_seconds,
    )


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start
