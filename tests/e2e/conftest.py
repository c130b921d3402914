"""Helpers for end-to-end runs: real launch script, real vLLM, ZeroMQ and DeepSpeed processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RunResult:
    returncode: int
    output: str
    run_dir: Path
    run_id: str

    @property
    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())


def assert_reward_rose(metrics: list[dict], window: int = 15, by: float = 0.08) -> None:
    """The mean reward of the last `window` steps beats that of the first `window` steps by `by`."""
    first = sum(m["reward_mean"] for m in metrics[:window]) / window
    last = sum(m["reward_mean"] for m in metrics[-window:]) / window
    assert last > first + by, f"reward did not rise: first {window} steps {first:.3f}, last {window} steps {last:.3f}"


def stop(proc: subprocess.Popen) -> None:
    """Stop a launch script's session (its trap stops the process groups it started)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (e.g. a run id)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def leftover_processes(run_id: str, wait_s: float = 15.0) -> list[str]:
    """Processes of a run still alive after `wait_s` seconds (an empty list when all exited)."""
    deadline = time.monotonic() + wait_s
    while (left := processes_mentioning(run_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@contextlib.contextmanager
def vllm_engine(model_dir: Path, cfg):
    """A real vLLM engine (rollout.engine.VLLMGenerator, `cfg` a RolloutConfig) on `model_dir`, closed at
    the end, and the CPU thread binding set for it undone: it must not reach later tests' launch scripts."""
    import torch

    from rollout.engine import VLLMGenerator, configure_cpu_threads

    environ, threads = dict(os.environ), torch.get_num_threads()
    configure_cpu_threads(cfg, 0)
    engine = VLLMGenerator(str(model_dir), cfg, seed=0)
    try:
        yield engine
    finally:
        engine.close()
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)


def addition_task_flags() -> list[str]:
    """launch/local.sh flags for the tiny addition task (learner.tasks.addition, prepared once):
    16-token answers, so that weight updates often land while samples are generated."""
    from learner.tasks.addition import MAX_MODEL_LEN, MAX_NEW_TOKENS, REWARD, prepare

    task = prepare(ROOT / "runs" / "addition-tiny", size="tiny")
    return ["--model.path", task["model"], "--data.path", task["prompts"], "--reward.function", REWARD,
            "--rollout.max_new_tokens", str(MAX_NEW_TOKENS), "--rollout.max_model_len", str(MAX_MODEL_LEN)]


@pytest.fixture
def run_local(tmp_path):
    """Run launch/local.sh with extra flags in a fresh run directory; returns a RunResult."""

    def run(*flags: str, timeout: float = 900, env: dict | None = None) -> RunResult:
        run_id = f"e2e-{os.getpid()}-{time.monotonic_ns()}"
        run_dir = tmp_path / "run"
        cmd = ["bash", str(ROOT / "launch" / "local.sh"), "--run_id", run_id, "--output.dir", str(run_dir),
               "--output.progress", "false", *flags]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*.log")))
            print(output[-6000:], logs, file=sys.stderr)
        return RunResult(proc.returncode, output, run_dir, run_id)

    return run
