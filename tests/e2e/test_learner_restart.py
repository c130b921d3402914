"""Multi-node style recovery: the learner (launch/learner.sh) is SIGKILLed and started again with
--train.resume while the rollouts (launch/rollouts.sh, rollout.on_learner_lost=wait) keep their
engines loaded, say hello to the new learner and finish the run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import ROOT, leftover_processes, processes_mentioning, stop

pytestmark = pytest.mark.e2e

PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
STEPS, KILL_AFTER_STEPS = 40, 5  # steps take ~0.1 s: kill early enough to land mid-run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def test_rollouts_wait_for_a_resumed_learner(tmp_path):
    prepared = subprocess.run([PY, "-m", "learner.tasks.arithmetic", "prepare", "--out", str(tmp_path / "task"),
                               "--sft-steps", "20"], cwd=ROOT, capture_output=True, text=True, check=True)
    task = json.loads(prepared.stdout.strip().splitlines()[-1])
    run_id, run_dir = f"e2e-restart-{os.getpid()}-{time.monotonic_ns()}", tmp_path / "run"
    common = ["--config", "configs/tiny.yaml", "--model.path", task["model"], "--data.path", task["prompts"],
              "--run_id", run_id, "--transport.port", str(free_port()), "--train.num_steps", str(STEPS),
              "--rollout.num_processes", "1", "--output.progress", "false", "--output.save_final", "false",
              "--output.dir", str(run_dir), "--rollout.on_learner_lost", "wait", "--transport.peer_timeout_s", "8"]
    learner_flags = [*common, "--train.save_every", "1", "--output.record", "true"]
    logs = {name: tmp_path / f"{name}.out" for name in ("learner-1", "learner-2", "rollouts")}
    metrics = run_dir / "metrics.jsonl"

    def start(name: str, *cmd: str) -> subprocess.Popen:
        with open(logs[name], "w") as out:
            return subprocess.Popen(["bash", *cmd], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def diagnostics() -> str:
        files = [*logs.values(), *sorted((run_dir / "logs").glob("*.log"))]
        return "".join(f"\n--- {p}\n{p.read_text()[-3000:]}" for p in files if p.exists())

    rollouts = start("rollouts", str(ROOT / "launch" / "rollouts.sh"), "--count", "1", *common)
    first = start("learner-1", str(ROOT / "launch" / "learner.sh"), *learner_flags)
    second = None
    try:
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= KILL_AFTER_STEPS,
                 600, f"{KILL_AFTER_STEPS} steps of the first learner")
        # the learner process itself dies (launch/learner.sh runs it in its own session), the script exits
        learners = [int(line.split(":")[0]) for line in processes_mentioning(run_id) if " -m learner " in line]
        assert learners, "the first learner is not running"
        for pid in learners:
            os.kill(pid, signal.SIGKILL)
        assert first.wait(timeout=60) != 0
        rollout_log = run_dir / "logs" / "rollout-0.log"
        wait_for(lambda: "saying hello again" in rollout_log.read_text(), 60,
                 "the rollout to notice the lost learner")
        assert rollouts.poll() is None, "the rollouts must wait for the learner, not exit" + diagnostics()

        second = start("learner-2", str(ROOT / "launch" / "learner.sh"), *learner_flags, "--train.resume", "true")
        assert second.wait(timeout=600) == 0, diagnostics()
        assert rollouts.wait(timeout=60) == 0, diagnostics()
    except BaseException:
        print(diagnostics(), file=sys.stderr)
        raise
    finally:
        for proc in (first, second, rollouts):
            if proc is not None:
                stop(proc)

    resumed = logs["learner-2"].read_text()
    assert "resumed from" in resumed and "continuing at step" in resumed
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(STEPS)), "every step logged exactly once across the restart"
    rollout_log = (run_dir / "logs" / "rollout-0.log").read_text()
    assert rollout_log.count("rollout 0 finished") == 1
    assert "restarting it" not in logs["rollouts"].read_text(), "the rollout process itself never restarted"
    # the same process (producer id carries the pid) applied the resumed learner's versions
    applied = json.loads((run_dir / "summary.json").read_text())["applied_versions"]
    assert len(applied) == 1, applied
    resumed_at = int(resumed.split("continuing at step ")[1].split()[0])
    assert set(range(resumed_at, STEPS)) <= set(next(iter(applied.values())))
    consumed = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    ids = [p for c in consumed for p in c["prompt_ids"]]
    assert sorted(ids[:100]) == list(range(100)), "the first epoch's prompts used exactly once across the restart"
    assert not leftover_processes(run_id)
