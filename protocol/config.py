"""The one typed run configuration, shared by the CLI, the YAML files and the launch scripts.

Every process of a run (learner ranks, rollout processes, replay) reads the same `RunConfig`,
so it lives in `protocol/`, the only code that rollout and learner share. Sources are applied in
order: defaults, then a YAML file, then `--section.key value` flags. Unknown keys and values of
the wrong type are errors that name the key and the file they came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import glob
import importlib.util
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import yaml

from .dtypes import FLOAT_DTYPES


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or inconsistent; the message says which."""


# Kinds of path-valued fields (the `path` of `opt`). A relative path is taken from the directory of
# the YAML file that gives it, or (launch scripts, `cwd` of `load_config`) from the directory the
# command was run from, so that it means the same in every process wherever that runs.
MODEL = "model"  # a Hugging Face model directory, or a Hub id (`org/name`), kept as it is
INPUT = "input"  # a file or directory that must exist
DATASET = "dataset"  # a data file, a glob of them or a directory; or a Hub dataset id (`name`, `org/name`), kept as it is
OUTPUT = "output"  # a directory that is written
FUNCTION = "function"  # `package.module:function`, or `path/to/file.py:function` whose file is a path


def opt(default: Any, help: str, choices: tuple[Any, ...] | None = None, path: str | None = None) -> Any:
    """A config field with its help text (and allowed values, and what kind of path it holds)."""
    meta = {"help": help, "choices": choices, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = opt("", "Hugging Face model directory of the actor (the initial policy), or a Hub id (org/name). "
                        "Empty: launch/local.sh prepares the built-in tiny model "
                        "(`python -m learner.tasks.arithmetic prepare`).", path=MODEL)
    dtype: str = opt("float32", "Learner parameter dtype.", ("float32", "bfloat16"))
    attn_implementation: str = opt("sdpa", "Attention kernel for the learner's forward passes; packed "
                                           "sequences use a block-diagonal mask with sdpa/eager and "
                                           "cu_seqlens with flash_attention_2.",
                                   ("sdpa", "eager", "flash_attention_2"))
    trust_remote_code: bool = opt(False, "Allow model code shipped with the checkpoint.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory (actor and critic; "
                                              "Transformers' non-reentrant checkpointing of each decoder layer): "
                                              "a training micro-batch keeps only each layer's input for backward, "
                                              "at the cost of one more forward. Same gradients.")
    logprobs_from_hidden: bool = opt(True, "Compute log-probs and entropies from the last hidden states through "
                                           "the output layer chunk by chunk, forward and backward, so the "
                                           "[tokens, vocab] logits never exist (one extra output-layer matmul in "
                                           "backward; same log-probs, as fast on the built-in models). Falls back "
                                           "to the logits, with a warning, when the output layer is not a plain "
                                           "Linear (LoRA on it, quantised, ZeRO-3) or the model scales/caps its "
                                           "logits.")
    lora_rank: int = opt(0, "LoRA rank; 0 trains all weights.")
    lora_alpha: int = opt(16, "LoRA alpha (scale = alpha / rank).")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_target_modules: list = opt(["q_proj", "k_proj", "v_proj", "o_proj"], "Module names LoRA adapts.")
    load_in_4bit: bool = opt(False, "Load the frozen base weights in 4-bit NF4 (CUDA + bitsandbytes only).")


@dataclass
class CriticConfig:
    path: str = opt("", "Critic initialisation (Hugging Face directory or Hub id). Empty: the actor's weights "
                        "with a fresh value head. Used only when the advantage estimator is 'gae'.", path=MODEL)
    value_head_prefix: str = opt("score", "Attribute name of the linear value head.")
    lr: float = opt(5e-4, "Critic learning rate (the peak of train.lr_schedule, which applies to it too).")
    value_clip: float = opt(0.2, "Clip range of the value loss around the old values; 0 disables.")


@dataclass
class DataConfig:
    path: list = opt([], "Prompt datasets, one or more (a YAML list, or comma-separated on the command line): each "
                         "a JSONL, JSON (a list of rows), Parquet or CSV file, a glob of such files ('data/*.jsonl'), "
                         "a directory of data files or of datasets' save_to_disk, or a Hugging Face Hub dataset id "
                         "(name or org/name; loaded by datasets.load_dataset and cached, offline too with "
                         "HF_HUB_OFFLINE=1). Empty: launch/local.sh uses the built-in arithmetic task's prompts.",
                      path=DATASET)
    split: list = opt(["train"], "Split of each data.path (one for all, or one per path) in datasets' syntax: 'test', "
                                 "'train[:1000]', 'train[1000:]+test'. A file or glob has one split, 'train'; a "
                                 "directory's splits come from its file names (train.jsonl, test.jsonl, ...).")
    subset: list = opt([], "Subset (configuration name, e.g. 'main' of openai/gsm8k) of each Hub dataset or "
                           "dataset directory in data.path: one for all, or one per path ('' for none); empty: none.")
    weights: list = opt([], "Mix the data.path datasets: one weight > 0 per path; each prompt is drawn from dataset i "
                            "with probability weights[i] / sum(weights) (deterministic from train.seed), and each "
                            "dataset goes through its own shuffled epochs (every prompt once per epoch of its "
                            "dataset). Empty: the datasets are concatenated into one.")
    input_key: str = opt("prompt", "Field holding the prompt (a string or a list of chat messages).")
    label_key: str = opt("label", "Field holding the label passed to the reward functions (optional).")
    max_prompt_len: int = opt(0, "Prompts longer than this many tokens, or than the engine takes (rollout."
                                 "max_model_len - 1), are dropped; the learner reports how many at start. 0: the "
                                 "room rollout.max_model_len leaves after rollout.max_new_tokens.")
    apply_chat_template: str = opt("auto", "Wrap prompts in the tokenizer's chat template.",
                                   ("auto", "yes", "no"))
    shuffle: bool = opt(True, "Shuffle prompts each epoch (deterministically, from train.seed).")


@dataclass
class RewardConfig:
    function: list = opt([], "Reward functions, each `package.module:function` or `path/file.py:function`: a YAML "
                             "list, or comma-separated on the command line (one may be a plain string). Each is "
                             "called batched as fn(prompts, completions, labels, **columns) -> list of floats, with "
                             "the dataset's other columns it names (all of them if it takes **kwargs) as keyword "
                             "arguments, one entry per completion; `async def` ones are awaited, all of a batch's "
                             "concurrently. Empty: none. A run needs a function, reward.url or reward.model_path "
                             "(configs/tiny.yaml sets the arithmetic task's).",
                        path=FUNCTION)
    function_weights: list = opt([], "Weight of each reward function's score in the total reward, in the order of "
                                     "reward.function; empty: 1 each.")
    url: str = opt("", "HTTP reward server: each batch is POSTed as JSON {prompts, completions, labels, <column>: "
                       "[...]} (every other dataset column) and answered with {\"rewards\": [one number per "
                       "completion]}; scored as the reward function `url`. Empty: none.")
    url_weight: float = opt(1.0, "Weight of the reward server's score in the total reward.")
    timeout_s: float = opt(60.0, "Seconds one request to reward.url may take.")
    retries: int = opt(2, "Times a failed request to reward.url (no connection, a timeout, status 429 or 5xx) is "
                          "retried, after 1, 2, 4, ... seconds.")
    model_path: str = opt("", "Reward model directory or Hub id (a value-head model, see "
                              "learner.models.value_model), scored in the learner at the last token of each "
                              "sequence; empty: none.", path=MODEL)
    model_weight: float = opt(1.0, "Weight of the reward model's score in the total reward.")
    value_head_prefix: str = opt("score", "Attribute name of the reward model's value head.")
    clip: float = opt(0.0, "Clip the total reward (overlong penalty included) to [-clip, clip]; 0 disables.")
    overlong_buffer: int = opt(0, "DAPO's soft overlong punishment: a response longer than rollout.max_new_tokens "
                                  "minus this many tokens gets a penalty growing linearly to overlong_penalty at "
                                  "max_new_tokens, added to its reward; 0: off.")
    overlong_penalty: float = opt(1.0, "Largest overlong penalty (a response of max_new_tokens tokens gets "
                                       "-overlong_penalty).")


@dataclass
class RolloutConfig:
    num_processes: int = opt(1, "Rollout processes that launch scripts start (each runs one vLLM engine; one engine "
                                "batches any number of grants, so add processes for more cores or accelerators).")
    n_samples_per_prompt: int = opt(8, "Completions sampled per prompt (the group for GRPO-style advantages).")
    prompts_per_grant: int = opt(8, "Prompts in one unit of work handed to a rollout process.")
    temperature: float = opt(1.0, "Sampling temperature; the learner scales its logits by the same value.")
    top_p: float = opt(1.0, "Nucleus sampling; below 1 the behaviour log-probs are those of the "
                            "truncated distribution (corrected by importance sampling).")
    top_k: int = opt(-1, "Top-k sampling; -1 disables.")
    max_new_tokens: int = opt(1024, "Maximum response length in tokens.")
    min_new_tokens: int = opt(0, "Minimum response length in tokens: EOS, the stop tokens and stop strings cannot end "
                                 "a response before it has this many (vLLM's min_tokens), e.g. min = max for long fixed-length "
                                 "responses in load tests and benchmarks. The learner's log-probs do not know the "
                                 "suppression (importance sampling sees the difference); 0: off.")
    stop_token_ids: list = opt([], "Extra token ids that end a response (EOS always does).")
    stop_strings: list = opt([], "Strings that end a response when its text contains one. The response keeps every "
                                 "token up to the one that completes the stop string, and is trained on them (as on "
                                 "an EOS token); reward functions see it with the stop string.")
    engine_dtype: str = opt("float32", "vLLM engine dtype.", FLOAT_DTYPES)
    tensor_parallel_size: int = opt(1, "vLLM tensor parallelism per rollout process.")
    engine_process: bool = opt(False, "Run vLLM's engine core in a process of its own, as vLLM does by default "
                                      "(always so with tensor_parallel_size > 1). Off: with one worker the engine "
                                      "runs inside the rollout process, which saves a core that vLLM's "
                                      "shared-memory queue would keep spinning.")
    gpu_memory_utilization: float = opt(0.5, "vLLM GPU memory fraction (GPU machines).")
    kv_cache_space_gib: int = opt(1, "vLLM KV cache size on the CPU backend (VLLM_CPU_KVCACHE_SPACE).")
    max_model_len: int = opt(2048, "vLLM maximum sequence length (prompt + response); at most the model's "
                                   "context length.")
    enforce_eager: bool = opt(True, "Disable CUDA graphs / torch.compile in vLLM (faster start-up).")
    omp_threads: int = opt(1, "CPU threads per rollout engine on the CPU backend when its cores are not chosen for "
                              "it (launch/rollouts.sh: rollout i takes omp_threads cores from i * omp_threads on).")
    cpu_cores: str = opt("", "CPU machines, launch/local.sh: the cores the rollout processes share, split evenly among "
                             "them (a list such as '4-7'); empty: the second half of the cores, or one core each "
                             "from the last down when there are more rollouts.")
    seed: int = opt(0, "Sampling seed of the run: every sample of every prompt, grant and rollout draws from "
                       "its own seed derived from it (reproducible; no two samples share one).")
    max_restarts: int = opt(3, "Times launch scripts restart a rollout process that died, per process, before "
                               "failing the run. The learner re-issues a dead rollout's unanswered work.")
    inflight_update: str = opt("recompute", "What a weight update does to the requests running when it lands (README: "
                                            "In-flight updates): recompute (their KV cache is dropped and their "
                                            "prompt and tokens so far re-done with the new weights), keep (they go "
                                            "on with the new weights over the KV cache computed under the old ones: "
                                            "nothing re-done, but later tokens come from a mix of versions; prefix "
                                            "caching is off) or finish (they end under the old weights; the update "
                                            "and new grants wait until none runs, so keep "
                                            "transport.weight_ack_timeout_s above the longest generation).",
                               ("recompute", "keep", "finish"))
    on_learner_lost: str = opt("exit", "What a rollout does when the learner has been silent for "
                                       "transport.peer_timeout_s: exit (with an error), or wait for a learner to "
                                       "come back on the same address (a --train.resume restart), keeping its "
                                       "engine loaded and saying hello again every peer_timeout_s.",
                               ("exit", "wait"))


# Names the algorithm options choose from. learner/algo dispatches on them and imports them from
# here (the learner may import the protocol, not the other way round): one list for both.
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATION_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
IS_LEVELS = ("token", "sequence", "sequence_geometric")  # truncated importance sampling (tis_level, besides "off")
IS_MODES = ("clamp", "mask")
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class AlgoConfig:
    advantage_estimator: str = opt("grpo", "How advantages are computed.",
                                   ADVANTAGE_ESTIMATORS)
    gamma: float = opt(1.0, "Discount factor of gae, reinforce_pp and reinforce_pp_baseline; grpo, dr_grpo and "
                            "rloo take no discount (it must stay 1 with them).")
    lam: float = opt(0.95, "GAE lambda.")
    kl_coef: float = opt(0.0, "KL penalty coefficient against the frozen reference policy; 0 skips the reference model.")
    kl_estimator: str = opt("k3", "KL estimator.", KL_ESTIMATORS)
    kl_clamp: float = opt(10.0, "Every per-token KL estimate to the reference is clamped to [-kl_clamp, kl_clamp], "
                                "in the reward and in the loss (OpenRLHF's 10); must be > 0.")
    kl_mode: str = opt("loss", "Apply KL as a loss term or shape it into the token rewards.", ("loss", "reward"))
    kl_target: float = opt(0.0, "Adaptive KL controller target; 0 keeps kl_coef fixed.")
    kl_horizon: int = opt(10000, "Adaptive KL controller horizon (samples).")
    policy_loss: str = opt("ppo", "Policy loss: ppo (a ratio and clip per token) or gspo (Zheng et al. 2025: one "
                                  "ratio per sequence, the geometric mean of its token ratios, clipped per sequence; "
                                  "needs loss_aggregation seq_mean_token_mean, and its clip range is a few 1e-4, "
                                  "the paper's clip_low 3e-4 and clip_high 4e-4).", ("ppo", "gspo"))
    clip_low: float = opt(0.2, "PPO ratio clip below 1.")
    clip_high: float = opt(0.2, "PPO ratio clip above 1 (raise it for clip-higher).")
    dual_clip: float = opt(0.0, "Dual-clip constant c > 1 for negative advantages; 0 disables.")
    loss_aggregation: str = opt("token_mean", "How per-token losses are reduced.",
                                AGGREGATION_MODES)
    tis_level: str = opt("token", "Truncated importance sampling between behaviour (vLLM) and learner log-probs: "
                                  "per token, per sequence (the product of its token ratios), or sequence_geometric "
                                  "(drop sequences whose geometric mean ratio is outside [tis_floor, tis_cap]; kept "
                                  "tokens are weighted by their own ratio, as OpenRLHF 0.11; needs tis_mode mask).",
                         ("off", *IS_LEVELS))
    tis_mode: str = opt("clamp", "Weights outside [tis_floor, tis_cap] are clamped into it, or masked to 0.",
                        IS_MODES)
    tis_cap: float = opt(2.0, "Upper bound of the importance weights.")
    tis_floor: float = opt(0.0, "Lower bound of the importance weights; 0: none (OpenRLHF's band is [0.5, 5]).")
    entropy_coef: float = opt(0.0, "Entropy bonus coefficient.")
    dynamic_sampling: bool = opt(False, "DAPO's dynamic sampling (Yu et al. 2025): a prompt group whose rewards are "
                                        "all equal has all-zero advantages under group normalisation and is dropped; "
                                        "each step is handed out more prompts (train.prompts_per_step over the share "
                                        "of informative groups of the last steps, and more while its answers hold too "
                                        "few) so that it trains train.prompts_per_step groups, the first informative "
                                        "ones in grant order. Needs a group estimator (grpo, dr_grpo, rloo).")
    dynamic_sampling_max_prompts: float = opt(3.0, "With dynamic_sampling, the most prompts generated for one step, "
                                                   "as a multiple of train.prompts_per_step (DAPO's "
                                                   "max_num_gen_batches); a step still short of informative groups "
                                                   "then trains uninformative ones in their place (they add no "
                                                   "policy gradient).")


@dataclass
class TrainConfig:
    num_steps: int = opt(40, "Optimizer steps (policy versions) to train.")
    prompts_per_step: int = opt(16, "Prompts consumed per step (times n_samples_per_prompt samples).")
    micro_batch_tokens: int = opt(4096, "Token budget of one packed micro-batch in the learner's forward.")
    ppo_epochs: int = opt(1, "Passes over each step's samples.")
    mask_truncated: bool = opt(False, "Leave completions cut off at rollout.max_new_tokens (finish reason 'length') "
                                      "out of every loss and its normaliser (DAPO's overlong filtering); they still "
                                      "count in their group's advantage baseline.")
    lr: float = opt(1e-4, "Actor learning rate (the peak of lr_schedule).")
    lr_schedule: str = opt("constant", "Learning rate of actor and critic per step, after the warm-up: constant, or "
                                       "decaying linearly or along a half cosine to min_lr_ratio x lr at num_steps.",
                           LR_SCHEDULES)
    lr_warmup_steps: int = opt(0, "Steps of linear warm-up (step s < W trains at (s + 1) / W x lr); 0: none. "
                                  "Set this or lr_warmup_ratio, not both.")
    lr_warmup_ratio: float = opt(0.0, "Warm-up as a fraction of num_steps (rounded up to whole steps); 0: none.")
    min_lr_ratio: float = opt(0.0, "Where a linear or cosine lr_schedule ends, as a fraction of the peak "
                                   "learning rate (OpenRLHF's cosine_with_min_lr uses 0.1).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    grad_clip: float = opt(1.0, "Gradient norm clip.")
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage.", (0, 1, 2, 3))
    zero3_persistence_threshold: int = opt(100000, "ZeRO-3: parameters with fewer elements stay whole on every "
                                                   "rank instead of being partitioned and gathered for each "
                                                   "use (DeepSpeed stage3_param_persistence_threshold).")
    learner_ranks: int = opt(1, "Data-parallel learner ranks the launch scripts start (torchrun); each step's "
                                "prompt groups are split across them by token count.")
    max_staleness: int = opt(1, "Most weight versions between the policy that sampled a batch and the "
                                "one it trains; 0 is fully synchronous on-policy PPO.")
    seed: int = opt(0, "Seed for data order, sampling and initialisation.")
    save_every: int = opt(0, "Save a resumable checkpoint every this many steps (and at the end); 0: never.")
    keep_checkpoints: int = opt(2, "Complete checkpoints kept under <output.dir>/checkpoints.")
    resume: bool = opt(False, "Resume from the newest complete checkpoint in <output.dir>/checkpoints.")
    torch_threads: int = opt(1, "Torch intra-op threads per learner rank on the CPU (launch/local.sh sets it to "
                                "the learner's cores per rank unless given as a flag).")
    cpu_cores: str = opt("", "CPU machines, launch/local.sh: the cores the learner runs on (a list such as '0-3'); "
                             "empty: every core, shared with the rollouts' cores through passive OpenMP waits "
                             "(protocol.placement).")

    @property
    def warmup_steps(self) -> int:
        """Warm-up length in steps: lr_warmup_steps, or lr_warmup_ratio of num_steps rounded up."""
        return self.lr_warmup_steps or math.ceil(self.lr_warmup_ratio * self.num_steps)


@dataclass
class TransportConfig:
    bind_host: str = opt("127.0.0.1", "Address the learner binds (loopback by default).")
    learner_host: str = opt("127.0.0.1", "Address rollouts connect to.")
    port: int = opt(0, "Learner port; 0 picks a free one (launch scripts pass it on).")
    weight_bucket_mb: int = opt(64, "Weights are published in buckets of this many MiB.")
    weight_dir: str = opt("/dev/shm", "Where a rollout whose engine workers are other processes "
                                      "(rollout.engine_process, tensor_parallel_size > 1) hands them received "
                                      "tensors, one or two small files at a time.", path=OUTPUT)
    weight_relay_fanout: int = opt(2, "How weight versions reach the rollouts. 0: the learner sends each "
                                      "rollout the whole update (rank 0 sends one copy per rollout). N >= 1: "
                                      "streamed bucket by bucket to one rollout, and each rollout forwards every "
                                      "bucket to at most N others as soon as it has it (a tree; 1: a chain), "
                                      "loading it meanwhile: rank 0 sends one copy per update whatever the "
                                      "number of rollouts. Rollouts that connect later, or that a dropped relay "
                                      "node cut off, get the version straight from the learner. Used with "
                                      "weight_transfer zmq only (nccl broadcasts from rank 0).")
    relay_host: str = opt("", "Address each rollout binds its weight relay socket to (a random port) and "
                              "announces to the learner; the others must reach it. Empty: the address of the "
                              "interface this rollout reaches learner_host through. Off loopback it needs "
                              "CURVE like the learner's socket (curve_dir; the relay then admits only the "
                              "keys in curve_dir).")
    weight_transfer: str = opt("zmq", "How weight bytes reach the engines. zmq: over ZeroMQ (weight_relay_fanout "
                                      "says how). nccl (GPUs on both sides; README: NCCL weight transfer): learner "
                                      "rank 0 and every engine worker of the rollout.num_processes rollouts form one "
                                      "NCCL group at start-up, each version's header (tensor layout, fingerprint) "
                                      "goes over ZeroMQ and its buckets are broadcast from rank 0's GPU straight "
                                      "into the workers' GPU memory. The group is fixed: a rollout that leaves or "
                                      "joins later stops the run (restart it with train.resume).",
                               ("zmq", "nccl"))
    weight_ack_timeout_s: float = opt(120.0, "Seconds each rollout has to apply a weight version; one that takes "
                                             "longer is dropped and told to rejoin (see progress_timeout_s).")
    batch_timeout_s: float = opt(600.0, "Seconds the learner waits for a step's samples before failing.")
    min_rollouts: int = opt(1, "Rollouts that must have said hello before the learner hands out work, so that the "
                               "first steps are shared by all of them (waited for up to batch_timeout_s; "
                               "launch/local.sh raises the default 1 to rollout.num_processes).")
    heartbeat_s: float = opt(5.0, "Rollout heartbeat interval.")
    peer_timeout_s: float = opt(60.0, "A rollout silent for this long is presumed dead: dropped, and its "
                                      "unanswered work re-issued to the others.")
    progress_timeout_s: float = opt(300.0, "A rollout that holds work it could generate but has sent no batch and "
                                           "applied no weights for this long is dropped like a dead peer (its "
                                           "heartbeats alone prove nothing: a hung engine's process still sends "
                                           "them): its work goes to the others and it is told to rejoin. Also "
                                           "applies weight_ack_timeout_s to each weight version. Keep it above "
                                           "the longest time one grant takes to generate.")
    straggler_timeout_s: float = opt(0.0, "Hand a grant held this long by one rollout to an idle rollout as well; "
                                          "the first answer is trained on, the later one discarded (counted). "
                                          "0: off.")
    min_live_rollouts: int = opt(0, "Stop the run when fewer rollouts than this stay connected for longer than "
                                    "peer_timeout_s (a dropped or restarted rollout rejoins within that). 0: "
                                    "never; the learner then waits up to batch_timeout_s for work.")
    max_message_mb: int = opt(256, "Largest accepted message (bigger ones are rejected unread).")
    receive_queue: int = opt(64, "Messages ZeroMQ queues per rollout before it holds the sender back (high-water "
                                 "mark); with max_message_mb it bounds what a flood can make the learner hold.")
    curve_dir: str = opt("", "Directory of ZeroMQ CURVE key files; empty: CURVE off (plain TCP). The learner "
                             "uses learner.key_secret and admits only the clients whose public *.key files are "
                             "in it; rollout N uses learner.key and rollout-N.key_secret. Create them with "
                             "`python -m protocol.keys generate DIR --name learner --name rollout-0 ...`.",
                         path=INPUT)
    curve_required_off_loopback: bool = opt(True, "Refuse to start when bind_host or learner_host is not a "
                                                   "loopback address and curve_dir is empty (unauthenticated "
                                                   "plain TCP on a network).")


@dataclass
class OutputConfig:
    dir: str = opt("runs/default", "Run directory: metrics.jsonl, logs and the final model (the default is "
                                   "relative to the repository, where the launch scripts run).", path=OUTPUT)
    save_final: bool = opt(True, "Save the trained actor as a Hugging Face directory at the end.")
    progress: bool = opt(True, "Show a progress bar.")
    record: bool = opt(False, "Record every accepted wire message and every optimizer step under "
                              "<dir>/recording, for replay-from-disk (python -m learner --replay.path).")
    jsonl_stdout: bool = opt(False, "Also print each step's metrics as one JSON line on stdout (for log "
                                    "collectors; non-finite values are written as null).")
    tensorboard: bool = opt(False, "Write every step's scalar metrics to <dir>/tensorboard for TensorBoard "
                                   "(needs `pip install tensorboard`).")
    wandb_project: str = opt("", "Log every step's metrics and the run config to this Weights & Biases project "
                                 "(needs `pip install wandb` and a login); empty: off.")
    plot: bool = opt(True, "At the end, draw reward, KL and throughput per step into <dir>/training.png.")
    log_samples_every: int = opt(10, "Every this many steps (from step 0), append some prompts with their "
                                     "completions, rewards and advantages to <dir>/samples.jsonl (and a table to "
                                     "Weights & Biases when it is on); 0: never.")
    log_samples: int = opt(4, "Prompts whose completions (every sample of each) are logged, the step's first ones.")


@dataclass
class ReplayConfig:
    path: str = opt("", "Replay a recording (<run dir>/recording of a run with output.record) instead of "
                        "receiving from rollouts; the recorded run's config is the default for every key.",
                    path=INPUT)
    stop_after_step: int = opt(-1, "Stop after this step and dump its batch and metrics to "
                                   "<output.dir>/replay_step_<k>.json; -1 replays every recorded step.")
    verify: bool = opt(True, "Fail at the first step whose loss or weights differ from the recording.")


@dataclass
class EvalConfig:
    path: str = opt("", "Held-out prompt dataset, one of the sources data.path takes (a file, glob, directory or Hub "
                        "dataset id; read with data.input_key, label_key and apply_chat_template): the rollouts "
                        "generate it with the settings below at the initial weights, every every_steps steps and "
                        "at the final weights, scored by the run's reward (without the overlong penalty) and "
                        "never trained on; metrics eval/* in the row of the step a round completes in (the "
                        "final one in a row of its own, step train.num_steps). Skipped in replay. Empty: off.",
                    path=DATASET)
    split: str = opt("train", "Split of eval.path in datasets' syntax ('test', 'train[:500]'); a file or glob has "
                              "one split, 'train'.")
    subset: str = opt("", "Subset (configuration name) of a Hub dataset or dataset directory in eval.path; empty: none.")
    every_steps: int = opt(10, "Evaluate weight versions 0, every_steps, 2 x every_steps, ... and the final one; "
                               "0: only the initial and final weights. A round due while the previous one is "
                               "still out is skipped (with a warning).")
    n_samples: int = opt(1, "Completions per held-out prompt (pass@k needs k of them).")
    temperature: float = opt(0.0, "Sampling temperature of the evaluation; 0 is greedy (then n_samples must be 1).")
    top_p: float = opt(1.0, "Nucleus sampling of the evaluation.")
    max_new_tokens: int = opt(0, "Longest evaluation response; 0: rollout.max_new_tokens.")
    pass_k: list = opt([1], "The k of each eval/pass@k metric: the unbiased estimate (Chen et al. 2021) of the "
                            "chance that at least one of k samples of a prompt passes; each k <= n_samples.")
    pass_threshold: float = opt(1.0, "A sample passes when its reward is at least this.")


@dataclass
class RunConfig:
    run_id: str = opt("", "Identifier stamped on every message; empty: generated at start.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Actor model."})
    critic: CriticConfig = field(default_factory=CriticConfig, metadata={"help": "Critic model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Prompt data."})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"help": "Reward."})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "Generation."})
    algo: AlgoConfig = field(default_factory=AlgoConfig, metadata={"help": "RL algorithm."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation."})
    transport: TransportConfig = field(default_factory=TransportConfig, metadata={"help": "Networking."})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "Outputs."})
    replay: ReplayConfig = field(default_factory=ReplayConfig, metadata={"help": "Replay from disk."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Held-out evaluation during training."})

    def validate(self) -> RunConfig:
        """Cross-field checks that no single field's type can express."""
        _check_choices(self, "")
        positive = {"train.num_steps": self.train.num_steps, "train.prompts_per_step": self.train.prompts_per_step,
                    "rollout.n_samples_per_prompt": self.rollout.n_samples_per_prompt,
                    "rollout.prompts_per_grant": self.rollout.prompts_per_grant,
                    "rollout.max_new_tokens": self.rollout.max_new_tokens,
                    "rollout.num_processes": self.rollout.num_processes,
                    "train.micro_batch_tokens": self.train.micro_batch_tokens,
                    "train.ppo_epochs": self.train.ppo_epochs, "train.learner_ranks": self.train.learner_ranks}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if not (math.isfinite(self.rollout.temperature) and self.rollout.temperature > 0):
            raise ConfigError(f"rollout.temperature must be a finite number > 0, got {self.rollout.temperature}")
        if self.rollout.top_k < -1 or self.rollout.top_k == 0:
            raise ConfigError(f"rollout.top_k must be -1 (off) or >= 1, got {self.rollout.top_k}")
        bad = [t for t in self.rollout.stop_token_ids if isinstance(t, bool) or not isinstance(t, int) or t < 0]
        if bad:
            raise ConfigError(f"rollout.stop_token_ids must be non-negative integer token ids, got {bad}")
        if not all(isinstance(text, str) and text for text in self.rollout.stop_strings):
            raise ConfigError(f"rollout.stop_strings must be non-empty strings, got {self.rollout.stop_strings}")
        if not 0 <= self.rollout.min_new_tokens <= self.rollout.max_new_tokens:
            raise ConfigError(f"rollout.min_new_tokens ({self.rollout.min_new_tokens}) must be between 0 and "
                              f"rollout.max_new_tokens ({self.rollout.max_new_tokens})")
        if not 0 < self.rollout.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.rollout.top_p}")
        if self.output.log_samples_every < 0 or self.output.log_samples < 1:
            raise ConfigError(f"output.log_samples_every must be >= 0 (0: off) and output.log_samples >= 1, got "
                              f"{self.output.log_samples_every} and {self.output.log_samples}")
        if self.transport.min_rollouts < 1:
            raise ConfigError(f"transport.min_rollouts must be >= 1, got {self.transport.min_rollouts}")
        t = self.transport
        if t.progress_timeout_s <= 0:
            raise ConfigError(f"transport.progress_timeout_s must be > 0, got {t.progress_timeout_s}")
        if t.weight_relay_fanout < 0:
            raise ConfigError(f"transport.weight_relay_fanout must be >= 0 (0: unicast), got {t.weight_relay_fanout}")
        if t.relay_host and not t.weight_relay_fanout:
            raise ConfigError(f"transport.relay_host {t.relay_host!r} is set but transport.weight_relay_fanout is 0 "
                              f"(no relay): drop relay_host or set a fanout")
        self._validate_weight_transfer()
        for key, value in (("min_live_rollouts", t.min_live_rollouts), ("straggler_timeout_s", t.straggler_timeout_s)):
            if value < 0:
                raise ConfigError(f"transport.{key} must be >= 0 (0: off), got {value}")
        if self.train.max_staleness < 0:
            raise ConfigError(f"train.max_staleness must be >= 0, got {self.train.max_staleness}")
        if self.train.prompts_per_step % self.rollout.prompts_per_grant:
            raise ConfigError(f"train.prompts_per_step ({self.train.prompts_per_step}) must be a multiple of "
                              f"rollout.prompts_per_grant ({self.rollout.prompts_per_grant})")
        if self.algo.gamma != 1 and self.algo.advantage_estimator in ("grpo", "dr_grpo", "rloo"):
            raise ConfigError(f"algo.gamma {self.algo.gamma} is not used by algo.advantage_estimator "
                              f"'{self.algo.advantage_estimator}' (the group estimators take no discount): "
                              f"leave algo.gamma at 1, or choose gae, reinforce_pp or reinforce_pp_baseline")
        if not self.algo.kl_clamp > 0:
            raise ConfigError(f"algo.kl_clamp must be > 0 (per-token KL estimates are clamped to "
                              f"[-kl_clamp, kl_clamp]), got {self.algo.kl_clamp}")
        self._validate_lr_schedule()
        self._validate_importance_sampling()
        self._validate_policy_loss()
        self._validate_overlong_penalty()
        self._validate_reward_sources()
        self._validate_data_sources()
        self._validate_eval()
        self._validate_dynamic_sampling()
        if self.algo.dual_clip and self.algo.dual_clip <= 1:
            raise ConfigError(f"algo.dual_clip must be > 1 (or 0 to disable), got {self.algo.dual_clip}")
        self._check_prompt_room()
        return self

    def _validate_weight_transfer(self) -> None:
        """NCCL needs a group whose members never change; the options that
        assume rollouts come and go, or that move weight bytes another way, make no sense with it."""
        t = self.transport
        if t.weight_transfer != "nccl":
            return
        conflicts = {
            "transport.relay_host": (bool(t.relay_host), repr(t.relay_host),
                                     "rank 0 broadcasts every version to every engine worker itself, no rollout "
                                     "relays; drop it"),
            "transport.min_live_rollouts": (t.min_live_rollouts != 0, t.min_live_rollouts,
                                            "the NCCL group cannot lose a rollout (any loss stops the run); "
                                            "set it to 0"),
            "rollout.on_learner_lost": (self.rollout.on_learner_lost == "wait", self.rollout.on_learner_lost,
                                        "a restarted learner forms a new group that waiting rollouts cannot "
                                        "join; use exit"),
            "rollout.inflight_update": (self.rollout.inflight_update == "finish", self.rollout.inflight_update,
                                        "a broadcast waits for every rollout, so one draining its requests "
                                        "would hold the learner's GPU; use recompute or keep"),
        }
        for key, (conflict, value, why) in conflicts.items():
            if conflict:
                raise ConfigError(f"transport.weight_transfer nccl does not go with {key} {value}: {why}")

    def nccl_world_size(self) -> int:
        """Members of the NCCL weight group: learner rank 0 and every engine worker of every rollout."""
        return 1 + self.rollout.num_processes * self.rollout.tensor_parallel_size

    def nccl_first_rank(self, rollout_index: int) -> int:
        """The NCCL rank of rollout `rollout_index`'s first engine worker (its others follow)."""
        return 1 + rollout_index * self.rollout.tensor_parallel_size

    def _validate_lr_schedule(self) -> None:
        t = self.train
        if t.lr_warmup_steps < 0:
            raise ConfigError(f"train.lr_warmup_steps must be >= 0, got {t.lr_warmup_steps}")
        if not 0 <= t.lr_warmup_ratio <= 1:
            raise ConfigError(f"train.lr_warmup_ratio must be in [0, 1], got {t.lr_warmup_ratio}")
        if t.lr_warmup_steps and t.lr_warmup_ratio:
            raise ConfigError(f"train.lr_warmup_steps ({t.lr_warmup_steps}) and train.lr_warmup_ratio "
                              f"({t.lr_warmup_ratio}) both set the warm-up: set only one")
        if t.lr_warmup_steps > t.num_steps:
            raise ConfigError(f"train.lr_warmup_steps ({t.lr_warmup_steps}) is longer than train.num_steps "
                              f"({t.num_steps}): the learning rate would never reach train.lr")
        if not 0 <= t.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
        if t.min_lr_ratio and t.lr_schedule == "constant":
            raise ConfigError(f"train.min_lr_ratio ({t.min_lr_ratio}) is where a decaying schedule ends, but "
                              f"train.lr_schedule is 'constant': choose linear or cosine, or leave min_lr_ratio at 0")

    def _validate_reward_sources(self) -> None:
        r = self.reward
        for i, spec in enumerate(r.function):
            if not isinstance(spec, str) or not spec:
                raise ConfigError(f"reward.function entry {i + 1} must be a 'module:function' string, got {spec!r}")
        weights_ok = all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                         for w in r.function_weights)
        if not weights_ok:
            raise ConfigError(f"reward.function_weights must be finite numbers, got {r.function_weights}")
        if r.function_weights and len(r.function_weights) != len(r.function):
            raise ConfigError(f"reward.function_weights has {len(r.function_weights)} weight(s) but reward.function "
                              f"names {len(r.function)} function(s): give one weight per function (or none: 1 each)")
        if r.url and not r.url.startswith(("http://", "https://")):
            raise ConfigError(f"reward.url must be an http:// or https:// URL, got {r.url!r}")
        if not (math.isfinite(r.timeout_s) and r.timeout_s > 0) or r.retries < 0:
            raise ConfigError(f"reward.timeout_s must be > 0 and reward.retries >= 0, got {r.timeout_s} and "
                              f"{r.retries}")

    def _validate_data_sources(self) -> None:
        d = self.data
        for key, values in (("path", d.path), ("split", d.split)):
            if not all(isinstance(v, str) and v for v in values):
                raise ConfigError(f"data.{key} entries must be non-empty strings, got {values}")
        if not d.split:
            raise ConfigError("data.split needs a split ('train' for a file)")
        if not all(v is None or isinstance(v, str) for v in d.subset):
            raise ConfigError(f"data.subset entries must be strings ('' for none), got {d.subset}")
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                   for w in d.weights):
            raise ConfigError(f"data.weights must be finite numbers > 0, got {d.weights}")
        if not d.path:
            return  # (launch/local.sh fills it in; checked again then)
        counts = (("split", d.split, (1,), "one split for all, or one per dataset"),
                  ("subset", d.subset, (0, 1), "none, one for all, or one per dataset"),
                  ("weights", d.weights, (0,), "one weight per dataset, or none (concatenated)"))
        for key, values, allowed, what in counts:
            if len(values) not in (*allowed, len(d.path)):
                raise ConfigError(f"data.{key} has {len(values)} entries but data.path names {len(d.path)} "
                                  f"dataset(s): give {what}")

    def _validate_overlong_penalty(self) -> None:
        r = self.reward
        if not 0 <= r.overlong_buffer <= self.rollout.max_new_tokens:
            raise ConfigError(f"reward.overlong_buffer ({r.overlong_buffer}) must be between 0 and "
                              f"rollout.max_new_tokens ({self.rollout.max_new_tokens}): the penalty starts that many "
                              f"tokens before the longest response")
        if not (math.isfinite(r.overlong_penalty) and r.overlong_penalty >= 0):
            raise ConfigError(f"reward.overlong_penalty must be a finite number >= 0, got {r.overlong_penalty}")

    def _validate_policy_loss(self) -> None:
        a = self.algo
        if a.policy_loss == "gspo" and a.loss_aggregation != "seq_mean_token_mean":
            raise ConfigError(f"algo.policy_loss 'gspo' averages each sequence's tokens and then the sequences: "
                              f"set algo.loss_aggregation seq_mean_token_mean (got '{a.loss_aggregation}')")

    def _validate_importance_sampling(self) -> None:
        a = self.algo
        if not 0 <= a.tis_floor < a.tis_cap:
            raise ConfigError(f"algo.tis_floor ({a.tis_floor}) and algo.tis_cap ({a.tis_cap}) must satisfy "
                              f"0 <= tis_floor < tis_cap")
        if a.tis_floor and a.tis_level == "off":
            raise ConfigError(f"algo.tis_floor ({a.tis_floor}) bounds importance weights, but algo.tis_level is "
                              f"'off': choose a tis_level or leave tis_floor at 0")
        if a.tis_level == "sequence_geometric" and a.tis_mode != "mask":
            raise ConfigError(f"algo.tis_level 'sequence_geometric' drops whole sequences, it has nothing to clamp: "
                              f"set algo.tis_mode mask (got '{a.tis_mode}')")

    def _validate_dynamic_sampling(self) -> None:
        a = self.algo
        if not a.dynamic_sampling_max_prompts >= 1:
            raise ConfigError(f"algo.dynamic_sampling_max_prompts must be >= 1 (a step trains train.prompts_per_step "
                              f"prompts), got {a.dynamic_sampling_max_prompts}")
        if not a.dynamic_sampling:
            return
        if a.advantage_estimator not in ("grpo", "dr_grpo", "rloo"):
            raise ConfigError(f"algo.dynamic_sampling drops groups whose equal rewards give all-zero advantages under "
                              f"group normalisation, but algo.advantage_estimator '{a.advantage_estimator}' does not "
                              f"normalise within groups: choose grpo, dr_grpo or rloo")
        if self.rollout.n_samples_per_prompt < 2:
            raise ConfigError(f"algo.dynamic_sampling needs groups of several samples, but "
                              f"rollout.n_samples_per_prompt is {self.rollout.n_samples_per_prompt}")
        if a.kl_mode == "reward" and a.kl_coef > 0:
            raise ConfigError(f"algo.dynamic_sampling drops groups of equal rewards as carrying no gradient, but with "
                              f"algo.kl_mode 'reward' (algo.kl_coef {a.kl_coef}) the KL penalty in their rewards "
                              f"does: use algo.kl_mode loss")
        if self.train.learner_ranks > 1:
            raise ConfigError(f"algo.dynamic_sampling is not implemented with train.learner_ranks "
                              f"{self.train.learner_ranks} (the ranks would have to agree on each group's rewards "
                              f"before dealing): use one learner rank")

    def _validate_eval(self) -> None:
        e = self.eval
        if e.every_steps < 0 or e.n_samples < 1 or e.max_new_tokens < 0:
            raise ConfigError(f"eval.every_steps must be >= 0, eval.n_samples >= 1 and eval.max_new_tokens >= 0 "
                              f"(0: rollout.max_new_tokens), got {e.every_steps}, {e.n_samples} and "
                              f"{e.max_new_tokens}")
        if not (math.isfinite(e.temperature) and e.temperature >= 0) or not 0 < e.top_p <= 1:
            raise ConfigError(f"eval.temperature must be a finite number >= 0 (0: greedy) and eval.top_p in (0, 1], "
                              f"got {e.temperature} and {e.top_p}")
        if e.temperature == 0 and e.n_samples > 1:
            raise ConfigError(f"eval.temperature 0 is greedy: its eval.n_samples ({e.n_samples}) samples of a prompt "
                              f"would all be the same; raise eval.temperature or set eval.n_samples 1")
        bad = [k for k in e.pass_k if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= e.n_samples]
        if bad:
            raise ConfigError(f"eval.pass_k {e.pass_k}: each k must be an integer between 1 and eval.n_samples "
                              f"({e.n_samples}), got {bad}")
        if not math.isfinite(e.pass_threshold):
            raise ConfigError(f"eval.pass_threshold must be a finite number, got {e.pass_threshold}")
        if e.path and self.eval_max_new_tokens >= self.rollout.max_model_len:
            raise ConfigError(f"eval.max_new_tokens ({self.eval_max_new_tokens}) leaves no room for a prompt in "
                              f"rollout.max_model_len ({self.rollout.max_model_len})")

    @property
    def eval_max_new_tokens(self) -> int:
        """The longest evaluation response: eval.max_new_tokens, or (0) rollout.max_new_tokens."""
        return self.eval.max_new_tokens or self.rollout.max_new_tokens

    @property
    def eval_prompt_len_limit(self) -> int:
        """The longest held-out prompt kept: as data's (`prompt_len_limit`), and leaving room for a whole
        evaluation response in the engine."""
        return min(self.prompt_len_limit, self.rollout.max_model_len - self.eval_max_new_tokens)

    def _check_prompt_room(self) -> None:
        if self.data.max_prompt_len < 0:
            raise ConfigError(f"data.max_prompt_len must be >= 0 (0: what rollout.max_model_len leaves), "
                              f"got {self.data.max_prompt_len}")
        if self.prompt_len_limit < 1:
            after = "" if self.data.max_prompt_len else f" after rollout.max_new_tokens ({self.rollout.max_new_tokens})"
            raise ConfigError(f"rollout.max_model_len ({self.rollout.max_model_len}) leaves no room for a "
                              f"prompt{after}: raise rollout.max_model_len")

    @property
    def prompt_len_limit(self) -> int:
        """The longest prompt kept, in tokens: data.max_prompt_len, or (0) what a whole response leaves;
        at most what the engine takes at all (vLLM rejects a prompt that fills rollout.max_model_len)."""
        r = self.rollout
        return min(self.data.max_prompt_len or r.max_model_len - r.max_new_tokens, r.max_model_len - 1)

    @property
    def uses_critic(self) -> bool:
        return self.algo.advantage_estimator == "gae"


