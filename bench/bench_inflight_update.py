"""Benchmark: what a weight update landing mid-generation costs, per rollout.inflight_update mode.

    python bench/bench_inflight_update.py [--every 512 128 32 --repeats 3 --grants 16 --concurrency 4
                                           --samples 4 --prompt-len 256 --min-new 1024 --max-new 2048
                                           --perturbations 1e-3 1e-4 --gap-every 128]

One real vLLM engine per prefix-caching setting (the CPU build, in this process, one core): a
recompute engine (prefix caching on, as the default) serves the recompute and finish modes, a keep
engine (prefix caching off, as keep needs) the keep mode. The model is the built-in tiny BPE model
(learner.tiny.model, vocabulary 512) with room for the long responses, its output layer scaled by
--head-scale (a random model's logits are nearly flat; scaled, the sampled tokens average a log-prob
of about -3, as a trained policy's might) and without an end-of-sequence token, so every response
is exactly as long as its grant asks (--min-new to --max-new tokens, drawn per grant).

Each run streams --grants grants (one prompt of --prompt-len random tokens x --samples samples) through
the engine, --concurrency grants at a time, as a rollout does. Every K engine steps a new weight
version is published: the previous one with Gaussian noise of std --perturbations[0] added to every
weight (a real WeightUpdate through VLLMGenerator.apply_weights). recompute and keep apply it at
once; finish applies it when the running requests have ended, and submits no grant while it waits.
Runs of every mode and K, and a "never" run on each engine, alternate within each repeat.

Reported per mode and K (medians over the repeats): generated tokens/s (wall clock); the run's CPU
time against the "never" run on the recompute engine in the same repeat (this process's CPU time:
other work on the shared machine moves it less than wall time), per repeat in brackets; engine steps against "never"
(finish's drain shows here: fewer requests run while an update waits); prefill tokens re-done
(tokens the scheduler scheduled for requests resumed after the update preempted them) per generated
token, the prompt's share of them (what keeping the prompt's KV cache could save at most) and the
share of CPU time in the steps that re-did them; the share in apply_weights; and how many engine
steps an update waited between its publication and its application.

Then, for K = --gap-every and each perturbation, the learning-side quality: the Actor (learner's log-
prob code) scores every finished sequence under the weights of every version, and each response
token's behaviour log-prob is compared with (a) the version that sampled it (what the engine's
tags and the importance-sampling correction assume) and (b) the newest version published when it
was sampled (how far behind the learner's policy it is), over the tokens sampled after an update
was published in their sequence's lifetime ("never": every token); and, as the scale to read them
by, how far one version moves the learner's log-probs on those tokens.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("recompute", "keep", "finish")


@dataclass
class RunStats:
    """One run of the workload: timings and counts, plus what the quality study needs."""

    tokens: int = 0  # response tokens generated
    wall_s: float = 0.0  # inside VLLMGenerator.step and apply_weights
    cpu_s: float = 0.0  # the same, in this process's CPU time (less sensitive to other work on the machine)
    apply_cpu_s: float = 0.0  # inside VLLMGenerator.apply_weights
    steps: int = 0
    computed_tokens: int = 0  # every token the scheduler scheduled (prompts, responses, re-done prefills)
    redone_tokens: int = 0  # tokens scheduled for requests resumed after a preemption
    redone_prompt_tokens: int = 0  # the prompt part of those
    redone_cpu_s: float = 0.0  # CPU time of the steps that scheduled resumed requests
    updates: int = 0
    wait_steps: list[int] = field(default_factory=list)  # per update: engine steps from publication to apply
    batches: list = field(default_factory=list)
    # per update: version, and each unfinished request's output-token count when it was applied / published
    applied_at: list[tuple[int, dict]] = field(default_factory=list)
    published_at: list[tuple[int, dict]] = field(default_factory=list)


def timed(fn, *args):
    """fn(*args), its wall time and this process's CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


