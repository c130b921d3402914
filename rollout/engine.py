"""The vLLM engine of one rollout process: continuous generation with behaviour log-probs, in-flight weight reload."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from protocol.config import RolloutConfig
from protocol.messages import PackedBatch, TensorMeta, WeightUpdate, WorkGrant
from protocol.placement import parse_cores

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput

# vLLM schedules requests of a smaller priority value first (equal ones first come, first served).
EVALUATION_PRIORITY = 1



def configure_cpu_threads(cfg: RolloutConfig, process_index: int) -> None:
    """Pin this process's vLLM CPU threads to its own cores, unless the user already chose.

    vLLM's CPU backend binds OpenMP threads itself and by default every engine takes the same
    cores; with several rollout processes and a learner on one machine they would fight over
    them. Process i gets `omp_threads` consecutive cores starting at i * omp_threads (wrapping).
    """
    # Without it vLLM reserves 92 % of the machine's memory for the KV cache, whoever chose the cores.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_space_gib))
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        cores = sorted(os.sched_getaffinity(0))
        first = (process_index * cfg.omp_threads) % len(cores)
        chosen = [cores[(first + k) % len(cores)] for k in range(min(cfg.omp_threads, len(cores)))]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, chosen))
    bound = os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    if bound not in ("", "auto", "nobind"):
        # An engine in this process binds its OpenMP threads to these cores; torch's pool must
        # have as many threads, set before the binding (vLLM refuses it after): with more, they
        # share the bound cores and each matmul of a small model takes several times longer.
        torch.set_num_threads(len(parse_cores(bound.split("|")[0], "VLLM_CPU_OMP_THREADS_BIND")))


@dataclass
class _Generation:
    """A grant inside the engine: one vLLM request (n samples) per prompt, finished ones kept."""

    grant: WorkGrant
    first_version: int
    engine_seconds: float = 0.0  # engine time spent on this grant: a step shared by k grants counts 1/k
    finished: dict[int, tuple[RequestOutput, int]] = field(default_factory=dict)  # prompt index -> (output, last version)


class VLLMGenerator:
    """One vLLM `LLM` engine, stepped by its owner. Not thread-safe: call it from one thread at a time.

    Grants are submitted as requests and generated together (continuous batching); `step` runs
    the engine and returns the grants that finished. A weight update is applied between two
    steps; what happens to the requests running then is `cfg.inflight_update`'s choice: they are
    recomputed with the new weights and go on (recompute), go on with the new weights over their
    old KV cache (keep), or must have finished before the update is applied (finish; see
    `ready_for_weights`).
    """

    def __init__(self, model_path: str, cfg: RolloutConfig, *, seed: int, trust_remote_code: bool = False):
        from vllm import LLM  # imported here: vLLM start-up is heavy and spawns workers

        kwargs = {}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            # A prefill split over engine steps discards the token sampled at its first part and
            # rewinds the request's generator, which CPU generators cannot do ("CPU Generator does
            # not use offset"): seeded requests then crash the engine. Long prefills happen when an
            # in-flight update makes running requests recompute their tokens so far.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(cfg.max_model_len, 4096)
        if cfg.inflight_update == "keep":
            # vLLM drops its prefix cache only as a whole: reset_prefix_cache refuses while any block
            # is in use, or preempts every running request first. Running requests keep their blocks
            # here, so a later prompt could hit blocks computed under the old weights; without prefix
            # caching no block outlives its request.
            kwargs["enable_prefix_caching"] = False
        self.inflight_update = cfg.inflight_update
        # One worker: run it and the engine core in this process. As separate processes they talk
        # through a shared-memory queue that spins for 1 s after every message, so an engine that
        # generates a third of the time would hold a whole core; here it uses the CPU only while
        # it works, and updates reach it as tensors, not files.
        self.in_process = cfg.tensor_parallel_size == 1 and not cfg.engine_process
        if self.in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            kwargs["distributed_executor_backend"] = "uni"
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
            # Evaluation requests take the room training requests leave (EVALUATION_PRIORITY): they
            # wait, or are preempted and recomputed, rather than hold training back.
            scheduling_policy="priority",
            worker_extension_cls="rollout.worker_extension.WeightReloadExtension",
            **kwargs,
        )
        # Nothing is generated before the learner's first update: the engine loaded weights from
        # a path, and only a fingerprinted update proves they are the learner's.
        self.weight_version = -1
        self.generations: dict[int, _Generation] = {}  # grant id -> generation
        self.requests: dict[str, tuple[int, int]] = {}  # request id -> (grant id, prompt index)

    @property
    def busy(self) -> bool:
        return bool(self.generations)

    @property
    def ready_for_weights(self) -> bool:
        """Whether `apply_weights` may be called now: always, except while requests run with
        inflight_update finish (they end under the weights they started with)."""
        return self.inflight_update != "finish" or not self.busy

    def submit(self, grant: WorkGrant) -> None:
        """Start generating `grant`'s prompts (n samples each) with the current weights."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = grant.sampling
        self.generations[grant.grant_id] = _Generation(grant, self.weight_version)
        for index, prompt in enumerate(grant.prompts):
            # each request its own seed block: no two samples of a run share their randomness
            params = SamplingParams(
                n=grant.n_samples, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                max_tokens=s.max_new_tokens, min_tokens=s.min_new_tokens,
                stop_token_ids=list(s.stop_token_ids) or None, stop=list(s.stop_strings) or None,
                seed=grant.request_seed(index), logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY,
                # The learner decodes what it scores, and text here costs a fifth of a small model's
                # step; but stop strings are looked for in the text as it grows.
                detokenize=bool(s.stop_strings),
            )
            request_id = f"grant-{grant.grant_id}/{index}"
            self.requests[request_id] = (grant.grant_id, index)
            self.llm.llm_engine.add_request(request_id, {"prompt_token_ids": prompt.token_ids.tolist()}, params,
                                            priority=EVALUATION_PRIORITY if grant.evaluation else 0)

    def step(self) -> list[PackedBatch]:
        """One engine step; returns the packed answers of the grants whose last request finished."""
        if not self.generations:
            return []
        done = []
        started = time.perf_counter()
        outputs = self.llm.llm_engine.step()
        share = (time.perf_counter() - started) / len(self.generations)
        for generation in self.generations.values():
            generation.engine_seconds += share
        for output in outputs:
            if not output.finished:
                continue
            grant_id, index = self.requests.pop(output.request_id)
            generation = self.generations[grant_id]
            # Outputs can trail the engine by a step, so the current version bounds the last one used.
            generation.finished[index] = (output, self.weight_version)
            if len(generation.finished) == len(generation.grant.prompts):
                del self.generations[grant_id]
                done.append(pack_generation(generation))
        return done

    def cancel_all(self) -> int:
        """Abort every request in the engine (their grants are void); returns how many grants."""
        if self.requests:
            self.llm.llm_engine.abort_request(list(self.requests))
        cancelled = len(self.generations)
        self.requests.clear()
        self.generations.clear()
        return cancelled

    def close(self) -> None:
        """Stop the engine's processes now (otherwise they stop at interpreter exit)."""
        self.llm.llm_engine.engine_core.shutdown()

    def apply_weights(self, update: WeightUpdate, staging_dir: str, timeout_s: float) -> dict[str, str]:
        """Load a whole WeightUpdate (see `apply_weight_stream`)."""
        return self.apply_weight_stream(update.version, sorted(update.fingerprint),
                                        ((m, update.tensor_bytes(m)) for m in update.tensors), staging_dir, timeout_s)

    def apply_weight_stream(self, version: int, fingerprint_names: list[str],
                            tensors: Iterable[tuple[TensorMeta, memoryview]], staging_dir: str,
                            timeout_s: float) -> dict[str, str]:
        """Load weight version `version` into the running engine as its tensors come; returns the
        fingerprint the workers saw.

        `tensors` yields each tensor's meta and raw bytes, possibly waiting for them to arrive
        (rollout.weight_stream). Scheduling pauses (running requests are kept) and the workers reload
        their weights. With inflight_update recompute (and finish, where nothing runs) the KV cache is
        dropped, the running requests' included: they are recomputed with the new weights when
        scheduling resumes, so no token is sampled from a mix of two versions, and no prompt reuses a
        prefix cached under the old ones. With keep, running requests keep the KV cache of their tokens
        so far, computed under the old weights, and attend to it with the new ones (prefix caching is
        off, so no other request can). A worker in this process reads each tensor in place; workers
        in other processes read them one file at a time from `staging_dir` (`TensorFileFeed`) and
        raise TimeoutError if one does not come within `timeout_s`.
        """
        self._check_ready(version)
        if self.in_process:
            return self._reload(version, "apply_weights", (_as_torch(tensors), fingerprint_names), timeout_s)
        feed = TensorFileFeed(tensors, staging_dir, version, timeout_s)
        return self._reload(version, "apply_weights_files", (feed.directory, fingerprint_names, timeout_s),
                            timeout_s, feed=feed)

    def join_weight_group(self, group_id: bytes, first_rank: int, world_size: int) -> None:
        """Have every worker join the NCCL weight group `group_id` (transport.weight_transfer nccl; an NCCL
        unique id), from rank `first_rank` on."""
        self.llm.collective_rpc("join_weight_group", args=(group_id, first_rank, world_size))

    def apply_weight_broadcast(self, version: int, fingerprint_names: list[str], layout: list,
                               timeout_s: float) -> dict[str, str]:
        """Load weight version `version` as learner rank 0 broadcasts its buckets over the NCCL weight group,
        each worker receiving them into its own GPU memory (`layout`: rollout.worker_extension.BucketLayout
        per bucket); otherwise as `apply_weight_stream`."""
        self._check_ready(version)
        return self._reload(version, "apply_weights_nccl", (layout, fingerprint_names, timeout_s), timeout_s)

    def _check_ready(self, version: int) -> None:
        if not self.ready_for_weights:
            raise RuntimeError(f"weight version {version} applied while requests run, with "
                               f"rollout.inflight_update finish: apply it once ready_for_weights")

    def _reload(self, version: int, method: str, args: tuple, timeout_s: float, *,
                feed: TensorFileFeed | None = None) -> dict[str, str]:
        """Pause scheduling, have every worker run `method(*args)` (reading the files of `feed`, if given),
        drop the KV cache unless inflight_update keep, resume; returns the fingerprint the workers saw."""
        self.llm.sleep(level=0, mode="keep")
        try:
            prints = self.llm.collective_rpc(method, args=args, timeout=timeout_s)
            if feed is not None:
                feed.finish()
            if self.inflight_update != "keep" and not self.llm.reset_prefix_cache(reset_running_requests=True):
                raise RuntimeError(f"vLLM could not drop its KV cache after loading weight version {version}")
        except BaseException:
            self.weight_version = -1  # partly reloaded: nothing is generated until a whole version is applied
            raise
        finally:
            if feed is not None:
                feed.close()
            self.llm.wake_up(tags=["scheduling"])
        if any(p != prints[0] for p in prints):
            raise RuntimeError(f"workers of one engine loaded different weights for version {version}")
        self.weight_version = version
        return prints[0]