def _check_choices(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif f.metadata.get("choices") and value not in f.metadata["choices"]:
            raise ConfigError(f"{prefix}{f.name} must be one of {list(f.metadata['choices'])}, got {value!r}")


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check a value against a field's type; strings from flags (and floats written like `1e-4`,
    which YAML 1.1 reads as strings) are parsed."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    target = {"str": str, "int": int, "float": float, "bool": bool, "list": list}.get(name)
    if target is None:
        raise ConfigError(f"{key}: unsupported field type {annotation!r}")
    if isinstance(value, str) and target is not str:
        value = _parse_string(value, target, key, source)
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (target is not bool and isinstance(value, bool)) or not isinstance(value, target):
        raise ConfigError(f"{key} expects {target.__name__}, got {type(value).__name__} {value!r} "
                          f"(from the {source})")
    return value


def _parse_string(text: str, target: type, key: str, source: str) -> Any:
    try:
        if target is bool:
            return {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}[text.lower()]
        if target is list:
            parsed = _yaml_or_text(text)
            if isinstance(parsed, list) or not text.strip():
                return parsed or []
            # a flag's list may be written without brackets: `a,b` is [a, b], `a` is [a]; each a number,
            # a bool or a string (`Answer:` is the string, not a YAML mapping)
            return [_yaml_or_text(item, scalar=True) for item in text.split(",")]
        return target(text)
    except (KeyError, ValueError, yaml.YAMLError):
        raise ConfigError(f"{key} expects {target.__name__}, cannot parse {text!r} (from the {source})") from None


