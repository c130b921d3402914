"""What a user sees first from the Python entry points: a clean --help, one-line errors for their
own mistakes (the traceback in the log), and the exit statuses the launch scripts act on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from protocol.config import ConfigArgumentParser, ConfigError, config_from_args

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["learner", "rollout", "protocol.keys", "learner.plot"])
def test_help_is_the_usage_alone(module):
    """No DeepSpeed accelerator notice (learner), no runpy RuntimeWarning (protocol.keys), the
    command's own name as prog (learner.plot)."""
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: python -m {module} ")
    assert out.stderr == ""


@pytest.fixture
def run_inputs(tmp_path):
    """Flags of a run whose inputs exist (a model directory, a prompt file, a reward function)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+1="}\n')
    return ["--model.path", str(model), "--data.path", str(tmp_path / "prompts.jsonl"),
            "--reward.function", "learner.tasks.arithmetic:arithmetic_reward", "--output.dir", str(tmp_path / "run")]


def test_learner_config_error_is_one_line(capsys):
    import learner.main as learner_main

    with pytest.raises(SystemExit) as exc:
        learner_main.main(["--model.path", "/models/does-not-exist", "--data.path", "prompts.jsonl"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: --model.path /models/does-not-exist: no such directory"]


def test_learner_user_error_is_one_line_and_its_traceback_goes_to_the_log(tmp_path, monkeypatch, capsys, run_inputs):
    import learner.main as learner_main
    from learner.data.prompts import DatasetError

    def load_rows():
        raise DatasetError("prompts.jsonl: line 1: missing input key 'prompt'")

    async def train(cfg):
        load_rows()

    monkeypatch.setattr(learner_main, "train", train)
    monkeypatch.setattr(learner_main, "init_distributed", lambda: None)
    for name in ("set_num_threads", "manual_seed"):  # not this test process's torch
        monkeypatch.setattr(learner_main.torch, name, lambda n: None)
    monkeypatch.setattr(learner_main.np.random, "seed", lambda n: None)
    assert learner_main.main(run_inputs) == 2
    log = tmp_path / "run" / "logs" / "learner.log"
    assert capsys.readouterr().err.splitlines() == [
        f"error: prompts.jsonl: line 1: missing input key 'prompt' (traceback in {log})"]
    assert "Traceback" in log.read_text() and "in load_rows" in log.read_text()


def test_a_model_the_learner_cannot_load_is_a_config_error(monkeypatch, run_inputs):
    """A Hub id is not checked up front (it is not a path); failing to fetch it is still the user's
    mistake, reported as one line naming the option."""
    import transformers

    from learner.main import Learner

    def offline(name, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    cfg = config_from_args(ConfigArgumentParser().parse_args([*run_inputs, "--model.path", "org/name"]))
    with pytest.raises(ConfigError, match=r"^--model.path org/name: We couldn't connect"):
        Learner(cfg)


def _rollout_flags(inputs):
    return [*inputs, "--run_id", "r", "--transport.port", "29999"]


def test_rollout_failing_before_its_hello_exits_3(monkeypatch, capsys, run_inputs):
    """Launch scripts restart a rollout that failed after saying hello to the learner (status 1), not one
    that failed to start (status 3): that one would fail again, and the learner would wait for it."""
    import rollout.main as rollout_main

    assert rollout_main.main(_rollout_flags(["--model.path", "/models/nope"])) == 3
    assert capsys.readouterr().err.splitlines() == ["error: --model.path /models/nope: no such directory"]

    async def engine_fails(self):
        raise RuntimeError("Engine core initialization failed")

    monkeypatch.setattr(rollout_main.RolloutWorker, "run", engine_fails)
    assert rollout_main.main(_rollout_flags(run_inputs)) == 3
    assert "RuntimeError: Engine core initialization failed" in capsys.readouterr().err

    async def learner_lost(self):
        self.greeted = True
        raise TimeoutError("no message from the learner")

    monkeypatch.setattr(rollout_main.RolloutWorker, "run", learner_lost)
    assert rollout_main.main(_rollout_flags(run_inputs)) == 1