class SchedulerProbe:
    """Counts what vLLM's scheduler schedules in each engine step (the engine runs in this process)."""

    def __init__(self, generator):
        self.scheduler = generator.llm.llm_engine.engine_core.engine_core.scheduler
        self.last = (0, 0, 0)
        schedule = self.scheduler.schedule

        def recording_schedule(*args, **kwargs):
            out = schedule(*args, **kwargs)
            self.last = (out.total_num_scheduled_tokens, *self.resumed(out))
            return out

        self.scheduler.schedule = recording_schedule

    def resumed(self, out) -> tuple[int, int]:
        """(tokens, prompt tokens) scheduled for requests resumed from preemption. Called right after
        scheduling, which has already advanced each request's num_computed_tokens past them."""
        tokens = prompt = 0
        for rid in out.scheduled_cached_reqs.resumed_req_ids:
            request, scheduled = self.scheduler.requests[rid], out.num_scheduled_tokens[rid]
            tokens += scheduled
            start = request.num_computed_tokens - scheduled  # a sibling's cached prompt blocks are skipped
            prompt += max(0, min(request.num_prompt_tokens, request.num_computed_tokens) - start)
        return tokens, prompt

    def take(self) -> tuple[int, int, int]:
        """(all tokens, resumed tokens, resumed prompt tokens) of the last step."""
        last, self.last = self.last, (0, 0, 0)
        return last

    def output_counts(self) -> dict[tuple[int, int, int], int]:
        """Output tokens so far of every unfinished request, keyed (grant id, prompt index, sample)."""
        return {request_key(rid): r.num_output_tokens for rid, r in self.scheduler.requests.items()}


def request_key(request_id: str) -> tuple[int, int, int]:
    """vLLM's internal id of a VLLMGenerator request ("grant-G/I-<random>", its n > 1 children
    "k_grant-G/I-<random>") as (grant id, prompt index, sample index)."""
    sample, _, parent = request_id.rpartition("_")
    grant, index = parent.rsplit("-", 1)[0].removeprefix("grant-").split("/")
    return int(grant), int(index), int(sample or 0)


class Versions:
    """Weight version v: version 0 (the tiny model, output layer scaled) plus v draws of Gaussian
    noise of std `perturbation` on every weight; built on demand and kept."""

    def __init__(self, base: dict, perturbation: float):
        self.states = [base]
        self.perturbation = perturbation

    def state(self, version: int) -> dict:
        import torch

        while len(self.states) <= version:
            g = torch.Generator().manual_seed(len(self.states))
            self.states.append({k: t + self.perturbation * torch.randn(t.shape, generator=g)
                                for k, t in self.states[-1].items()})
        return self.states[version]

    def update(self, version: int):
        import torch

        from learner.training.weight_sync import build_weight_update

        return build_weight_update(version, self.state(version).items(), dtype=torch.float32, bucket_bytes=64 << 20)


def make_grants(args, seed: int) -> list:
    from protocol.messages import PromptSpec, SamplingSpec, WorkGrant

    rng = np.random.default_rng(seed)
    grants = []
    for g in range(args.grants):
        sampling = SamplingSpec(temperature=1.0, top_p=1.0, top_k=-1, stop_token_ids=[], seed=seed,
                                max_new_tokens=int(rng.integers(args.min_new, args.max_new + 1)))
        prompt = PromptSpec(prompt_id=g, token_ids=rng.integers(3, 500, args.prompt_len).astype(np.int32), label=None)
        grants.append(WorkGrant(grant_id=g, step=0, min_weight_version=0, n_samples=args.samples,
                                sampling=sampling, prompts=[prompt]))
    return grants