def _yaml_or_text(text: str, scalar: bool = False) -> Any:
    """`text` read as YAML (numbers, lists), or as the plain string when it is not YAML (a glob `*.jsonl`)
    or, with `scalar`, when YAML reads something else than a number, a bool or a string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text.strip()
    return text.strip() if scalar and not isinstance(value, (str, int, float, bool)) else value


def _apply(obj: Any, updates: dict[str, Any], prefix: str, source: str, base_dir: Path | None = None) -> None:
    """Set `updates` on `obj`; relative paths among them are taken from `base_dir` (None: left relative)."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (from the {source}){_did_you_mean(key, names)}; "
                              f"known keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{full}' is a section and needs a mapping, got {value!r} (from the {source})")
            _apply(current, value, f"{full}.", source, base_dir)
        else:
            value = _coerce(value, hints[key], full, source)
            kind = names[key].metadata.get("path")
            setattr(obj, key, resolve_path(kind, value, base_dir) if kind and base_dir else value)


def _did_you_mean(word: str, candidates: Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: RunConfig | None = None, cwd: str | Path | None = None) -> RunConfig:
    """Defaults (or `base`), then the YAML file at `path`, then dotted `overrides` (strings parsed as YAML).

    Relative paths in the file are taken from the file's directory; `path` and relative paths in
    `overrides` from `cwd` (None: left relative, i.e. to this process's working directory).
    """
    config = base or RunConfig()
    if path:
        path = Path(cwd or "", path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        _apply(config, data, "", f"file {path}", Path(os.path.abspath(path.parent)))
    if overrides:
        _apply(config, _nest(overrides), "", "command line", Path(os.path.abspath(cwd)) if cwd else None)
    return config.validate()


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any], source: str = "message") -> RunConfig:
    config = RunConfig()
    _apply(config, _before_reward_lists(data), "", source)
    return config.validate()


