"""The whole loop on real components: vLLM rollouts -> ZeroMQ -> DeepSpeed learner -> weights back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT, assert_reward_rose, leftover_processes

pytestmark = pytest.mark.e2e

EXPORT_CHECK = """
import sys
from transformers import AutoModelForCausalLM
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
    llm = LLM(sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=64)
    out = llm.generate(["3+4="], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0]
    print("GENERATED", repr(out.text))
"""


def test_default_job_learns_and_cleans_up(run_local):
    """GRPO with one rollout process on its own core, one step off-policy: the reward clearly rises."""
    result = run_local()  # the default job as the README runs it (150 steps)
    assert result.returncode == 0, result.output[-3000:]
    metrics = result.metrics
    assert len(metrics) == 150
    assert_reward_rose(metrics)
    assert max(m["staleness_max"] for m in metrics) <= 1
    applied = result.summary["applied_versions"]
    assert len(applied) == 1, applied
    for producer, versions in applied.items():
        assert len(set(versions)) >= 2, f"{producer} applied only {versions}"
    assert not leftover_processes(result.run_id)
    # the exported actor loads directly in vLLM (and transformers) and generates
    check = subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(result.run_dir / "final")], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert check.returncode == 0, check.stderr[-3000:]
    assert "GENERATED" in check.stdout


def test_ppo_with_critic_reference_reward_model_and_sync_mode(run_local, tmp_path):
    """GAE with a critic, a KL penalty against the reference model, a reward model next to the
    reward function, fully synchronous (staleness 0)."""
    from learner.models.value_model import build_value_model
    from learner.tasks.arithmetic import prepare

    reward_model = tmp_path / "reward_model"
    build_value_model("reward", prepare(ROOT / "runs" / "arithmetic")["model"]).save_pretrained(reward_model)
    result = run_local("--train.num_steps", "6", "--algo.advantage_estimator", "gae", "--algo.kl_coef", "0.05",
                       "--algo.kl_mode", "reward", "--train.max_staleness", "0", "--rollout.num_processes", "1",
                       "--reward.model_path", str(reward_model), "--reward.model_weight", "0.5",
                       "--output.save_final", "false")
    assert result.returncode == 0, result.output[-3000:]
    metrics = result.metrics
    assert len(metrics) == 6
    assert all(m["staleness_max"] == 0 for m in metrics)
    assert all("value_loss" in m for m in metrics)
    for m in metrics:  # the total is the weighted sum of both scorers
        assert m["reward_mean"] == pytest.approx(m["reward_function_mean"] + 0.5 * m["reward_model_mean"], abs=1e-5)
    assert metrics[-1]["kl_ref"] > 0, "the policy moved, so its KL to the reference must be positive"
    assert not leftover_processes(result.run_id)


def test_killed_rollout_is_restarted_and_no_prompt_is_lost(run_local, tmp_path):
    """SIGKILL the only rollout mid-run: the launcher restarts it, the learner re-issues the work
    the dead one held, the new one starts from the current weights, training completes, and every
    prompt is still trained on exactly once per epoch."""
    import json
    import os
    import signal
    import threading
    import time

    from tests.e2e.conftest import processes_mentioning

    steps = 20
    killed = {}

    def kill_rollout_once_training_runs():
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            # early in the run: on a fast machine the last steps take well under a second
            steps_done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if steps_done >= 2:
                for line in processes_mentioning(str(tmp_path)):  # the line shown is cut at 200 characters
                    pid = int(line.split(":")[0])
                    if "-m rollout --index 0" not in line:
                        continue
                    if os.getpgid(pid) == pid:  # the rollout process itself (its engine runs beside it)
                        os.kill(pid, signal.SIGKILL)
                        killed["pid"], killed["steps_done"] = pid, steps_done
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_rollout_once_training_runs, daemon=True)
    killer.start()
    result = run_local("--train.num_steps", str(steps), "--rollout.num_processes", "1",
                       "--transport.peer_timeout_s", "10", "--output.save_final", "false")
    killer.join(timeout=1)
    assert killed, "the test never found the rollout process to kill"
    assert result.returncode == 0, result.output[-3000:]
    assert "restarting it (1/3)" in result.output
    assert len(result.metrics) == steps
    # in training order, every epoch of the 100-prompt dataset is a permutation of it: nothing lost, nothing twice
    consumed = [json.loads(line) for line in (result.run_dir / "steps.jsonl").read_text().splitlines()]
    ids = [p for step in consumed for p in step["prompt_ids"]]
    assert len(ids) == steps * 16
    for start in range(0, len(ids) - 99, 100):
        assert sorted(ids[start: start + 100]) == list(range(100)), f"epoch starting at sample {start}"
    (producer, versions), = result.summary["applied_versions"].items()  # only the restarted process is left
    assert producer.startswith("rollout-0@") and not producer.endswith(f":{killed['pid']}")
    assert min(versions) >= killed["steps_done"], f"the restarted rollout must start from the then-current weights: {versions}"
    assert result.summary["dropped_rollouts"] == 1
    assert not leftover_processes(result.run_id)


def test_rollout_that_cannot_start_stops_the_run_at_once(run_local):
    """A rollout whose engine cannot start (here: more positions than the model has) is not
    restarted and does not leave the learner waiting transport.batch_timeout_s for its hello: the
    launcher stops the run with the engine's error."""
    import time

    started = time.monotonic()
    result = run_local("--rollout.max_model_len", "100000", "--transport.batch_timeout_s", "600", timeout=300)
    assert result.returncode == 3, result.output[-3000:]
    assert time.monotonic() - started < 120
    assert "rollout 0 failed to start; stopping the run" in result.output
    assert "max_model_len" in result.output  # vLLM's reason, from the tail of the rollout's log
    assert "restarting" not in result.output
    assert not leftover_processes(result.run_id)


