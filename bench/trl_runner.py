"""TRL's GRPOTrainer on one of this project's tasks: the TRL side of bench/bench_trl.py.

Runs in the TRL environment (bench/trl_venv.py), where this project is not installed: it imports
only TRL, transformers, datasets and torch, and loads the reward function from the repository
(`package.module:function` imported with --root on sys.path, `path.py:function` from that file), so
both systems score with the same code; the reward module may import the standard library, what
transformers brings (e.g. `tokenizers`) and this project's modules that need no more. Prints on stdout one JSON line with the
versions, then one per optimizer step ({"step", "reward_mean", "sequences", "response_len", ...})
as soon as the step is logged; TRL's own log lines are not JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path


def load_reward(spec: str, root: Path):
    """The reward function `module:function` (importable from root) or `path.py:function`."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        sys.exit(f"trl_runner: reward {spec!r} is not module:function or path.py:function")
    sys.path.insert(0, str(root))
    try:
        if target.endswith(".py"):
            path = Path(target) if Path(target).is_absolute() else root / target
            module_spec = importlib.util.spec_from_file_location(f"bench_reward_{path.stem}", path)
            if module_spec is None or not path.exists():
                sys.exit(f"trl_runner: no reward file {path}")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as exc:
        sys.exit(f"trl_runner: the reward module of {spec!r} imports {exc.name or exc}, which the TRL environment "
                 "does not have: a benchmarked reward may use the standard library, transformers' dependencies "
                 "and this project's light modules only")
    return getattr(module, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory (with its tokenizer).")
    parser.add_argument("--prompts", required=True, help="JSONL with `prompt` and optional `label`.")
    parser.add_argument("--reward", required=True, help="module:function or path.py:function.")
    parser.add_argument("--root", required=True, help="Repository root (where module rewards live).")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--prompts-per-step", type=int, required=True)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    args = parser.parse_args()

    score = load_reward(args.reward, Path(args.root))

    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    def reward(prompts, completions, label=None, **_):
        return score(prompts, completions, label if label is not None else [None] * len(completions))

    reward.__name__ = getattr(score, "__name__", "reward")

    class StepLines(TrainerCallback):
        """One JSON line on stdout per optimizer step, at the log that follows it (logging_steps=1)."""

        def on_log(self, _args, state, _control, logs=None, **_):
            if logs and "reward" in logs:
                print(json.dumps({"step": state.global_step, "reward_mean": logs["reward"],
                                  "sequences": args.prompts_per_step * args.samples,
                                  "response_len": logs.get("completions/mean_length"), "loss": logs.get("loss"),
                                  "clip_ratio": logs.get("clip_ratio/region_mean")}), flush=True)

    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "label": r.get("label")} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    batch = args.prompts_per_step * args.samples
    config = GRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=batch,     # one optimizer step on all P x G samples ...
        gradient_accumulation_steps=1,
        steps_per_generation=1,                # ... generated for that step (generation_batch_size = P x G)
        num_generations=args.samples,
        num_iterations=1,                      # one PPO epoch
        max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,
        use_vllm=False,                        # plain transformers generate
        beta=0.0,                              # no KL, no reference model
        epsilon=0.2, epsilon_high=0.2,
        scale_rewards="group",                 # GRPO: (r - group mean) / group std
        loss_type="dapo",                      # token mean over the step's completion tokens
        mask_truncated_completions=False,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0,
        bf16=False, fp16=False,                # fp32 (TRL's default is bf16) ...
        gradient_checkpointing=False,          # ... without recomputation (TRL's default is on; ours is off)
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=args.seed, data_seed=args.seed,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepLines()])
    print(json.dumps({"versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                   "torch": torch.__version__, "datasets": datasets.__version__},
                      "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                      "device": str(config.device)}), flush=True)
    trainer.train()


if __name__ == "__main__":
    main()