def _before_reward_lists(data: dict[str, Any]) -> dict[str, Any]:
    """A recorded config from before reward.function became a list: its one reward.function_weight
    is that function's (the string function itself is read as a list of one)."""
    reward = data.get("reward")
    if not isinstance(reward, dict) or "function_weight" not in reward:
        return data
    reward = dict(reward)
    weight = reward.pop("function_weight")
    if reward.get("function"):
        reward["function_weights"] = [weight]
    return {**data, "reward": reward}


# --------------------------------------------------------------------------- paths


def resolve_path(kind: str, value: str | list, base: Path) -> str | list:
    """`value` of a path field of `kind` (or each of a list of them) with a relative path made absolute
    from `base` (Hub ids and module names are not paths and stay as they are)."""
    if isinstance(value, list):
        return [resolve_path(kind, item, base) for item in value]
    if not isinstance(value, str) or not value:
        return value  # (validate reports an entry that is not a string)
    if kind == FUNCTION:
        module, sep, name = value.rpartition(":")
        return f"{_absolute(module, base)}:{name}" if sep and is_file_spec(module) else value
    if kind == MODEL and not _looks_local(value, base):
        return value
    if kind == DATASET and not is_local_dataset(value, base):
        return value
    return _absolute(value, base)


def is_file_spec(module: str) -> bool:
    """Whether the part before ':' of a reward function spec names a file rather than a module."""
    return module.endswith(".py") or "/" in module or "\\" in module