def run_once(generator, probe: SchedulerProbe, versions: Versions, grants: list, every: int, concurrency: int,
             staging: str) -> RunStats:
    """Stream `grants` through the engine with a weight version published every `every` engine steps
    (0: never), applied as generator's mode allows; returns what was measured."""
    stats = RunStats()
    generator.apply_weights(versions.update(0), staging, 60)  # every run starts from version 0
    queue = collections.deque(grants)
    published = applied = 0
    published_step: dict[int, int] = {}
    next_update = versions.update(1) if every else None  # built outside the timed sections
    while queue or generator.busy:
        while queue and len(generator.generations) < concurrency and applied == published:
            generator.submit(queue.popleft())  # finish: new grants wait while an update does
        done, wall, cpu = timed(generator.step)
        stats.wall_s += wall
        stats.cpu_s += cpu
        stats.steps += 1
        computed, redone, redone_prompt = probe.take()
        stats.computed_tokens += computed
        if redone:
            stats.redone_tokens += redone
            stats.redone_prompt_tokens += redone_prompt
            stats.redone_cpu_s += cpu
        stats.batches += done
        if every and stats.steps % every == 0:
            published += 1
            published_step[published] = stats.steps
            stats.published_at.append((published, probe.output_counts()))
        while applied < published and generator.ready_for_weights:
            applied += 1
            stats.applied_at.append((applied, probe.output_counts()))
            _, wall, cpu = timed(generator.apply_weights, next_update, staging, 60)
            stats.wall_s += wall
            stats.cpu_s += cpu
            stats.apply_cpu_s += cpu
            stats.wait_steps.append(stats.steps - published_step[applied])
            next_update = versions.update(applied + 1)
    stats.updates = applied
    stats.tokens = sum(int(b.loss_mask.sum()) for b in stats.batches)
    return stats


def token_versions(length: int, start_version: int, marks: list[tuple[int, dict]], key) -> np.ndarray:
    """Per response token, the newest version among `marks` (version, output counts) taken while
    this request had produced no more than that token's index; `start_version` before any."""
    out = np.full(length, start_version, dtype=np.int64)
    for version, counts in marks:
        if key in counts:
            out[counts[key]:] = np.maximum(out[counts[key]:], version)
    return out


def quality(stats: RunStats, versions: Versions, model) -> dict[str, float]:
    """Mean and max |behaviour - learner| log-prob over the response tokens sampled after an update
    was published in their sequence's lifetime (every token when none was), against (a) the version
    that sampled each token and (b) the newest version published when it was sampled; and, as the
    scale of one version's change, the mean |learner(v) - learner(v - 1)| on those tokens sampled
    by a version v >= 1."""
    import torch

    from learner.models.actor import Actor

    actor = Actor(model).eval()
    rows = []  # one per sequence: tokens, response start, behaviour log-probs, per-token versions
    for b in stats.batches:
        for i in range(b.num_sequences):
            start, stop = int(b.cu_seqlens[i]), int(b.cu_seqlens[i + 1])
            response = start + int(b.prompt_lens[i])
            key = (b.grant_id, 0, int(b.sample_indices[i]))  # one prompt per grant
            first = int(b.weight_versions[i])
            sampled = token_versions(stop - response, first, stats.applied_at, key)
            newest = token_versions(stop - response, first, stats.published_at, key)
            after = newest > first if stats.published_at else np.ones(stop - response, bool)
            rows.append(dict(tokens=b.tokens[start:stop], response=response - start, after=after,
                             behaviour=b.behaviour_logprobs[response:stop], sampled=sampled, newest=newest,
                             previous=np.maximum(sampled - 1, 0)))
    learner = [{} for _ in rows]  # per sequence: version -> its response tokens' log-probs
    needed = collections.defaultdict(list)
    for r, row in enumerate(rows):
        for v in set(row["sampled"].tolist()) | set(row["newest"].tolist()) | set(row["previous"].tolist()):
            needed[v].append(r)
    for v, members in sorted(needed.items()):
        model.load_state_dict(versions.state(v))
        lens = [len(rows[r]["tokens"]) for r in members]
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
        tokens = torch.as_tensor(np.concatenate([rows[r]["tokens"] for r in members]), dtype=torch.long)
        with torch.no_grad():
            lp = actor(tokens, cu_seqlens=cu)["log_probs"].numpy()
        for r, begin in zip(members, cu[:-1].tolist()):
            learner[r][v] = lp[begin + rows[r]["response"]: begin + len(rows[r]["tokens"])]

    def scored(row, scores, name):  # each response token's learner log-prob under the version row[name] names
        return np.array([scores[v][t] for t, v in enumerate(row[name].tolist())])

    gaps = collections.defaultdict(list)
    for row, scores in zip(rows, learner):
        for name in ("sampled", "newest"):
            gaps[name].append(np.abs(row["behaviour"] - scored(row, scores, name))[row["after"]])
        shifted = row["after"] & (row["sampled"] >= 1)
        gaps["shift"].append(np.abs(scored(row, scores, "sampled") - scored(row, scores, "previous"))[shifted])
    out: dict[str, float] = {"tokens": int(sum(g.size for g in gaps["sampled"]))}
    for name, parts in gaps.items():
        values = np.concatenate(parts)
        out[f"{name}_mean"] = float(values.mean()) if values.size else float("nan")
        out[f"{name}_max"] = float(values.max()) if values.size else float("nan")
    return out


