"""The launch scripts up to the point where they would start a process: --help, mistakes in the
flags, relative paths, missing inputs (none of these loads a model), and what they do when a
rollout fails to start (with a stand-in for the rollout)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
OWN_FLAGS = {"local.sh": ["TASK_DIR"], "learner.sh": ["NNODES", "HOSTFILE", "DRY_RUN"],
             "rollouts.sh": ["--count K", "--first-index I"], "replay.sh": ["RECORDING_DIR"],
             "slurm.sbatch": ["ROLLOUTS_PER_NODE", "KEY_DIR"]}


def launch(script: str, *argv: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("script", sorted(OWN_FLAGS))
def test_help_says_what_it_starts_its_flags_and_how_config_keys_are_given(script, tmp_path):
    out = launch(script, "--help", cwd=REPO if script == "slurm.sbatch" else tmp_path)  # sbatch runs a copy
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout.startswith("Usage: ")
    assert "start" in out.stdout.lower()
    for flag in OWN_FLAGS[script]:
        assert flag in out.stdout
    assert "--section.key value" in out.stdout and "python -m learner --help" in out.stdout
    assert "#" not in out.stdout.splitlines()[0]


@pytest.mark.parametrize("script", ["local.sh", "learner.sh", "rollouts.sh", "replay.sh"])
def test_mistyped_flag_is_reported_once_with_the_closest_key(script, tmp_path):
    first = [str(tmp_path)] if script == "replay.sh" else []
    out = launch(script, *first, "--train.num_stesp", "3", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"launch/{script}: error: unknown option --train.num_stesp; did you mean "
                                       f"--train.num_steps? (every option: python -m learner --help)"]


@pytest.fixture
def experiment(tmp_path):
    """A user's directory: a model, prompts, a reward file and a config in a subdirectory."""
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.jsonl").write_text('{"prompt": "1+1="}\n')
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "score.py").write_text("def score(prompts, completions, labels):\n    return [0.0]\n")
    (tmp_path / "exp" / "run.yaml").write_text("data:\n  path: ../data/p.jsonl\nreward:\n  function: score.py:score\n")
    return tmp_path


LEARNER = ["--run_id", "x", "--transport.port", "29400"]


def test_relative_paths_are_taken_from_where_the_launcher_runs(experiment):
    """Flags from the caller's directory, a YAML file's paths from the file's directory, all
    checked before anything starts; the processes (which run in the repository) get them absolute."""
    out = launch("learner.sh", "--config", "exp/run.yaml", "--model.path", "models/m", "--output.dir", "out",
                 *LEARNER, cwd=experiment, env={"DRY_RUN": "1"})
    assert out.returncode == 0, out.stderr
    command = out.stdout.splitlines()[-1]
    for flag in (f"--config {experiment}/exp/run.yaml", f"--model.path {experiment}/models/m",
                 f"--output.dir {experiment}/out"):
        assert flag in command
    # a Hugging Face Hub id is not a path
    out = launch("learner.sh", "--config", "exp/run.yaml", "--model.path", "Qwen/Qwen2.5-0.5B", *LEARNER,
                 cwd=experiment, env={"DRY_RUN": "1"})
    assert out.returncode == 0, out.stderr
    assert "--model.path Qwen/Qwen2.5-0.5B " in out.stdout.splitlines()[-1]


@pytest.mark.parametrize(("flags", "problem"), [
    (["--model.path", "/models/does-not-exist"], "--model.path /models/does-not-exist: no such directory"),
    (["--model.path", "models"], "--model.path {d}/models: not a Hugging Face model directory (no config.json)"),
    (["--model.path", "models/m", "--data.path", "prompts.jsonl"],
     "--data.path {d}/prompts.jsonl: no such file or directory"),
    (["--model.path", "models/m", "--data.path", "data/p.jsonl"], "no reward: give --reward.function"),
])
def test_missing_input_is_one_line_before_anything_starts(experiment, flags, problem):
    out = launch("local.sh", *flags, "--output.dir", "out", cwd=experiment)
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith(f"launch/local.sh: refusing to start the learner: {problem.format(d=experiment)}")
    assert not (experiment / "out").exists()  # nothing started


@pytest.mark.parametrize("flags", [[], ["--model.path", "models/m", "--data.path", "data/p.jsonl"]])
def test_invalid_config_is_one_line_before_anything_starts(experiment, flags):
    """A value the config's own validation refuses (here, one weight too many for the datasets),
    with the built-in task or the user's data."""
    # the built-in task is built first (in a fresh directory, as on a fresh clone): its progress
    # output must not bury the error
    out = launch("local.sh", *flags, "--data.weights", "1,2", "--output.dir", "out", cwd=experiment,
                 env={"TASK_DIR": str(experiment / "task")})
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert "data.weights has 2 entries but data.path names 1 dataset(s)" in out.stderr
    assert not (experiment / "out").exists()  # nothing started


def test_python_is_the_repositorys_python_in_the_callers_directory(tmp_path):
    out = launch("python.sh", "-c", "import learner, os; print(learner.__file__); print(os.getcwd())", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [str(REPO / "learner" / "__init__.py"), str(tmp_path)]
    out = launch("python.sh", "--help", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("Usage: launch/python.sh [PYTHON ARGUMENTS ...]\n")


def test_replay_needs_a_recording(tmp_path):
    out = launch("replay.sh", cwd=tmp_path)
    assert out.returncode == 2 and "usage: launch/replay.sh RECORDING_DIR" in out.stderr


def _supervise_one_rollout(tmp_path: Path, status: int) -> subprocess.CompletedProcess:
    """common.sh's rollout supervision with a stand-in rollout that fails with `status`."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/usr/bin/env bash\necho 'error: --model.path /m: no such directory' >&2\nexit {status}\n")
    fake.chmod(0o755)
    script = f"""
set -euo pipefail
root={REPO}
source "$root/launch/common.sh"
py={fake} run_dir={tmp_path} max_restarts=2 args=()
mkdir -p "$run_dir/logs"
start_rollouts 0 1
for _ in {{1..50}}; do sleep 0.1; check_rollouts; done
echo "still supervising"
"""
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)


def test_rollout_failing_to_start_stops_the_run_at_once(tmp_path):
    out = _supervise_one_rollout(tmp_path, status=3)
    assert out.returncode == 3
    assert "restarting" not in out.stderr
    assert "rollout 0 failed to start; stopping the run" in out.stderr
    assert out.stderr.splitlines()[-1] == "error: --model.path /m: no such directory"  # its log's last line


def test_rollout_failing_later_is_restarted(tmp_path):
    out = _supervise_one_rollout(tmp_path, status=1)
    assert out.returncode == 1
    assert "restarting it (1/2)" in out.stderr and "restarting it (2/2)" in out.stderr
    assert "rollout 0 exited with status 1 after 2 restart(s)" in out.stderr