def _absolute(path: str, base: Path) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _looks_local(model: str, base: Path) -> bool:
    """A model reference that names a directory rather than a Hugging Face Hub id (`name`, `org/name`)."""
    return _written_as_path(model) or os.path.isdir(os.path.join(base, model))


# Suffixes of the data files a dataset path may name (learner.data.prompts reads them).
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def is_local_dataset(ref: str, base: Path) -> bool:
    """A dataset reference that names local data (a file, a glob, a directory) rather than a Hugging Face
    Hub dataset id (`name`, `org/name`): written as a path, a glob, a data file name, or existing in `base`."""
    return (_written_as_path(ref) or is_glob(ref) or ref.lower().endswith(DATA_FILE_SUFFIXES)
            or os.path.exists(os.path.join(base, ref)))


def is_glob(ref: str) -> bool:
    return any(c in ref for c in "*?[")


def _written_as_path(ref: str) -> bool:
    """Written as a local path; a Hub id has the form `name` or `org/name`."""
    return ref.startswith(("/", "./", "../", "~")) or ref in (".", "..") or ref.count("/") > 1


def path_fields(config: RunConfig) -> Iterator[tuple[str, str, str]]:
    """(dotted key, path kind, value) of every path-valued field."""
    for section in dataclasses.fields(config):
        obj = getattr(config, section.name)
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                if f.metadata.get("path"):
                    yield f"{section.name}.{f.name}", f.metadata["path"], getattr(obj, f.name)