def _as_torch(tensors: Iterable[tuple[TensorMeta, memoryview]]):
    """(name, tensor) pairs viewing the given bytes (read-only: the model copies them into its parameters)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        for meta, data in tensors:
            yield meta.name, torch.frombuffer(data, dtype=getattr(torch, meta.dtype)).view(meta.shape)


class TensorFileFeed:
    """Hands tensors to workers in other processes one file at a time, as they come.

    A thread writes tensor i to `<directory>/<i>.<dtype>.<shape>` (written aside, then renamed, so a
    file that exists is whole) once no more than `WINDOW` written files wait to be read; the workers
    (rollout.worker_extension) read and delete them in order, so the files hold a tensor or two, not
    the model. The directory goes when the feed is closed.
    """

    WINDOW = 2

    def __init__(self, tensors: Iterable[tuple[TensorMeta, memoryview]], staging_dir: str, version: int,
                 timeout_s: float):
        self.directory = tempfile.mkdtemp(prefix=f"streamrlhf-{os.getpid()}-v{version}-", dir=staging_dir)
        self.timeout_s = timeout_s
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._write_all, args=(tensors,), name="tensor-feed", daemon=True)
        self.thread.start()

    def _write_all(self, tensors) -> None:
        try:
            for i, (meta, data) in enumerate(tensors):
                self._wait_for_room()
                shape = "x".join(map(str, meta.shape)) or "scalar"
                final = Path(self.directory) / f"{i:06d}.{meta.dtype}.{shape}.{meta.name}"
                aside = final.with_name("." + final.name)
                with open(aside, "wb") as f:
                    f.write(data)
                aside.rename(final)
            (Path(self.directory) / "end").touch()
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish() in the engine thread
            self.error = exc

    def _wait_for_room(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while len([p for p in os.listdir(self.directory) if not p.startswith(".")]) >= self.WINDOW:
            if self.stopped.wait(0.001):
                raise RuntimeError("tensor feed closed")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine's workers read no weight file for {self.timeout_s:g} s")

    def finish(self) -> None:
        """Raise what went wrong while writing, if anything."""
        self.thread.join(self.timeout_s)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(self.timeout_s)
        shutil.rmtree(self.directory, ignore_errors=True)


def pack_generation(generation: _Generation) -> PackedBatch:
    """Concatenate prompt + response of every sample of a finished grant into one PackedBatch.

    Samples are ordered by prompt, then sample index, as the grant listed them (see protocol).
    """
    grant = generation.grant
    samples = [(spec, index, sample, last_version)
               for i, spec in enumerate(grant.prompts)
               for (output, last_version) in [generation.finished[i]]
               for index, sample in enumerate(output.outputs)]
    seqs = [np.concatenate([spec.token_ids, np.asarray(sample.token_ids, dtype=np.int32)])
            for spec, _, sample, _ in samples]
    lens = np.array([len(s) for s in seqs], dtype=np.int32)
    prompt_lens = np.array([len(spec.token_ids) for spec, *_ in samples], dtype=np.int32)
    cu = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])
    loss_mask = np.zeros(int(cu[-1]), dtype=np.uint8)
    logprobs = np.zeros(int(cu[-1]), dtype=np.float32)
    for b, (_, _, sample, _) in enumerate(samples):
        start = cu[b] + prompt_lens[b]
        loss_mask[start: cu[b + 1]] = 1
        logprobs[start: cu[b + 1]] = [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)]
    return PackedBatch(
        grant_id=grant.grant_id, step=grant.step,
        tokens=np.concatenate(seqs),
        cu_seqlens=cu, prompt_lens=prompt_lens, loss_mask=loss_mask,
        # vLLM can report -0.0 or tiny positive rounding for certain tokens; log-probs are <= 0.
        behaviour_logprobs=np.minimum(logprobs, 0.0),
        prompt_ids=np.array([spec.prompt_id for spec, *_ in samples], dtype=np.int64),
        sample_indices=np.array([index for _, index, _, _ in samples], dtype=np.int32),
        weight_versions=np.full(len(samples), generation.first_version, dtype=np.int32),
        last_weight_versions=np.array([last for *_, last in samples], dtype=np.int32),
        finish_reasons=[sample.finish_reason if sample.finish_reason in ("stop", "length") else "abort"
                        for _, _, sample, _ in samples],
        labels=[spec.label for spec, *_ in samples],
        gen_seconds=generation.engine_seconds,
        evaluation=grant.evaluation,
    )


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start