def test_rollout_whose_engine_hangs_is_dropped_and_the_run_goes_on(run_local, tmp_path):
    """Freeze rollout 1's vLLM engine process (SIGSTOP) mid-run while the rollout process itself
    keeps sending heartbeats: the learner drops it when it makes no progress, re-issues its work to
    rollout 0 and finishes; after SIGCONT the frozen one rejoins or leaves cleanly. Every prompt is
    still trained on exactly once per epoch."""
    import contextlib
    import json
    import os
    import signal
    import threading
    import time

    from tests.e2e.conftest import processes_mentioning

    steps, frozen = 24, {}

    def children(pid: int) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
        return found

    def freeze_then_thaw_engine():
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "at_step" not in frozen:
            steps_done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if steps_done >= 2:
                for line in processes_mentioning(str(tmp_path)):  # the line shown is cut at 200 characters
                    pid = int(line.split(":")[0])
                    if "-m rollout --index 1" in line and os.getpgid(pid) == pid and (engines := children(pid)):
                        for engine in engines:
                            os.kill(engine, signal.SIGSTOP)
                        frozen.update(at_step=steps_done, engines=engines)
                        break
            time.sleep(0.2)
        while time.monotonic() < deadline:  # training goes on without it, then it wakes up
            if metrics.exists() and len(metrics.read_text().splitlines()) >= frozen.get("at_step", steps) + 4:
                break
            time.sleep(0.2)
        for engine in frozen.get("engines", []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine, signal.SIGCONT)

    hanger = threading.Thread(target=freeze_then_thaw_engine, daemon=True)
    hanger.start()
    result = run_local("--train.num_steps", str(steps), "--rollout.num_processes", "2",
                       "--rollout.engine_process", "true", "--transport.weight_ack_timeout_s", "8",
                       "--transport.progress_timeout_s", "8", "--output.save_final", "false")
    hanger.join(timeout=30)
    assert frozen.get("engines"), "the test never found rollout 1's engine process"
    assert result.returncode == 0, result.output[-3000:]
    assert len(result.metrics) == steps
    assert result.summary["dropped_rollouts"] >= 1
    assert "did not apply weight version" in result.output or "made no progress" in result.output
    consumed = [json.loads(line) for line in (result.run_dir / "steps.jsonl").read_text().splitlines()]
    ids = [p for step in consumed for p in step["prompt_ids"]]
    assert len(ids) == steps * 16
    for start in range(0, len(ids) - 99, 100):
        assert sorted(ids[start: start + 100]) == list(range(100)), f"epoch starting at sample {start}"
    assert not leftover_processes(result.run_id)