# What a rollout process reads; the learner reads every input.
ROLLOUT_INPUTS = ("model.path", "transport.curve_dir")

NO_REWARD = ("no reward: give --reward.function (package.module:function or path/to/file.py:function, called "
             "batched as fn(prompts, completions, labels) -> list of floats, e.g. "
             "learner.tasks.gsm8k:gsm8k_reward; several comma-separated), --reward.url (an HTTP reward server) "
             "and/or --reward.model_path (a value-head reward model)")


def check_weight_transfer_device(config: RunConfig, role: str, cuda_available: bool) -> None:
    """Refuse transport.weight_transfer nccl where this process (the `role`) has no CUDA device; the caller
    asks torch, which this module does not import."""
    if config.transport.weight_transfer == "nccl" and not cuda_available:
        raise ConfigError(f"transport.weight_transfer nccl needs a CUDA device on the {role}, and torch finds none "
                          f"here; use transport.weight_transfer zmq")


def check_inputs(config: RunConfig, role: str) -> None:
    """ConfigError, naming the option and the path, for an input of a `role` ('learner' or 'rollout')
    process that is missing, and for a learner without a reward. Launch scripts check this before
    starting any process, each process before it loads anything."""
    for key, kind, value in path_fields(config):
        if role == "rollout" and key not in ROLLOUT_INPUTS:
            continue
        for item in value if isinstance(value, list) else [value]:
            problem = _input_problem(kind, item)
            if problem:
                raise ConfigError(f"--{key} {item}: {problem}")
    r = config.reward
    if role == "learner" and not r.function and not r.url and not r.model_path:
        raise ConfigError(NO_REWARD)