def build_model(out: Path, args):
    """The tiny BPE model with room for the responses and without EOS; returns (path, version-0 state)."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.tiny.model import MODEL_SIZES, build_tiny_model, remove_eos

    spec = replace(MODEL_SIZES["tiny"], max_position_embeddings=args.prompt_len + args.max_new)
    path = remove_eos(build_tiny_model(out, spec))
    state = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    state["lm_head.weight"] = state["lm_head.weight"] * args.head_scale
    return path, {k: t.clone() for k, t in state.items()}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=int, nargs="+", default=[512, 128, 32], help="Engine steps between updates.")
    p.add_argument("--repeats", type=int, default=3, help="Of the timing study; 0: only the log-prob gaps.")
    p.add_argument("--grants", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=4, help="Grants generated together.")
    p.add_argument("--samples", type=int, default=4, help="Samples per prompt (one prompt per grant).")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--min-new", type=int, default=1024)
    p.add_argument("--max-new", type=int, default=2048)
    p.add_argument("--head-scale", type=float, default=10.0)
    p.add_argument("--perturbations", type=float, nargs="+", default=[1e-3, 1e-4],
                   help="Std of the noise each version adds to every weight; the first one is used for the timing.")
    p.add_argument("--gap-every", type=int, default=128, help="K of the quality study.")
    p.add_argument("--out", default="runs/bench_inflight_update")
    args = p.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # an update logs four lines; the tables go to stdout

    import torch
    from transformers import AutoModelForCausalLM

    from protocol.config import RolloutConfig
    from rollout.engine import VLLMGenerator, configure_cpu_threads

    out = Path(args.out)
    model_path, base = build_model(out / "model", args)
    staging = str(out)
    cfgs = {mode: RolloutConfig(max_model_len=args.prompt_len + args.max_new, inflight_update=mode) for mode in MODES}
    configure_cpu_threads(cfgs["recompute"], 0)
    engines = {"recompute": VLLMGenerator(str(model_path), cfgs["recompute"], seed=0),
               "keep": VLLMGenerator(str(model_path), cfgs["keep"], seed=0)}
    engines["finish"] = engines["recompute"]  # the same engine: finish differs only in when it applies
    probes = {name: SchedulerProbe(engines[name]) for name in ("recompute", "keep")}
    probes["finish"] = probes["recompute"]

    def run(mode: str, every: int, versions: Versions, seed: int) -> RunStats:
        engines[mode].inflight_update = mode  # recompute and finish share an engine
        return run_once(engines[mode], probes[mode], versions, make_grants(args, seed), every, args.concurrency,
                        staging)

    if args.repeats:
        timing_study(run, base, args)
    gap_study(run, base, AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), args)
    for generator in (engines["recompute"], engines["keep"]):
        generator.close()


def timing_study(run, base: dict, args) -> None:
    """Every mode and K, and never on both engines, alternating within each repeat; prints the table."""
    plan = [("recompute", 0), ("keep", 0)] + [(m, k) for k in args.every for m in MODES]
    results = collections.defaultdict(list)  # (mode, K) -> [RunStats]
    ratios = collections.defaultdict(list)  # (mode, K) -> [CPU time / never's on the recompute engine, per repeat]
    step_ratios = collections.defaultdict(list)  # (mode, K) -> [engine steps / never's, per repeat]
    run(MODES[0], 0, Versions(base, args.perturbations[0]), seed=999)  # warm-up
    for repeat in range(args.repeats):
        for mode, every in (plan if repeat % 2 == 0 else plan[::-1]):
            stats = run(mode, every, Versions(base, args.perturbations[0]), seed=repeat)
            results[mode, every].append(stats)
            print(f"repeat {repeat} {mode:9s} K={every or 'never':5} {stats.tokens / stats.wall_s:7.0f} tok/s "
                  f"cpu {stats.cpu_s:.1f} s steps {stats.steps} computed {stats.computed_tokens} "
                  f"redone {stats.redone_tokens} updates {stats.updates}", file=sys.stderr, flush=True)
        never = results["recompute", 0][-1]
        for key in plan:
            ratios[key].append(results[key][-1].cpu_s / never.cpu_s)
            step_ratios[key].append(results[key][-1].steps / never.steps)

    print(f"\n{args.grants} grants x {args.samples} samples, prompt {args.prompt_len} tokens, "
          f"{args.min_new}-{args.max_new} new tokens, {args.concurrency} grants at a time; "
          f"perturbation {args.perturbations[0]:g}; medians of {args.repeats} repeats\n")
    print("| mode | update every K steps | updates | tokens/s | CPU time vs never | engine steps vs never | "
          "prefill tokens re-done per generated token | of which prompt | CPU time in re-doing steps | "
          "CPU time in apply_weights | steps an update waited |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, every in plan:
        runs = results[mode, every]
        redone = median([r.redone_tokens / r.tokens for r in runs])
        prompt_share = median([r.redone_prompt_tokens / r.redone_tokens for r in runs if r.redone_tokens])
        waits = [w for r in runs for w in r.wait_steps]
        print(f"| {mode}{' (prefix caching off)' if mode == 'keep' else ''} | {every or 'never'} | "
              f"{median([r.updates for r in runs]):.0f} | {median([r.tokens / r.wall_s for r in runs]):,.0f} | "
              f"{median(ratios[mode, every]):.2f}x ({', '.join(f'{x:.2f}' for x in ratios[mode, every])}) | "
              f"{median(step_ratios[mode, every]):.2f}x | "
              f"{redone:.2f} | {'-' if not redone else f'{prompt_share:.0%}'} | "
              f"{median([r.redone_cpu_s / r.cpu_s for r in runs]):.0%} | "
              f"{median([r.apply_cpu_s / r.cpu_s for r in runs]):.1%} | "
              f"{f'{statistics.mean(waits):.0f} (max {max(waits)})' if waits else '-'} |")


def gap_study(run, base: dict, model, args) -> None:
    """One run per mode at K = --gap-every (and never) per perturbation, scored by the learner's Actor."""
    print(f"\nLog-prob gap |behaviour - learner| on the tokens sampled after an update was published in their "
          f"sequence's lifetime, K = {args.gap_every} (one run each; never: every token)\n")
    print("| mode | perturbation | tokens | vs the version that sampled it: mean | max | "
          "vs the newest published version: mean | max | one version's change: mean |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for perturbation in args.perturbations:
        for mode, every in [("recompute", 0)] + [(m, args.gap_every) for m in MODES]:
            versions = Versions(base, perturbation)
            q = quality(run(mode, every, versions, seed=100), versions, model)
            print(f"| {mode if every else 'never'} | {perturbation:g} | {q['tokens']:,} | {q['sampled_mean']:.2e} | "
                  f"{q['sampled_max']:.2e} | {q['newest_mean']:.2e} | {q['newest_max']:.2e} | "
                  f"{q['shift_mean']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