def _input_problem(kind: str, value: str) -> str | None:
    if not value or kind == OUTPUT:
        return None
    if kind == INPUT:
        return None if os.path.exists(value) else "no such file or directory"
    if kind == DATASET:
        if not is_local_dataset(value, Path.cwd()):
            return None  # a Hub dataset id: loaded (and downloaded) by learner.data.prompts
        if is_glob(value):
            return None if glob.glob(value, recursive=True) else "no file matches this pattern"
        return None if os.path.exists(value) else "no such file or directory"
    if kind == MODEL:
        if not _looks_local(value, Path.cwd()):
            return None  # a Hub id: resolved (and downloaded) by the loaders
        if not os.path.isdir(value):
            return "no such directory"
        if not os.path.isfile(os.path.join(value, "config.json")):
            return "not a Hugging Face model directory (no config.json)"
        return None
    module = value.rpartition(":")[0]
    if is_file_spec(module):
        return None if os.path.isfile(module) else "no such file"
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else (f"no module named {module!r} (a file is given as path/to/file.py:function)")


# --------------------------------------------------------------------------- command line


class ConfigArgumentParser(argparse.ArgumentParser):
    """The parser of every entry point that takes the run config: `--config FILE` and one
    `--section.key` flag per field. Flags are spelled out (no abbreviations, as in a YAML file), and
    errors are one line, with the closest valid flag for a mistyped one: the usage lists every key."""

    def __init__(self, **kwargs: Any):
        super().__init__(allow_abbrev=False, **kwargs)
        add_config_arguments(self)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            flag = next((x for x in extras if x.startswith("-")), None)
            if flag is None:
                self.error(f"unexpected argument {extras[0]!r} (config keys are given as --section.key value)")
            options = [s for action in self._actions for s in action.option_strings]
            self.error(f"unknown option {flag}{_did_you_mean(flag.split('=')[0], options)}")
        return namespace

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (every option: python -m learner --help)\n")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config FILE` and one `--section.key` flag per field, with its default and help."""
    parser.add_argument("--config", default=None, help="YAML config file (flags override it; relative paths in "
                                                       "it are taken from its directory).")
    defaults = RunConfig()

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                group = parser.add_argument_group(f"{prefix}{f.name}", f.metadata.get("help"))
                walk_group(group, value, f"{prefix}{f.name}.")
            else:
                add(parser, f, value, prefix)

    def walk_group(group: Any, obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            add(group, f, getattr(obj, f.name), prefix)

    def add(target: Any, f: dataclasses.Field, default: Any, prefix: str) -> None:
        choices = f.metadata.get("choices")
        extra = f" Choices: {', '.join(map(str, choices))}." if choices else ""
        target.add_argument(f"--{prefix}{f.name}", dest=f"{prefix}{f.name}", default=argparse.SUPPRESS,
                            metavar=type(default).__name__.upper(),
                            help=f"{f.metadata['help']}{extra} (default: {json.dumps(default)})")

    walk(defaults, "")


def _config_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if "." in k or k == "run_id"}


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None,
                     cwd: str | Path | None = None) -> RunConfig:
    """The config the flags give; `cwd`: take relative paths among them from there (see load_config)."""
    return load_config(args.config, _config_flags(args), base, cwd)


def absolute_flags(args: argparse.Namespace, cwd: str | Path) -> list[str]:
    """The flags that give the same config as `args` in any working directory: `--config` and the
    path options among them made absolute from `cwd` (for launch scripts, which change directory)."""
    base = Path(os.path.abspath(cwd))
    kinds = {key: (kind, isinstance(default, list)) for key, kind, default in path_fields(RunConfig())}
    flags = ["--config", _absolute(args.config, base)] if args.config else []
    for key, value in _config_flags(args).items():
        flags += [f"--{key}", _absolute_flag(key, *kinds[key], value, base) if key in kinds else value]
    return flags


def _absolute_flag(key: str, kind: str, is_list: bool, text: str, base: Path) -> str:
    """A path flag's text with its path(s) made absolute; a list (reward functions, datasets) comes back
    comma-separated."""
    if not is_list:
        return resolve_path(kind, text, base)
    items = _parse_string(text, list, key, "command line")
    return ",".join(str(resolve_path(kind, item, base)) for item in items)
